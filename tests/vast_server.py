"""A local stand-in for the Vast.ai REST API on 127.0.0.1 (a real HTTP server, no mocks).

It behaves as the official client and the API docs say the service does, not as orch would like
it to (sources: vast-ai/vast-cli `vastai/...`, vast-ai/docs, 2026-08; each behaviour below names
its own). Bearer auth; error bodies `{"success": false, "error": ..., "msg": ...}`; 429 with a
text body and no Retry-After, per endpoint; `no_such_ask`; a too-low bid that still creates a
stopped instance (reported by dstack, not by the official client); `{"instances": null}` for an
instance that does not exist; keyset pages of at most 25 with `select_filters`; nulls in offers;
unknown filter keys ignored; `unknown` -> `loading` -> `running` on a new instance; a create
that can answer slowly; a stop you asked for vs an outbid told apart by `intended_status`; a
raised bid that resumes an outbid instance; an expired two-factor session key.

Its "instances" point their ssh endpoint at a real sshd on loopback (a `Box`): direct
(`public_ipaddr` + `ports["22/tcp"]`) when the offer has a direct port, else Vast's proxy
(`ssh_host:ssh_port`, with `ports` a list, as docs `show_instance.yaml` shows it); both lead to
the same sshd. A new instance starts with an empty authorized_keys (the instance ssh-key call
fills it) and runs its `onstart` script with HOME set to the box's home when it turns `running`.

Controls for tests: `add_offer`, `inject` (canned failures, e.g. 429s, or an answer after
`delay_s`: a create that never answers in time), `preempt` (outbid),
`set_status`, `request_count`, `auth_headers`, `create_bodies`, `instances`, `create_delay_s`,
`min_interval_s`, `credit`, `read_only_keys`, `expired_session_keys`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# docs api-reference/rate-limits-and-errors.mdx: "API requests too frequent: endpoint
# threshold=...", and "The API does not return a `Retry-After` header" (sdk/python/rate-limits).
RATE_LIMIT_TEXT = "API requests too frequent: endpoint threshold=2.0"

# The offer fields Vast filters on (vastai/api/query.py `offers_fields`); a filter on any other
# key (e.g. `reliability2`, commented out there since it was dropped) is ignored, as the
# server ignores it: it filters nothing.
OFFER_FILTER_FIELDS = frozenset(
    {
        "bw_nvlink", "compute_cap", "cpu_arch", "cpu_cores", "cpu_cores_effective", "cpu_ghz",
        "cpu_ram", "cuda_max_good", "datacenter", "direct_port_count", "driver_version",
        "disk_bw", "disk_space", "dlperf", "dlperf_per_dphtotal", "dph_total", "duration",
        "external", "flops_per_dphtotal", "gpu_arch", "gpu_display_active", "gpu_frac",
        "gpu_mem_bw", "gpu_name", "gpu_ram", "gpu_total_ram", "gpu_max_power", "gpu_max_temp",
        "has_avx", "host_id", "id", "inet_down", "inet_down_cost", "inet_up", "inet_up_cost",
        "machine_id", "min_bid", "mobo_name", "num_gpus", "pci_gen", "pcie_bw", "reliability",
        "rentable", "rented", "storage_cost", "static_ip", "total_flops", "ubuntu_version",
        "verification", "verified", "vms_enabled", "geolocation", "cluster_id",
    }
)  # fmt: skip
# Query keys of the search that are not filters (vastai/api/offers.py search_offers).
SEARCH_META = frozenset({"order", "type", "limit", "allocated_storage", "disable_bundling"})


@dataclass
class Box:
    """Where an instance's ssh leads: a real sshd on loopback, its authorized_keys and a home."""

    host: str
    port: int
    home: Path
    authorized_keys: Path | None = None


