"""A typed client of the Vast.ai REST API (httpx), and where its API key comes from.

Everything goes through `VastClient._request`: Bearer auth, JSON in and out, 429/502/503/504
retried with a growing backoff plus jitter (Vast's 429 carries no Retry-After), and every other
error turned into a `VastApiError` (a `ProviderError`) that carries Vast's own message. The key
lives only in the httpx client's default headers: it never appears in a repr, an exception, a
log line, a URL or argv. The base URL is the only difference between Vast and the test server.

    ProviderError
    └── VastApiError        status, error code, Vast's msg, and new_contract when a failed
                            create still made an instance (a bid that was too low)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from state.errors import ConfigError, ProviderError

DEFAULT_API_URL = "https://console.vast.ai"
RETRY_STATUS = frozenset({429, 502, 503, 504})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


# -- the key ------------------------------------------------------------------------------------
class ApiKey:
    """The account API key. Its repr and str never show the value; `reveal()` is explicit."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ApiKey(source={self.source!r}, value=****)"

    __str__ = __repr__


def key_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The official CLI's key files, in lookup order (after `VAST_API_KEY`)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return [xdg / "vastai" / "vast_api_key", home / ".vast_api_key"]


def find_api_key(env: Mapping[str, str] | None = None) -> ApiKey:
    """`VAST_API_KEY`, then `$XDG_CONFIG_HOME/vastai/vast_api_key`, then `~/.vast_api_key`."""
    env = os.environ if env is None else env
    value = (env.get("VAST_API_KEY") or "").strip()
    if value:
        return ApiKey(value, "VAST_API_KEY")
    for path in key_paths(env):
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read the Vast API key file {path}: {exc.strerror}") from exc
        if value:
            return ApiKey(value, str(path))
    raise ConfigError(
        "no Vast API key found",
        hint="set VAST_API_KEY, or save the key with `vastai set api-key KEY` "
        f"(it writes {key_paths(env)[0]}); never put it in orch.toml",
    )


# -- typed answers ------------------------------------------------------------------------------
class Offer(BaseModel):
    """One row of `POST /api/v0/bundles/`."""

    model_config = ConfigDict(extra="ignore")
    id: int
    machine_id: int | None = None
    gpu_name: str = ""
    num_gpus: int = 0
    gpu_ram: float = 0.0  # MB
    cpu_cores_effective: float | None = None
    cpu_ram: float | None = None
    disk_space: float = 0.0  # GB
    dph_total: float = 0.0
    dph_base: float | None = None
    storage_cost: float | None = None
    min_bid: float | None = None
    reliability2: float = 0.0
    geolocation: str | None = None
    direct_port_count: int = 0
    inet_down: float | None = None
    cuda_max_good: float | None = None
    verified: bool | None = None
    rentable: bool | None = None


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
    start_date: float | None = None  # epoch seconds
    gpu_name: str | None = None
    num_gpus: int | None = None
    disk_space: float | None = None
    public_ipaddr: str | None = None
    ports: dict[str, Any] | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    is_bid: bool | None = None
    geolocation: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Instance:
        inst = cls.model_validate(data)
        inst.raw = dict(data)
        return inst

    def ssh_endpoint(self) -> SshEndpoint | None:
        """Direct when `ports["22/tcp"]` exists, else Vast's proxy; never a mix of the two."""
        mapped = (self.ports or {}).get("22/tcp")
        if mapped and self.public_ipaddr:
            first = mapped[0] if isinstance(mapped, list) else mapped
            port = first.get("HostPort") if isinstance(first, dict) else None
            if port:
                return SshEndpoint(self.public_ipaddr.strip(), int(port), "direct")
        if self.ssh_host and self.ssh_port:
            return SshEndpoint(self.ssh_host, int(self.ssh_port), "proxy")
        return None

    @property
    def outbid(self) -> bool:
        """`cur_state == intended_status == next_state == "stopped"`: preempted (if a bid)."""
        return self.cur_state == self.intended_status == self.next_state == "stopped"


