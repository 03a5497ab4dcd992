"""Where the Vast API key comes from, as the official client looks for it (vast-ai/vast-cli):

1. `VAST_API_KEY` (`vastai/cli/main.py`: `--api-key` defaults to it);
2. the two-factor session key `$XDG_CONFIG_HOME/vastai/vast_tfa_key`, when that file exists
   (`vastai/cli/main.py`: `key_file = TFAKEY_FILE if os.path.exists(TFAKEY_FILE) else
   APIKEY_FILE`), with the normal key behind it for when the session expires;
3. `$XDG_CONFIG_HOME/vastai/vast_api_key` (`vastai set api-key KEY` writes it);
4. the legacy `~/.vast_api_key` (`vastai/cli/util.py` copies it to 3 when 3 is missing).

The value never appears in a repr, a str, an error or a log line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from state.errors import ConfigError


class ApiKey:
    """The account API key. Its repr and str never show the value; `reveal()` is explicit.

    `fallback` is the normal key behind a two-factor session key, used once the session expires.
    """

    __slots__ = ("_value", "fallback", "source")

    def __init__(self, value: str, source: str, fallback: ApiKey | None = None) -> None:
        self._value = value
        self.source = source
        self.fallback = fallback

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r}, value=****)"

    __str__ = __repr__


def _config_dir(env: Mapping[str, str]) -> Path:
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "vastai"


def key_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The official CLI's key files, in lookup order (after `VAST_API_KEY` and the session key)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    return [_config_dir(env) / "vast_api_key", home / ".vast_api_key"]


def tfa_key_path(env: Mapping[str, str] | None = None) -> Path:
    """Where `vastai tfa login` saves the two-factor session key."""
    return _config_dir(os.environ if env is None else env) / "vast_tfa_key"


def _read_key(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as exc:
        raise ConfigError(f"cannot read the Vast API key file {path}: {exc.strerror}") from exc


def find_api_key(env: Mapping[str, str] | None = None) -> ApiKey:
    """`VAST_API_KEY`, then the session key `vast_tfa_key`, then `vast_api_key`, then
    `~/.vast_api_key` (the official CLI's order)."""
    env = os.environ if env is None else env
    value = (env.get("VAST_API_KEY") or "").strip()
    if value:
        return ApiKey(value, "VAST_API_KEY")
    normal: ApiKey | None = None
    for path in key_paths(env):
        if text := _read_key(path):
            normal = ApiKey(text, str(path))
            break
    tfa = tfa_key_path(env)
    if text := _read_key(tfa):
        return ApiKey(text, str(tfa), fallback=normal)
    if normal is not None:
        return normal
    raise ConfigError(
        "no Vast API key found",
        hint="set VAST_API_KEY, or save the key with `vastai set api-key KEY` "
        f"(it writes {key_paths(env)[0]}); never put it in orch.toml",
    )