@dataclass
class _Injection:
    method: str | None
    pattern: re.Pattern[str]
    status: int
    body: Any
    text: str | None
    times: int
    delay_s: float = 0.0


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class VastServer:
    """Use as a context manager; `url` is the base URL to give the client as `api_url`."""

    api_key: str
    box: Box | None = None
    #: show calls a new instance answers `unknown` (no heartbeat from its host yet, docs
    #: show-instance.mdx) before `loading`
    unknown_polls: int = 1
    #: show calls an instance spends in `loading` before it turns `running`
    boot_polls: int = 1
    #: show calls that answer `{"instances": null}` for a just-created instance
    unseen_polls: int = 0
    #: seconds a create waits before answering (the instance exists at once); the official
    #: client allows 120 s "for slow operations like instance creation" (vastai/api/client.py)
    create_delay_s: float = 0.0
    #: per endpoint (method + path) and key: the minimum interval between requests, else 429
    #: (docs rate-limits-and-errors.mdx: "a minimum interval between requests for a given
    #: endpoint and identity"); 0 turns it off
    min_interval_s: float = 0.0
    #: the account's credit in `/users/current` (vastai/cli/display.py user_fields `credit`)
    credit: float | None = 25.0
    #: keys that may read but not change anything: 403 on writes (docs authentication.mdx:
    #: "a scoped key that lacks the required permission"; the body is not documented)
    read_only_keys: set[str] = field(default_factory=set)
    #: two-factor session keys that expired: 404 "Session expired. Please log in again."
    #: (vastai/cli/main.py `_is_tfa_session_expired`)
    expired_session_keys: set[str] = field(default_factory=set)
    instances: dict[int, dict[str, Any]] = field(default_factory=dict)
    offers: dict[int, dict[str, Any]] = field(default_factory=dict)
    auth_headers: list[str] = field(default_factory=list)
    requests: list[_Request] = field(default_factory=list)
    create_bodies: dict[int, dict[str, Any]] = field(default_factory=dict)
    attached_keys: dict[int, list[str]] = field(default_factory=dict)
    onstart_results: dict[int, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    bids: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._injections: list[_Injection] = []
        self._next_id = 1000
        self._next_offer = 500
        self._boot: dict[int, str] = {}  # instance id -> outcome
        self._polls: dict[int, int] = {}
        self._unseen: dict[int, int] = {}
        self._last_call: dict[tuple[str, str, str], float] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> VastServer:
        server = self

        class Handler(_Handler):
            vast = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="vast-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> VastServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- controls -------------------------------------------------------------------------
    def add_offer(self, *, boot: str = "running", direct: bool = True, **fields: Any) -> int:
        """Add a rentable offer; any field may be given as None (vastai/data/offer.py types
        nearly all of them Optional). `boot`: what an instance made from it does: `running`,
        `exited`, `offline`, `heartbeat` (`offline` for a while, then running), `error_msg`
        (loading with an error status_msg for good), `pull_retry` (the same message for a
        while, then running), `never` (stays loading)."""
        with self._lock:
            self._next_offer += 1
            oid = self._next_offer
            offer = {
                "id": oid,
                "machine_id": 7000 + oid,
                "gpu_name": "RTX 4090",
                "num_gpus": 1,
                "gpu_ram": 24564.0,
                "cpu_cores_effective": 16.0,
                "cpu_ram": 64000.0,
                "disk_space": 200.0,
                "dph_total": 0.40,
                "dph_base": 0.35,
                "storage_cost": 0.1,
                "min_bid": 0.20,
                "reliability": 0.995,
                "reliability2": 0.995,
                "geolocation": "Norway, NO",
                "direct_port_count": 10 if direct else 0,
                "inet_down": 900.0,
                "cuda_max_good": 12.4,
                "verified": True,
                "rentable": True,
                "rented": False,
                "external": False,
                "duration": 30 * 86400.0,  # seconds (the CLI shows days: vastai/cli/display.py)
                "_boot": boot,
                "_direct": direct,
            }
            offer.update(fields)
            self.offers[oid] = offer
            return oid

    def inject(
        self,
        status: int,
        *,
        body: Any = None,
        text: str | None = None,
        times: int = 1,
        method: str | None = None,
        path: str = ".*",
        delay_s: float = 0.0,
    ) -> None:
        """Answer the next `times` matching requests with `status` and a canned body, after
        `delay_s` (longer than the client waits: a request that never answers)."""
        with self._lock:
            self._injections.append(
                _Injection(method, re.compile(path), status, body, text, times, delay_s)
            )

    def rate_limit(self, times: int, path: str = ".*") -> None:
        """Answer 429 as Vast does: a text body and no Retry-After."""
        self.inject(429, text=RATE_LIMIT_TEXT, times=times, path=path)

    def preempt(self, instance_id: int, *, min_bid: float | None = None) -> None:
        """An interruptible instance is outbid: Vast stops the contract while the user still
        wants it running (`intended_status` stays `running`; vastai/SKILL.md: "When outbid, the
        instance moves to `stopped` (not destroyed)"). `min_bid`: the machine's new minimum."""
        with self._lock:
            inst = self.instances[instance_id]
            inst.update(actual_status="stopped", cur_state="stopped", next_state="stopped")
            inst["intended_status"] = "running"
            if min_bid is not None:
                inst["min_bid"] = min_bid
            self._boot[instance_id] = "done"

    def set_status(
        self,
        instance_id: int,
        *,
        actual: str | None = None,
        cur: str | None = None,
        intended: str | None = None,
        next_: str | None = None,
        msg: str | None = None,
    ) -> None:
        with self._lock:
            inst = self.instances[instance_id]
            for key, value in (
                ("actual_status", actual),
                ("cur_state", cur),
                ("intended_status", intended),
                ("next_state", next_),
                ("status_msg", msg),
            ):
                if value is not None:
                    inst[key] = value
            self._boot[instance_id] = "done"

    def request_count(self, method: str | None = None, path: str = ".*") -> int:
        pat = re.compile(path)
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and pat.search(r.path)
            )

    def live_ids(self) -> list[int]:
        with self._lock:
            return sorted(self.instances)

    def add_instance(self, **fields: Any) -> int:
        """An instance rented outside orch (e.g. from the web console)."""
        with self._lock:
            iid = self._new_id()
            self.instances[iid] = {
                "id": iid,
                "label": None,
                "actual_status": "running",
                "intended_status": "running",
                "cur_state": "running",
                "next_state": "running",
                "status_msg": "",
                "dph_total": 0.3,
                "min_bid": 0.1,
                "start_date": time.time() - 3600,
                "uptime_mins": None,
                "gpu_name": "RTX 3090",
                "num_gpus": 1,
                "disk_space": 50.0,
                "ssh_host": "127.0.0.1",
                "ssh_port": 1,
                "ports": [],
                "is_bid": False,
                **fields,
            }
            self._boot[iid] = "done"
            return iid

    # -- the API ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _injected(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, auth: str | None
    ) -> _Injection | None:
        """Log the request; the canned answer it gets, if one matches."""
        with self._lock:
            self.requests.append(_Request(method, path, query, body))
            self.auth_headers.append(auth or "")
            for inj in self._injections:
                if inj.times > 0 and (inj.method in (None, method)) and inj.pattern.search(path):
                    inj.times -= 1
                    return inj
        return None

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, auth: str | None
    ) -> tuple[int, Any, str | None]:
        canned = self._injected(method, path, query, body, auth)
        if canned is not None:
            if canned.delay_s > 0:
                time.sleep(canned.delay_s)  # outside the lock: other calls go on meanwhile
            return canned.status, canned.body, canned.text
        with self._lock:
            key = (auth or "").removeprefix("Bearer ")
            if key in self.expired_session_keys:
                return 404, _err("not_found", "Session expired. Please log in again."), None
            if self.min_interval_s > 0:
                endpoint = (method, re.sub(r"\d+", "{id}", path), key)
                now = time.monotonic()
                last = self._last_call.get(endpoint)
                self._last_call[endpoint] = now
                if last is not None and now - last < self.min_interval_s:
                    return 429, None, RATE_LIMIT_TEXT
            if key in self.read_only_keys:
                if method != "GET" and path != "/api/v0/bundles/":
                    return 403, _err("forbidden", "this API key lacks the permission"), None
            elif key != self.api_key:
                return 401, _err("auth_error", "Invalid user key"), None
            status, payload, text = self._route(method, path, query, body)
        if method == "PUT" and path.startswith("/api/v0/asks/") and self.create_delay_s > 0:
            time.sleep(self.create_delay_s)  # made at once, answered late (outside the lock)
        return status, payload, text

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any, str | None]:
        if method == "GET" and path == "/api/v0/users/current/":
            # docs api-reference/openapi/yaml/show_user.yaml: `balance`; the CLI shows `credit`.
            return (
                200,
                {
                    "id": 1,
                    "username": "tester",
                    "email": "t@example.com",
                    "credit": self.credit,
                    "balance": 0.0,
                },
                None,
            )
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self._search(body or {})}, None
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if method == "PUT" and m:
            return self._create(int(m.group(1)), body or {})
        if method == "GET" and path == "/api/v1/instances/":
            return self._list(query)
        m = re.fullmatch(r"/api/v0/instances/bid_price/(\d+)/", path)
        if method == "PUT" and m:
            return self._change_bid(int(m.group(1)), body or {})
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m:
            iid = int(m.group(1))
            if method == "GET":
                if query.get("owner") != ["me"]:
                    return 400, _err("invalid_args", "owner=me is required"), None
                # vastai/api/instances.py show_instance: `row = r.json()["instances"]; if row is
                # None: return None`: a missing instance is `{"instances": null}`, not a 404.
                return 200, {"instances": self._show(iid)}, None
            if method == "DELETE":
                if self.instances.pop(iid, None) is None:
                    return 404, _err("no_such_instance", f"Instance {iid} not found."), None
                return 200, {"success": True}, None
            if method == "PUT":
                return self._update(iid, body or {})
        m = re.fullmatch(r"/api/v0/instances/(\d+)/ssh/", path)
        if method == "POST" and m:
            return self._attach(int(m.group(1)), body or {})
        return 404, _err("not_found", f"no route {method} {path}"), None

    def _search(self, q: dict[str, Any]) -> list[dict[str, Any]]:
        """Filters on known offer fields (SQL-like: a null never meets a comparison), unknown
        keys ignored; `order` is a list of [field, direction] (vastai/api/offers.py)."""
        filters = {k: v for k, v in q.items() if k not in SEARCH_META and k in OFFER_FILTER_FIELDS}
        out = []
        for offer in self.offers.values():
            if all(_match(offer.get(k), cond) for k, cond in filters.items()):
                out.append({k: v for k, v in offer.items() if not k.startswith("_")})
        for fld, direction in reversed(q.get("order") or []):
            if fld == "score":
                out.sort(
                    key=lambda o: (
                        (o.get("reliability") or 0.0) / max(o.get("dph_total") or 0.0, 0.01)
                    ),
                    reverse=True,
                )
            elif fld in OFFER_FILTER_FIELDS:
                out.sort(
                    key=lambda o, f=fld: (o.get(f) is None, o.get(f) or 0),
                    reverse=direction == "desc",
                )
        return out[: int(q.get("limit") or 64)]

    def _create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        offer = self.offers.get(offer_id)
        if offer is None:
            return 404, _err("no_such_ask", "Instance type no longer available."), None
        iid = self._new_id()
        bid = body.get("price")
        low_bid = bid is not None and float(bid) < float(offer.get("min_bid") or 0.0)
        direct = bool(offer["_direct"]) and self.box is not None
        inst: dict[str, Any] = {
            "id": iid,
            "label": body.get("label"),
            "machine_id": offer["machine_id"],
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": None,
            "dph_total": float(bid) if bid is not None else offer["dph_total"],
            "min_bid": offer.get("min_bid"),
            # docs show_instance.yaml: "Instance start time"; it is the contract's start and
            # does not move when the instance is stopped and started again.
            "start_date": time.time(),
            "uptime_mins": None,
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "disk_space": float(body.get("disk") or 0),
            "is_bid": bid is not None,
            "geolocation": offer["geolocation"],
            "image_uuid": body.get("image"),
            "public_ipaddr": self.box.host if self.box else None,
            "ssh_host": self.box.host if self.box else None,
            "ssh_port": self.box.port if self.box else None,
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(self.box.port)}]}
            if direct and self.box
            else [8080],
        }
        self.instances[iid] = inst
        self.create_bodies[iid] = dict(body)
        self._boot[iid] = offer["_boot"]
        self._polls[iid] = 0
        self._unseen[iid] = self.unseen_polls
        del self.offers[offer_id]  # rented
        if self.box is not None and self.box.authorized_keys is not None:
            self.box.authorized_keys.write_text("")  # a fresh box knows no key yet
        if low_bid:
            inst.update(
                actual_status="stopped",
                intended_status="stopped",
                cur_state="stopped",
                next_state="stopped",
                status_msg="bid below the minimum",
            )
            self._boot[iid] = "done"
            return (
                200,
                {
                    **_err(
                        "insufficient_bid",
                        f"Your bid ${bid}/h is below the minimum ${offer['min_bid']}/h",
                    ),
                    "new_contract": iid,
                },
                None,
            )
        return 200, {"success": True, "new_contract": iid}, None

    def _show(self, iid: int) -> dict[str, Any] | None:
        inst = self.instances.get(iid)
        if inst is None:
            return None
        if self._unseen.get(iid, 0) > 0:
            self._unseen[iid] -= 1
            return None
        outcome = self._boot.get(iid, "done")
        if outcome != "done":
            n = self._polls[iid] = self._polls.get(iid, 0) + 1
            transient = outcome in ("heartbeat", "pull_retry")
            if n <= self.unknown_polls:
                # No heartbeat from the new instance's host yet (docs show-instance.mdx).
                inst["actual_status"] = "unknown"
            elif (
                n <= self.unknown_polls + self.boot_polls
                or outcome == "never"
                or (transient and n <= self.unknown_polls + self.boot_polls + 3)
            ):
                inst["actual_status"] = "loading"
                if outcome == "heartbeat":
                    inst["actual_status"] = "offline"
                elif outcome == "pull_retry":
                    inst["status_msg"] = (
                        "Error response from daemon: net/http: TLS handshake timeout, retrying"
                    )
            elif outcome in ("running", "heartbeat", "pull_retry"):
                inst.update(actual_status="running", status_msg="success, running")
                self._boot[iid] = "done"
                self._run_onstart(iid)
            elif outcome == "error_msg":
                inst.update(
                    actual_status="loading",
                    status_msg="Error response from daemon: pull access denied for image",
                )
            else:  # exited, offline
                inst.update(actual_status=outcome, status_msg=f"container {outcome}")
                self._boot[iid] = "done"
        return dict(inst)

    def _run_onstart(self, iid: int) -> None:
        script = (self.create_bodies.get(iid) or {}).get("onstart") or ""
        if self.box is None or not script:
            return
        self.box.home.mkdir(parents=True, exist_ok=True)
        env = {"HOME": str(self.box.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.onstart_results[iid] = subprocess.run(
            ["bash", "-c", script],
            cwd=self.box.home,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any, str | None]:
        """Keyset pages of at most 25 by id, `after_token` = the last page's `next_token`, and
        `select_filters` (vastai/api/instances.py show_instances; labels as `vastai show
        instances --label` sends them, `{"label": {"in": [...]}}`); unknown keys ignored."""
        limit = min(int((query.get("limit") or ["25"])[0]), 25)
        token = (query.get("after_token") or [None])[0]
        after = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        try:
            filters = json.loads((query.get("select_filters") or ["{}"])[0])
        except ValueError:
            return 400, _err("invalid_args", "select_filters is not JSON"), None
        wanted = {k: v for k, v in (filters or {}).items() if k in ("label", "actual_status", "id")}
        ids = [
            i
            for i in sorted(self.instances)
            if i > after and all(_match(self.instances[i].get(k), c) for k, c in wanted.items())
        ]
        page = ids[:limit]
        nxt = (
            base64.urlsafe_b64encode(str(page[-1]).encode()).decode() if len(ids) > limit else None
        )
        return 200, {"instances": [dict(self.instances[i]) for i in page], "next_token": nxt}, None

    def _update(self, iid: int, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        inst = self.instances.get(iid)
        if inst is None:
            return 404, _err("no_such_instance", f"Instance {iid} not found."), None
        if "label" in body:
            inst["label"] = body["label"]
        if body.get("state") == "stopped":
            # A stop you ask for sets intended_status too ("the user's desired target state",
            # docs cli/reference/show-instance.mdx); an outbid leaves it `running` (`preempt`).
            inst.update(
                actual_status="stopped",
                intended_status="stopped",
                cur_state="stopped",
                next_state="stopped",
            )
            self._boot[iid] = "done"
        elif body.get("state") == "running":
            # Started again: scheduled on the same machine, then loading, then running.
            inst.update(intended_status="running", cur_state="running", next_state="running")
            self._boot[iid] = "running"
            self._polls[iid] = self.unknown_polls  # no `unknown` on a restart
        return 200, {"success": True}, None

    def _change_bid(self, iid: int, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        """`PUT /api/v0/instances/bid_price/{id}/` `{"client_id": "me", "price": P}`
        (vastai/api/instances.py change_bid; docs change_bid.yaml: price 0.001..32): a bid at
        or above the machine's minimum resumes the outbid instance on its own disk."""
        inst = self.instances.get(iid)
        if inst is None:
            return 404, _err("no_such_instance", f"Instance {iid} not found."), None
        price = body.get("price")
        if not isinstance(price, (int, float)) or not 0.001 <= price <= 32.0:
            return 400, _err("invalid_args", "Please set a bid price >= 0.001."), None
        self.bids.setdefault(iid, []).append(float(price))
        inst["dph_total"] = float(price)
        if price >= float(inst.get("min_bid") or 0.0) and inst.get("cur_state") == "stopped":
            inst.update(cur_state="running", next_state="running", intended_status="running")
            self._boot[iid] = "running"
            self._polls[iid] = self.unknown_polls
        return 200, {"success": True}, None

    def _attach(self, iid: int, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        if iid not in self.instances:
            return 404, _err("no_such_instance", f"Instance {iid} not found."), None
        key = str(body.get("ssh_key") or "").strip()
        if not key.startswith("ssh-"):
            return 400, _err("invalid_args", "ssh_key must be an OpenSSH public key"), None
        self.attached_keys.setdefault(iid, []).append(key)
        if self.box is not None and self.box.authorized_keys is not None:
            with self.box.authorized_keys.open("a") as fh:
                fh.write(key + "\n")
        return 200, {"success": True}, None


def _err(code: str, msg: str) -> dict[str, Any]:
    return {"success": False, "error": code, "msg": msg}


def _match(value: Any, cond: Any) -> bool:
    """A filter condition on one field; a null never satisfies a comparison (as in SQL)."""
    if not isinstance(cond, dict):
        return bool(value == cond)

    def cmp(op: str, a: Any, b: Any) -> bool:
        if op == "eq":
            return bool(a == b)
        if op == "neq":
            return bool(a != b)
        if op == "in":
            return a in (b or [])
        if op == "notin":
            return a not in (b or [])
        if a is None or b is None:
            return False
        return {
            "gt": a > b,
            "gte": a >= b,
            "lt": a < b,
            "lte": a <= b,
        }[op]

    return all(cmp(op, value, arg) for op, arg in cond.items() if op in _OPS)


_OPS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin"})


class _Handler(BaseHTTPRequestHandler):
    vast: VastServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        # The official CLI JSON-encodes non-string query values; decode them back.
        query = {k: [_unjson(v) for v in vs] for k, vs in parse_qs(parts.query).items()}
        status, payload, text = self.vast.handle(
            self.command, parts.path, query, body, self.headers.get("Authorization")
        )
        data = text.encode() if text is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header(
                "Content-Type", "text/plain" if text is not None else "application/json"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a slow create): the instance exists anyway

    do_GET = do_POST = do_PUT = do_DELETE = _serve


def _unjson(v: str) -> str:
    try:
        decoded = json.loads(v)
    except ValueError:
        return v
    return decoded if isinstance(decoded, str) else v