# -- errors -------------------------------------------------------------------------------------
class VastApiError(ProviderError):
    """Vast refused a request; `code` is Vast's error code (`no_such_ask`, ...)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str = "",
        new_contract: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.new_contract = new_contract
        super().__init__(message, hint=hint)


# -- the client ---------------------------------------------------------------------------------
def check_api_url(url: str) -> str:
    """https anywhere; plain http only to loopback (a test server), never the key in clear."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return url.rstrip("/")
    raise ConfigError(
        f"api_url {url!r} is not usable",
        hint="use https://console.vast.ai (plain http is allowed only to 127.0.0.1, for tests)",
    )


def _encode_query(params: Mapping[str, Any]) -> dict[str, str]:
    """As the official CLI: strings as they are, everything else JSON-encoded (httpx quotes)."""
    return {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items() if v is not None
    }


class VastClient:
    """The Vast.ai REST API. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        api_url: str,
        key: ApiKey,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_url = check_api_url(api_url)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._secret = key.reveal()
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self._secret}", "Accept": "application/json"},
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,  # a redirect must not carry the key elsewhere
        )

    @classmethod
    def from_config(
        cls, api_url: str, env: Mapping[str, str] | None = None, **kw: Any
    ) -> VastClient:
        return cls(api_url, find_api_key(env), **kw)

    def __repr__(self) -> str:
        return f"VastClient({self.api_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        """Growing delay with jitter: base * 2^attempt, capped, times a factor in [0.5, 1.5)."""
        return min(self.backoff_max_s, self.backoff_s * (2**attempt)) * (0.5 + random.random())

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "****") if self._secret else text

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = True,
    ) -> Any:
        where = f"{method} {path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._http.request(
                    method,
                    path,
                    params=_encode_query(params or {}),
                    json=body if body is not None else None,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The request never reached Vast: always safe to try again.
                last = f"cannot connect to {self.api_url} ({type(exc).__name__})"
            except httpx.TimeoutException as exc:
                if not idempotent:
                    raise ProviderError(
                        f"Vast did not answer {where} in time",
                        hint="it may have been done anyway: check `orch instances`",
                    ) from exc
                last = f"no answer from {self.api_url} in time"
            except httpx.HTTPError as exc:
                raise ProviderError(
                    f"Vast request {where} failed: {self._scrub(str(exc))}"
                ) from exc
            else:
                if resp.status_code not in RETRY_STATUS:
                    return self._decode(resp, where)
                last = f"HTTP {resp.status_code}: {self._scrub(resp.text[:200])}"
            if attempt < self.max_retries:
                self._sleep(self.backoff(attempt))
        raise ProviderError(
            f"Vast {where} kept failing after {self.max_retries + 1} tries: {last}",
            hint="Vast may be rate limiting or down; try again in a minute",
        )

    def _decode(self, resp: httpx.Response, where: str) -> Any:
        try:
            data: Any = resp.json()
        except ValueError:
            data = None
        failed = resp.status_code >= 400 or (
            isinstance(data, dict) and data.get("success") is False
        )
        if not failed:
            if data is None:
                raise ProviderError(f"Vast answered {where} with something that is not JSON")
            return data
        body = data if isinstance(data, dict) else {}
        code = str(body.get("error") or "")
        msg = str(body.get("msg") or body.get("error") or resp.text[:200] or resp.reason_phrase)
        contract = body.get("new_contract")
        hint = None
        if resp.status_code in (401, 403):
            hint = "check the Vast API key (VAST_API_KEY or ~/.config/vastai/vast_api_key)"
        raise VastApiError(
            f"Vast refused {where}: {self._scrub(msg)} (HTTP {resp.status_code}{', ' + code if code else ''})",
            status=resp.status_code,
            code=code,
            new_contract=int(contract)
            if isinstance(contract, (int, str)) and str(contract).isdigit()
            else None,
            hint=hint,
        )

    # -- calls ------------------------------------------------------------------------------
    def check_key(self) -> dict[str, Any]:
        """`GET /api/v0/users/current/`: the account, or VastApiError for a bad key."""
        data = self._request("GET", "/api/v0/users/current/")
        return data if isinstance(data, dict) else {}

    def search_offers(self, query: dict[str, Any]) -> list[Offer]:
        """`POST /api/v0/bundles/` with a query built by `offers.build_query`."""
        data = self._request("POST", "/api/v0/bundles/", body=query)
        return [Offer.model_validate(o) for o in (data.get("offers") or [])]

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str,
        env: dict[str, str] | None = None,
        bid_dph: float | None = None,
    ) -> int:
        """`PUT /api/v0/asks/{offer_id}/`; `bid_dph` makes it interruptible. Returns the id.

        A failed create can still have made an instance (a bid that was too low makes a stopped
        one): the VastApiError then carries `new_contract`, which the caller must destroy.
        """
        body: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "disk": float(disk_gb),
            "label": label,
            "env": dict(env or {}),
            "onstart": onstart,
            "runtype": "ssh_direc ssh_proxy",
        }
        if bid_dph is not None:
            body["price"] = round(float(bid_dph), 6)
        data = self._request("PUT", f"/api/v0/asks/{int(offer_id)}/", body=body, idempotent=False)
        contract = data.get("new_contract") if isinstance(data, dict) else None
        if contract is None:
            raise ProviderError(
                f"Vast accepted offer {offer_id} but named no instance (answer: {data!r:.200})"
            )
        return int(contract)

    def show_instance(self, instance_id: int) -> Instance | None:
        """`GET /api/v0/instances/{id}/?owner=me`; None when Vast no longer knows it."""
        try:
            data = self._request(
                "GET", f"/api/v0/instances/{int(instance_id)}/", params={"owner": "me"}
            )
        except VastApiError as exc:
            if exc.code == "no_such_instance" or exc.status == 404:
                return None
            raise
        inst = data.get("instances") if isinstance(data, dict) else None
        if isinstance(inst, list):  # tolerate the list shape some versions answer
            inst = next((i for i in inst if int(i.get("id", -1)) == int(instance_id)), None)
        return Instance.parse(inst) if isinstance(inst, dict) else None

    def iter_instances(self, page_size: int = 25) -> Iterator[Instance]:
        """`GET /api/v1/instances/`, following `next_token` (keyset pages of at most 25)."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            data = self._request(
                "GET",
                "/api/v1/instances/",
                params={"limit": min(page_size, 25), "after_token": token},
            )
            for item in data.get("instances") or []:
                yield Instance.parse(item)
            token = data.get("next_token")
            if not token or token in seen:  # a repeated token would loop forever
                return
            seen.add(token)

    def list_instances(self) -> list[Instance]:
        return list(self.iter_instances())

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """`POST /api/v0/instances/{id}/ssh/`: the key reaches a running instance's authorized_keys."""
        self._request(
            "POST",
            f"/api/v0/instances/{int(instance_id)}/ssh/",
            body={"ssh_key": public_key.strip()},
        )

    def set_state(self, instance_id: int, state: str) -> None:
        if state not in ("stopped", "running"):
            raise ValueError(f"state must be 'stopped' or 'running', not {state!r}")
        self._request("PUT", f"/api/v0/instances/{int(instance_id)}/", body={"state": state})

    def stop_instance(self, instance_id: int) -> None:
        self.set_state(instance_id, "stopped")

    def start_instance(self, instance_id: int) -> None:
        self.set_state(instance_id, "running")

    def label_instance(self, instance_id: int, label: str) -> None:
        self._request("PUT", f"/api/v0/instances/{int(instance_id)}/", body={"label": label})

    def destroy_instance(self, instance_id: int) -> bool:
        """`DELETE /api/v0/instances/{id}/`: True if destroyed now, False if already gone."""
        try:
            self._request("DELETE", f"/api/v0/instances/{int(instance_id)}/", body={})
        except VastApiError as exc:
            if exc.code == "no_such_instance" or exc.status == 404:
                return False
            raise
        return True
