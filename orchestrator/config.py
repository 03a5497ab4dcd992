"""`orch.toml`: typed, validated, with an embedded default (target `local`, profile `tiny`).

Lookup: `--config PATH`, else `$ORCH_CONFIG`, else `./orch.toml` (the project root), else the
embedded default. Every section forbids unknown keys, so a typo is an error that names the file
and the key. Secrets never live here: they come from the environment (`VAST_API_KEY`, ...);
alert URLs may reference environment variables as `${NAME}`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.alerturls import check_urls
from state.errors import ConfigError
from state.names import check_name
from state.runtime_contract import DEFAULT_IMAGE
from state.suggest import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "orch.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MonitorSettings(_Section):
    """Cadence and thresholds of `orch watch` (per target, overridable per stage)."""

    interval_s: float = Field(5.0, gt=0, description="seconds between polls of a target")
    jitter_s: float = Field(1.0, ge=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    command_timeout_s: float = Field(15.0, gt=0)
    misfire_grace_s: float = Field(3600.0, gt=0, description="a laptop that slept still polls")
    unreachable_alert_after_s: float = Field(120.0, ge=0)
    stale_after_s: float | None = Field(
        None, gt=0, description="override the stage's heartbeat limit"
    )
    stop_on_timeout: bool = False
    pull_on_success: bool = True
    pull_on_failure: bool = False
    launch_next_stage: bool = False
    pull_checkpoints_every_s: float = Field(
        0.0,
        ge=0,
        description="while a training run is active, pull its new checkpoints this often "
        "(0: off); an auto-relaunch resumes from them",
    )
    provider_check_s: float = Field(
        60.0, gt=0, description="at most one provider call per instance per this"
    )
    pull_retry_s: float = Field(
        60.0, gt=0, description="a failed auto-pull is tried again after this (box answering)"
    )
    pull_backoff_cap_s: float = Field(
        600.0, gt=0, description="longest wait between pulls of a box that does not answer"
    )
    pull_stuck_alert_after_s: float = Field(
        900.0, ge=0, description="one `pull_stuck` alert once no pull has worked for this long"
    )
    push: bool = Field(
        True,
        description="the box's agent pushes changes as they happen (falls back to polling by "
        "itself where the agent cannot)",
    )
    push_poll_s: float = Field(
        30.0, gt=0, description="while pushes arrive, a full poll as a safety net this often"
    )
    push_heartbeat_s: float = Field(
        2.0, gt=0, description="the agent's heartbeat when nothing changed (silence: unreachable)"
    )
    push_progress_s: float = Field(
        1.0, ge=0, description="progress-only changes (status.json) pushed at most this often"
    )


class _TargetBase(_Section):
    workdir: str | None = None
    python: str | None = Field(
        None, description="a ready interpreter on the target: skip bootstrap"
    )
    monitor: MonitorSettings | None = None
    env: dict[str, str] = Field(default_factory=dict, description="non-secret env for runs")
    forward_env: list[str] = Field(
        default_factory=list,
        description="names of secret env vars (HF_TOKEN, WANDB_API_KEY) sent to runs via a 0600 file",
    )
    forward_hf_token: bool = Field(
        True,
        description="send HF_TOKEN to runs (like forward_env) whenever it is set here, so gated "
        "hub models load without listing it; false: only what forward_env names",
    )


class LocalTarget(_TargetBase):
    kind: Literal["local"] = "local"


class SshTarget(_TargetBase):
    """A box over ssh. `host` may be a `Host` alias of the ssh_config, whose HostName, User,
    Port, IdentityFile and ProxyJump then apply; a key set here overrides the ssh_config."""

    kind: Literal["ssh"] = "ssh"
    host: str
    port: int | None = Field(None, ge=1, le=65535, description="default: ssh_config, else 22")
    user: str | None = Field(None, description="default: ssh_config, else root")
    identity_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = Field(
        None,
        description="the ssh_config file to read (like `ssh -F`); default ~/.ssh/config and "
        "/etc/ssh/ssh_config",
    )

    @field_validator("identity_file", "known_hosts", "ssh_config")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return os.path.expanduser(v) if v else v


_SLURM_NAME_RE = r"^[A-Za-z0-9_.+-]{1,64}$"


class SlurmTarget(SshTarget):
    """A Slurm cluster: its login node is reached exactly as an `ssh` target (code sync,
    bootstrap into `workdir` on the shared filesystem, the agent, host-key pinning); stages are
    submitted with `sbatch` (docs/slurm.md). `env` also reaches the login-node commands (e.g.
    `SLURM_CONF` where the cluster's config is not in /etc/slurm)."""

    kind: Literal["slurm"] = "slurm"  # type: ignore[assignment]
    partition: str | None = Field(None, pattern=_SLURM_NAME_RE, description="sbatch --partition")
    account: str | None = Field(None, pattern=_SLURM_NAME_RE, description="sbatch --account")
    qos: str | None = Field(None, pattern=_SLURM_NAME_RE, description="sbatch --qos")
    cpus_per_task: int | None = Field(None, ge=1, description="sbatch --cpus-per-task")
    mem: str | None = Field(
        None, pattern=r"^[0-9]{1,9}[KMGT]?$", description="sbatch --mem per node, e.g. 32G"
    )
    gpu_type: str | None = Field(
        None, pattern=_SLURM_NAME_RE, description="gres type: --gres=gpu:TYPE:N (e.g. a100)"
    )
    signal_before_s: int = Field(
        300,
        ge=0,
        le=65535,
        description="USR1 to the job this long before its time limit (--signal=B:USR1@N); 0: none",
    )
    requeue: bool = Field(
        False, description="--requeue: Slurm reruns the job after a node failure or preemption"
    )
    time_margin_s: float = Field(
        60.0, ge=0, description="added to the stage timeout for --time (whole minutes)"
    )
    sbatch_args: list[str] = Field(
        default_factory=list, description="more sbatch options, each one `--name=value` item"
    )

    @field_validator("sbatch_args")
    @classmethod
    def _check_args(cls, v: list[str]) -> list[str]:
        for i, a in enumerate(v):
            if not a.startswith("--") or any(c in a for c in "\n\r\0"):
                raise ValueError(f"sbatch_args[{i}] {a!r}: use one `--option=value` per item")
        return v


class VastOffer(_Section):
    """Offer filters for `orch up` (see docs/vast.md)."""

    gpu_names: list[str] = Field(default_factory=lambda: ["RTX 4090"])
    num_gpus: int = Field(1, ge=1)
    min_gpu_ram_gb: float = 24.0
    max_dph: float = Field(1.0, gt=0, description="max $/hour, all-in")
    min_reliability: float = Field(0.98, ge=0, le=1)
    min_disk_gb: float = 80.0
    min_cuda: float | None = 12.1
    verified: bool = True
    direct_ssh: bool = False
    order: str = "score"
    limit: int = 20


class VastTarget(_TargetBase):
    kind: Literal["vast"] = "vast"
    api_url: str = "https://console.vast.ai"
    identity_file: str | None = None
    known_hosts: str | None = None
    user: str = "root"
    offer: VastOffer = Field(default_factory=VastOffer)
    image: str = Field(
        DEFAULT_IMAGE,
        description="the Docker image; its Python and torch must meet the runtime contract "
        "(state/runtime_contract.py): the bootstrap refuses one that does not",
    )
    disk_gb: float = 80.0
    interruptible: bool = False
    bid_dph: float | None = None
    label_prefix: str = "orch"
    onstart: str = ""
    ready_timeout_s: float = 900.0
    poll_s: float = Field(5.0, gt=0, description="seconds between Vast status polls while waiting")
    idle_minutes: float = 30.0
    idle_action: Literal["alert", "stop", "destroy"] = "alert"
    auto_relaunch: bool = Field(
        False,
        description="relaunch a lost training run on a new box, resuming from its checkpoint",
    )
    max_relaunches: int = Field(2, ge=0, description="relaunches per run chain")
    max_bid_dph: float | None = Field(
        None,
        gt=0,
        description="the most an outbid instance's raised bid may be, $/h (default: offer.max_dph)",
    )
    expected_hours: float | None = Field(
        None,
        gt=0,
        description="how long you will use a box: offers must last that long and the account "
        "must afford it (default: one hour of credit, any contract length)",
    )
    boot_grace_s: float = Field(
        180.0,
        ge=0,
        description="how long a booting instance may stay in a state that usually recovers "
        "(unknown/offline heartbeat, an error status_msg such as a retried image pull)",
    )
    heartbeat_grace_s: float = Field(
        600.0,
        ge=0,
        description="how long Vast may report a running instance unknown/offline before its "
        "runs are lost",
    )

    @field_validator("identity_file", "known_hosts")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return os.path.expanduser(v) if v else v


TargetConfig = Annotated[
    LocalTarget | SshTarget | SlurmTarget | VastTarget, Field(discriminator="kind")
]


def _default_targets() -> dict[str, LocalTarget | SshTarget | VastTarget]:
    return {"local": LocalTarget()}


class ExperimentSettings(_Section):
    profile: str = "tiny"
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="per-key overrides for every stage"
    )


