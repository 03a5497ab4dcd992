"""A real HTTP server on 127.0.0.1 that collects webhook alerts (what Apprise's `json://` posts)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Webhook:
    """Collects JSON POSTs; `fail_with` makes it answer that status instead (to test retries).

    `headers` holds every request's headers (in arrival order, answered or not); with `hold`
    cleared, a request is received and recorded there but not answered until `hold` is set
    again (a POST in flight, for killing the sender mid-delivery)."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.cond = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n)
                with hook.cond:
                    hook.headers.append(dict(self.headers.items()))
                    hook.cond.notify_all()
                hook.hold.wait()
                if hook.fail_with is not None:
                    self.send_response(hook.fail_with)
                    self.end_headers()
                    return
                try:
                    body = json.loads(data)
                except ValueError:
                    body = {"raw": data.decode(errors="replace")}
                with hook.cond:
                    hook.posts.append((time.monotonic(), body))
                    hook.cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def titles(self) -> list[str]:
        with self.cond:
            return [str(p.get("title", "")) for _, p in self.posts]

    def matching(self, *words: str) -> list[dict[str, Any]]:
        with self.cond:
            return [
                p
                for _, p in self.posts
                if all(
                    w in str(p.get("title", "")) + "\n" + str(p.get("message", "")) for w in words
                )
            ]

    def wait_for(self, *words: str, timeout: float = 30.0, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [
                    p
                    for _, p in self.posts
                    if all(
                        w in str(p.get("title", "")) + "\n" + str(p.get("message", ""))
                        for w in words
                    )
                ]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no alert with {words} within {timeout} s; got {self.titles()}"
                    )
                self.cond.wait(left)

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> list[dict[str, str]]:
        """The headers of the first `count` requests received (answered or not)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.headers) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.headers)} request(s) within {timeout} s, wanted {count}"
                    )
                self.cond.wait(left)
            return list(self.headers[:count])

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
