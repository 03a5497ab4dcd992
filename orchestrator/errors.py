"""Re-export of the one error tree (defined in `state.errors` so both sides share it)."""

from state.errors import (
    ConfigError,
    HostKeyError,
    LaunchError,
    OrchError,
    ProtocolError,
    ProviderError,
    RemoteCommandError,
    StageError,
    TargetError,
    UnreachableError,
    VerifyError,
)

__all__ = [
    "ConfigError",
    "HostKeyError",
    "LaunchError",
    "OrchError",
    "ProtocolError",
    "ProviderError",
    "RemoteCommandError",
    "StageError",
    "TargetError",
    "UnreachableError",
    "VerifyError",
]