class AlertSettings(_Section):
    urls: list[str] = Field(
        default_factory=list, description="Apprise URLs; ${ENV} expanded at send time"
    )
    command: list[str] | None = Field(
        None, description="a local command hook; the alert JSON on stdin"
    )
    on: list[str] = Field(
        default_factory=lambda: [
            "succeeded",
            "failed",
            "crashed",
            "hung",
            "timed_out",
            "lost",
            "unreachable",
            "reachable",
            "host_key",
            "pull_stuck",
            "idle",
            "relaunched",
            "relaunch_failed",
        ],
    )
    retry_max: int = Field(8, ge=0)

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        # A malformed URL fails at load, naming the key; the URL itself is redacted.
        try:
            check_urls(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("command")
    @classmethod
    def _check_command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0].strip()):
            raise ValueError("alerts.command must be a non-empty list: [program, arg, ...]")
        return v


class SyncSettings(_Section):
    """What code sync (orchestrator/codesync.py) must never send, on top of its built-in list."""

    exclude: list[str] = Field(
        default_factory=list,
        description="patterns never sent to a box, whatever git says (`secrets/`, `*.key`, "
        "`/conf/local.toml`); see docs/configuration.md",
    )

    @field_validator("exclude")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for i, pat in enumerate(v):
            if not pat.strip("/").strip() or "\0" in pat or "\n" in pat:
                raise ValueError(f"sync.exclude[{i}] {pat!r}: not a usable pattern")
        return v


