"""Shared vocabulary of orch: run-directory protocol, typed models, the controller store.

Imported by both sides (the laptop's `orchestrator` and the box's `worker`); never imports
either of them, nor torch. The poll agent (`python -m state.agent`) runs on the box with the
standard library plus pydantic.
"""
