"""A TCP proxy on loopback that delays every byte by a fixed time each way: a rented box's
round trip (50-150 ms) on a machine where `tc netem` is not available (no `sch_netem` module
in this container's kernel; a network namespace alone cannot add delay).

    with DelayProxy(("127.0.0.1", sshd_port), one_way_s=0.05) as proxy:
        ...connect to 127.0.0.1:proxy.port...   # every round trip takes 100 ms more

Order is kept per direction (one queue and one sender per direction); a chunk is released
`one_way_s` after it was read, so a stream is delayed, not throttled. EOF is passed on after
the data before it.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], one_way_s: float) -> None:
        self.upstream = upstream
        self.one_way_s = one_way_s
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="delay-proxy").start()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._srv.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks.append(s)
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.one_way_s, data))
                if not data:
                    return

        def send() -> None:
            while True:
                at, data = q.get()
                wait = at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=send, daemon=True).start()
