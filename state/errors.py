"""The one error tree of orch.

    OrchError                      every error a user may see; `str(e)` is one helpful line
    ├── ConfigError                orch.toml, --set overrides, profiles, unknown names
    ├── StageError                 unknown stage, missing upstream run, failed dependency
    ├── TargetError                a target could not do what was asked
    │   ├── UnreachableError       connect/command deadline passed; the box may come back
    │   ├── HostKeyError           a pinned host key changed: refuse, never accept silently
    │   └── RemoteCommandError     a remote command exited non-zero where it must not
    ├── LaunchError                launch could not start the run (nothing is left half-started)
    ├── VerifyError                a pulled file does not match its manifest entry
    ├── ProtocolError              a run-directory file is unusable where it must be usable
    ├── ProviderError              a cloud provider (Vast) refused or failed a request
    └── WorkerError                the worker refuses its input (bad model, data, mask, ...)

Third-party exceptions are translated at the border with ``raise XError(...) from exc`` so the
CLI can catch ``OrchError`` alone, print one red line and exit non-zero.
"""

from __future__ import annotations


class OrchError(Exception):
    """Base of every error orch reports to a user. The message says what and what to do."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(OrchError):
    """orch.toml, an override or a name given on the command line is wrong."""

    exit_code = 2


class StageError(OrchError):
    """A stage is unknown, or its inputs are missing or failed."""

    exit_code = 2


class TargetError(OrchError):
    """A target (local, ssh, vast box) could not do what was asked."""


class UnreachableError(TargetError):
    """The target did not answer within the deadline; it may come back."""


class HostKeyError(TargetError):
    """The host key differs from the pinned one: possible man-in-the-middle or a new box.
    `offered` is the fingerprint of the key now offered ("" when not known)."""

    def __init__(self, message: str, *, hint: str | None = None, offered: str = "") -> None:
        self.offered = offered
        super().__init__(message, hint=hint)


class RemoteCommandError(TargetError):
    """A command on the target exited non-zero where success was required."""

    def __init__(self, message: str, *, returncode: int, stderr: str = "", hint: str | None = None):
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message, hint=hint)


class LaunchError(OrchError):
    """The run could not be started; nothing half-started is left behind."""


class RuntimeContractError(LaunchError):
    """The target's Python/torch/transformers cannot run the worker (`state.runtime_contract`):
    refused before anything is installed or started, so a launch leaves no run row behind."""


class VerifyError(OrchError):
    """A pulled artifact does not match manifest.json."""


class ProtocolError(OrchError):
    """A run-directory file is missing or unusable where it must be present."""


class ProviderError(OrchError):
    """A cloud provider answered with an error (carries the provider's own message)."""


class WorkerError(OrchError):
    """The worker refuses its input: unloadable model, schema mismatch, unusable mask, ..."""