class OrchConfig(_Section):
    default_target: str = "local"
    targets: dict[str, TargetConfig] = Field(default_factory=lambda: _default_targets())
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    #: Where the config came from (None = embedded default); the project root is its folder.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        # `[targets.local]` needs no fields: a table named "local" without `kind` is local.
        if isinstance(data, dict) and isinstance(data.get("targets"), dict):
            targets = dict(data["targets"])
            for name, t in targets.items():
                if isinstance(t, dict) and "kind" not in t:
                    if name == "local":
                        targets[name] = {**t, "kind": "local"}
                    else:
                        raise ValueError(
                            f'targets.{name}: missing `kind` (one of "local", "ssh", "slurm", "vast")'
                        )
            data = {**data, "targets": targets}
        return data

    @model_validator(mode="after")
    def _check(self) -> OrchConfig:
        for name in self.targets:
            try:
                check_name(name, "target name")
            except ConfigError as exc:  # pydantic wraps ValueError with the key's location
                raise ValueError(exc.message) from None
        if "local" not in self.targets:
            self.targets["local"] = LocalTarget()
        if self.default_target not in self.targets:
            raise ValueError(
                f"default_target {self.default_target!r} is not one of the targets: {sorted(self.targets)}"
            )
        return self

    def target(self, name: str | None) -> tuple[str, LocalTarget | SshTarget | VastTarget]:
        name = name or self.default_target
        if name not in self.targets:
            raise ConfigError(
                f"unknown target {name!r}",
                hint=did_you_mean(
                    name,
                    self.targets,
                    f"known targets: {', '.join(sorted(self.targets))}; add [targets.{name}] to orch.toml",
                ),
            )
        return name, self.targets[name]

    def monitor_for(self, target: str) -> MonitorSettings:
        t = self.targets.get(target)
        if t is not None and t.monitor is not None:
            merged = {**self.monitor.model_dump(), **t.monitor.model_dump(exclude_unset=True)}
            return MonitorSettings.model_validate(merged)
        return self.monitor


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys orch.toml allows at `loc` (a pydantic error location under OrchConfig; a target's
    `kind` tag picks its model), for "did you mean"; empty when the path cannot be followed."""
    tp: Any = OrchConfig
    parts = [str(p) for p in loc]
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        if get_origin(tp) in (Union, UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            tagged = {_kind_of(a): a for a in members}
            if parts and parts[0] in tagged:
                tp = tagged[parts.pop(0)]
                continue
            if len(members) != 1:
                return []
            tp = members[0]
            continue
        if not parts:
            break
        part = parts.pop(0)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        else:
            return []
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [n for n, f in tp.model_fields.items() if not f.exclude]
    return []


def _kind_of(model: Any) -> str:
    field = getattr(model, "model_fields", {}).get("kind")
    return str(field.default) if field is not None else ""


def _format_validation(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        guess = did_you_mean(str(err["loc"][-1]), _keys_at(err["loc"][:-1]))
        msg = "unknown key (" + (guess or "check the spelling;")
        msg += " see docs/configuration.md for the allowed keys)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {loc or '(top level)'}: {msg}{more}"


def find_config_path(
    explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None
) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("ORCH_CONFIG")
    if env:
        return Path(env)
    candidate = (cwd or Path.cwd()) / CONFIG_FILE
    return candidate if candidate.exists() else None


def parse_config(data: dict[str, Any], where: str = "embedded default") -> OrchConfig:
    try:
        return OrchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, where)) from exc


def load_config(
    explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None
) -> OrchConfig:
    """Load and validate orch.toml (or the embedded default when there is none)."""
    path = find_config_path(explicit, cwd)
    if path is None:
        return OrchConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {path} does not exist", hint="fix --config / ORCH_CONFIG"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    cfg = parse_config(data, str(path))
    cfg.source = path.resolve()
    return cfg
