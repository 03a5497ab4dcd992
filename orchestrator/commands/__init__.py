"""CLI commands: one module each, discovered by `orchestrator.cli` (see its docstring)."""
