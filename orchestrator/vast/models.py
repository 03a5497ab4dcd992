"""Typed rows of the Vast.ai API as the service really answers them, and what their states mean.

Sources (vast-ai/vast-cli, vast-ai/docs, 2026-08):
- offer rows: `vastai/data/offer.py` types nearly every field `Optional` (`gpu_ram`, `dph_total`,
  `reliability`, `direct_port_count`, `duration` ... can be null); the search filter and the
  table column of reliability are `reliability` (`vastai/api/query.py`, `vastai/cli/display.py`).
- instance rows: `vastai/data/instance.py` types `ports` as `Optional[str]`, and the docs'
  `api-reference/openapi/yaml/show_instance.yaml` shows it as a list of ints: `ports` is a dict
  only on some instances.
- states: `cli/reference/show-instance.mdx` (docs): `actual_status` `unknown` is "no recent
  heartbeat from the host", `offline` is "computed, not stored"; `intended_status` is "the
  user's desired target state"; `cur_state` is the machine contract's state.
  `vastai/SKILL.md`: "When outbid, the instance moves to `stopped` (not destroyed) ... Resume by
  raising the bid".

Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from state.errors import ProviderError

_M = TypeVar("_M", bound=BaseModel)

#: Heartbeat states: the host is not heard from; the instance can come back by itself.
HEARTBEAT_STATES = frozenset({"unknown", "offline"})


def _lenient(v: Any) -> Any:
    """A value of an unexpected shape (a dict where a number belongs) reads as unknown."""
    return None if isinstance(v, (dict, list)) else v


class Offer(BaseModel):
    """One row of `POST /api/v0/bundles/`. Every field but `id` may be null (unknown)."""

    model_config = ConfigDict(extra="ignore")
    id: int
    machine_id: int | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None
    gpu_ram: float | None = None  # MB
    cpu_cores_effective: float | None = None
    cpu_ram: float | None = None
    disk_space: float | None = None  # GB
    dph_total: float | None = None
    dph_base: float | None = None
    storage_cost: float | None = None
    min_bid: float | None = None
    reliability: float | None = None  # what the `reliability` filter and the CLI's "R" column use
    reliability2: float | None = None  # an instance's field; on offers not used by orch
    geolocation: str | None = None
    direct_port_count: int | None = None
    inet_down: float | None = None
    cuda_max_good: float | None = None
    verified: bool | None = None
    rentable: bool | None = None
    external: bool | None = None
    duration: float | None = None  # seconds the host's contract allows (the CLI shows days)

    @field_validator("*", mode="before")
    @classmethod
    def _odd_shapes(cls, v: Any) -> Any:
        return _lenient(v)


def _validate(model: type[_M], data: Any) -> _M:
    """Validate a row; a field of an unexpected type reads as null (unknown) instead of failing
    the row. Raises ValidationError only when the row is not a dict or `id` is unusable."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        if not isinstance(data, dict):
            raise
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        if "id" in bad or not bad:
            raise
        return model.model_validate({k: v for k, v in data.items() if k not in bad})


def parse_offers(rows: Any) -> tuple[list[Offer], int]:
    """(offers, how many rows were unusable): one odd row never aborts a whole search."""
    offers: list[Offer] = []
    bad = 0
    for row in rows if isinstance(rows, list) else []:
        try:
            offers.append(_validate(Offer, row))
        except ValidationError:
            bad += 1
    return offers, bad


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    kind: str  # "direct" (public_ipaddr + ports["22/tcp"]) or "proxy" (ssh_host:ssh_port)


class Instance(BaseModel):
    """One instance as `show`/`list` return it (only the fields orch uses are typed)."""

    model_config = ConfigDict(extra="ignore")
    id: int
    label: str | None = None
    machine_id: int | None = None
    actual_status: str | None = None
    intended_status: str | None = None
    cur_state: str | None = None
    next_state: str | None = None
    status_msg: str | None = None
    dph_total: float | None = None
    min_bid: float | None = None
    start_date: float | None = None  # epoch seconds: the contract's start, not the last start
    uptime_mins: float | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None
    disk_space: float | None = None
    public_ipaddr: str | None = None
    ports: Any = None  # a dict {"22/tcp": [{"HostPort": ...}]}, a list, a string or null
    ssh_host: str | None = None
    ssh_port: int | None = None
    is_bid: bool | None = None
    geolocation: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @field_validator(
        "label", "actual_status", "intended_status", "cur_state", "next_state", "status_msg",
        "dph_total", "min_bid", "start_date", "uptime_mins", "gpu_name", "num_gpus",
        "disk_space", "public_ipaddr", "ssh_host", "ssh_port", "is_bid", "geolocation",
        "machine_id", mode="before",
    )  # fmt: skip
    @classmethod
    def _odd_shapes(cls, v: Any) -> Any:
        return _lenient(v)

    @classmethod
    def parse(cls, data: Any) -> Instance:
        """A row of Vast's answer; ProviderError (one line) when it is not an instance at all."""
        try:
            inst = _validate(cls, data)
        except ValidationError:
            # Never echo the row: it carries tokens (jupyter_token, instance_api_key).
            raise ProviderError("Vast answered with an instance row orch cannot read") from None
        inst.raw = dict(data)
        return inst

    def ssh_endpoint(self) -> SshEndpoint | None:
        """Direct when `ports["22/tcp"]` exists, else Vast's proxy; never a mix of the two."""
        mapped = self.ports.get("22/tcp") if isinstance(self.ports, dict) else None
        if mapped and self.public_ipaddr:
            first = mapped[0] if isinstance(mapped, list) and mapped else mapped
            port = first.get("HostPort") if isinstance(first, dict) else None
            if port and str(port).isdigit():
                return SshEndpoint(self.public_ipaddr.strip(), int(port), "direct")
        if self.ssh_host and self.ssh_port:
            return SshEndpoint(self.ssh_host, int(self.ssh_port), "proxy")
        return None

    def stop_kind(self, *, interruptible: bool = False) -> str | None:
        """Why the instance is stopped, or None while it is not.

        `user`: someone asked for the stop (you, the console, or orch's `idle_action = "stop"`):
        `intended_status` is `stopped`. `outbid`: the contract is stopped (`cur_state` and
        `next_state`) while `intended_status` is still `running`, on a bid. `host`: the same
        on an on-demand rental (the host or Vast stopped it). A stopped instance that is
        scheduled to run again (`next_state` running) is starting, not stopped.
        """
        if self.intended_status == "stopped" and (
            self.actual_status == "stopped" or self.cur_state == "stopped"
        ):
            return "user"
        if (
            self.intended_status == "running"
            and self.cur_state == "stopped"
            and self.next_state in ("stopped", None)
        ):
            return "outbid" if interruptible or self.is_bid else "host"
        if self.actual_status == "stopped" and self.intended_status not in ("running",):
            return "user"
        return None

    @property
    def outbid(self) -> bool:
        """Stopped by Vast while the user still wants it running (preempted, if a bid)."""
        return self.stop_kind(interruptible=True) == "outbid"
