"""A local stand-in for the Vast.ai REST API on 127.0.0.1 (a real HTTP server, no mocks).

It implements the calls of `shared/reference/vast-api.md` with their traps: Bearer auth, 429
without Retry-After, `no_such_ask`, a too-low bid that still creates a stopped instance and
answers an error carrying `new_contract`, `{"instances": null}`, keyset pages of at most 25,
`no_such_instance`, error bodies `{"success": false, "error": ..., "msg": ...}`.

Its "instances" point their ssh endpoint at a real sshd on loopback (a `Box`): direct
(`public_ipaddr` + `ports["22/tcp"]`) when the offer has a direct port, else Vast's proxy
(`ssh_host:ssh_port`); both lead to the same sshd. A new instance starts with an empty
authorized_keys (the instance ssh-key call fills it) and runs its `onstart` script with HOME set
to the box's home when it turns `running`.

Controls for tests: `add_offer`, `inject` (canned failures, e.g. 429s), `preempt` (outbid ->
stopped), `set_status`, `request_count`, `auth_headers`, `create_bodies`, `instances`.
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

RATE_LIMIT_TEXT = "API requests too frequent: endpoint threshold=2.0"


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
    #: show calls an instance spends in `loading` before it turns `running`
    boot_polls: int = 1
    #: show calls that answer `{"instances": null}` for a just-created instance
    unseen_polls: int = 0
    instances: dict[int, dict[str, Any]] = field(default_factory=dict)
    offers: dict[int, dict[str, Any]] = field(default_factory=dict)
    auth_headers: list[str] = field(default_factory=list)
    requests: list[_Request] = field(default_factory=list)
    create_bodies: dict[int, dict[str, Any]] = field(default_factory=dict)
    attached_keys: dict[int, list[str]] = field(default_factory=dict)
    onstart_results: dict[int, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._injections: list[_Injection] = []
        self._next_id = 1000
        self._next_offer = 500
        self._boot: dict[int, str] = {}  # instance id -> outcome
        self._polls: dict[int, int] = {}
        self._unseen: dict[int, int] = {}
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
        """Add a rentable offer. `boot`: what an instance made from it does: `running`,
        `exited`, `offline`, `unknown`, `error_msg` (loading with an error status_msg), `never`
        (stays loading)."""
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
                "reliability2": 0.995,
                "geolocation": "Norway, NO",
                "direct_port_count": 10 if direct else 0,
                "inet_down": 900.0,
                "cuda_max_good": 12.4,
                "verified": True,
                "rentable": True,
                "_boot": boot,
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
    ) -> None:
        """Answer the next `times` matching requests with `status` and a canned body."""
        with self._lock:
            self._injections.append(_Injection(method, re.compile(path), status, body, text, times))

    def rate_limit(self, times: int, path: str = ".*") -> None:
        """Answer 429 as Vast does: a text body and no Retry-After."""
        self.inject(429, text=RATE_LIMIT_TEXT, times=times, path=path)

    def preempt(self, instance_id: int) -> None:
        """An interruptible instance is outbid: Vast stops it (its disk survives)."""
        self.set_status(
            instance_id, actual="stopped", cur="stopped", intended="stopped", next_="stopped"
        )

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
                "start_date": time.time() - 3600,
                "gpu_name": "RTX 3090",
                "num_gpus": 1,
                "disk_space": 50.0,
                "ssh_host": "127.0.0.1",
                "ssh_port": 1,
                "is_bid": False,
                **fields,
            }
            self._boot[iid] = "done"
            return iid

    # -- the API ----------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any, auth: str | None
    ) -> tuple[int, Any, str | None]:
        with self._lock:
            self.requests.append(_Request(method, path, query, body))
            self.auth_headers.append(auth or "")
            for inj in self._injections:
                if inj.times > 0 and (inj.method in (None, method)) and inj.pattern.search(path):
                    inj.times -= 1
                    return inj.status, inj.body, inj.text
            if auth != f"Bearer {self.api_key}":
                return 401, _err("auth_error", "Invalid user key"), None
            return self._route(method, path, query, body)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any, str | None]:
        if method == "GET" and path == "/api/v0/users/current/":
            return (
                200,
                {"id": 1, "username": "tester", "email": "t@example.com", "credit": 25.0},
                None,
            )
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self._search(body or {})}, None
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if method == "PUT" and m:
            return self._create(int(m.group(1)), body or {})
        if method == "GET" and path == "/api/v1/instances/":
            return self._list(query)
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m:
            iid = int(m.group(1))
            if method == "GET":
                if query.get("owner") != ["me"]:
                    return 400, _err("invalid_args", "owner=me is required"), None
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
        meta = {"order", "type", "limit", "allocated_storage"}
        out = []
        for offer in self.offers.values():
            if all(k in meta or k not in offer or _match(offer[k], cond) for k, cond in q.items()):
                out.append({k: v for k, v in offer.items() if not k.startswith("_")})
        for fld, direction in reversed(q.get("order") or []):
            if fld == "score":
                out.sort(key=lambda o: o["reliability2"] / max(o["dph_total"], 0.01), reverse=True)
            elif out and fld in out[0]:
                out.sort(key=lambda o, f=fld: o[f], reverse=direction == "desc")
        return out[: int(q.get("limit") or 64)]

    def _create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        offer = self.offers.get(offer_id)
        if offer is None:
            return 404, _err("no_such_ask", "Instance type no longer available."), None
        iid = self._new_id()
        bid = body.get("price")
        low_bid = bid is not None and float(bid) < float(offer["min_bid"])
        direct = offer["direct_port_count"] > 0 and self.box is not None
        inst: dict[str, Any] = {
            "id": iid,
            "label": body.get("label"),
            "machine_id": offer["machine_id"],
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "status_msg": "",
            "dph_total": float(bid) if bid is not None else offer["dph_total"],
            "start_date": None,
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
            else {},
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
            self._polls[iid] = self._polls.get(iid, 0) + 1
            if self._polls[iid] <= self.boot_polls or outcome == "never":
                inst["actual_status"] = (
                    "loading" if self._polls[iid] > 1 or outcome == "never" else "created"
                )
            elif outcome == "running":
                inst.update(actual_status="running", start_date=time.time())
                self._boot[iid] = "done"
                self._run_onstart(iid)
            elif outcome == "error_msg":
                inst.update(
                    actual_status="loading",
                    status_msg="Error response from daemon: pull access denied for image",
                )
            else:  # exited, offline, unknown
                inst.update(actual_status=outcome, status_msg=f"container {outcome}")
                self._boot[iid] = "done"
        return dict(inst)

    def _run_onstart(self, iid: int) -> None:
        script = self.create_bodies[iid].get("onstart") or ""
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
        limit = min(int((query.get("limit") or ["25"])[0]), 25)
        token = (query.get("after_token") or [None])[0]
        after = int(base64.urlsafe_b64decode(token).decode()) if token else 0
        ids = [i for i in sorted(self.instances) if i > after]
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
        if body.get("state") in ("stopped", "running"):
            s = body["state"]
            inst.update(actual_status=s, intended_status=s, cur_state=s, next_state=s)
            self._boot[iid] = "done"
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
    if not isinstance(cond, dict):
        return bool(value == cond)
    ops = {
        "eq": lambda a, b: a == b,
        "neq": lambda a, b: a != b,
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
        "in": lambda a, b: a in b,
        "notin": lambda a, b: a not in b,
    }
    return all(ops[op](value, arg) for op, arg in cond.items())


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
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


def _unjson(v: str) -> str:
    try:
        decoded = json.loads(v)
    except ValueError:
        return v
    return decoded if isinstance(decoded, str) else v
