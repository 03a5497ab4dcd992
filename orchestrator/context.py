"""Per-invocation context: config, project root, state dir and store, opened lazily."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from rich.console import Console

from orchestrator.config import OrchConfig, load_config
from state.store import Store


class Context:
    """What every command needs. Nothing is opened until it is used."""

    def __init__(
        self, config_path: str | None = None, state_dir: str | None = None, cwd: Path | None = None
    ):
        self._config_path = config_path
        self._state_dir = state_dir
        self.cwd = (cwd or Path.cwd()).resolve()
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self._store: Store | None = None

    @cached_property
    def config(self) -> OrchConfig:
        return load_config(self._config_path, self.cwd)

    @cached_property
    def project_root(self) -> Path:
        """The folder of orch.toml, else the current directory (where `runs/` is pulled to)."""
        src = self.config.source
        return src.parent if src is not None else self.cwd

    @cached_property
    def state_dir(self) -> Path:
        d = self._state_dir or os.environ.get("ORCH_STATE_DIR")
        return Path(d).resolve() if d else self.project_root / ".orch"

    @property
    def runs_dir(self) -> Path:
        """Local `runs/` (pulled results)."""
        return self.project_root / "runs"

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.state_dir / "state.db")
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
