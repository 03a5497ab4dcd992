"""Keyboard input for the dashboard: cbreak mode on a TTY (always restored), raw bytes to key
names. Without a TTY there are no keys, and the view still works."""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Iterator

if os.name == "posix":
    import termios
    import tty


KEYMAP: dict[bytes, str] = {
    b"q": "quit",
    b"Q": "quit",
    b"\x03": "quit",
    b"r": "refresh",
    b"p": "pull",
    b"l": "log",
    b"\x1b": "escape",
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"k": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"j": "down",
    b"\x1b[5~": "pageup",
    b"\x1b[6~": "pagedown",
    b"\x1b[H": "home",
    b"\x1b[F": "end",
    b"g": "home",
    b"G": "end",
}


def parse_keys(data: bytes) -> list[str]:
    """Split raw terminal input into key names (escape sequences kept whole; unknown dropped)."""
    keys: list[str] = []
    i = 0
    while i < len(data):
        if data[i : i + 1] == b"\x1b" and i + 1 < len(data) and data[i + 1 : i + 2] in (b"[", b"O"):
            j = i + 2
            while j < len(data) and not (0x40 <= data[j] <= 0x7E):
                j += 1
            seq = data[i : j + 1]
            i = j + 1
        else:
            seq = data[i : i + 1]
            i += 1
        name = KEYMAP.get(seq)
        if name:
            keys.append(name)
    return keys


@contextlib.contextmanager
def cbreak(fd: int | None) -> Iterator[bool]:
    """Put a TTY into cbreak mode (keys arrive unbuffered, Ctrl-C still works) and always put
    it back; yields whether keys can be read at all."""
    if fd is None or os.name != "posix" or not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int, timeout: float) -> list[str]:
    """Keys typed within `timeout` seconds (empty list if none)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return []
    try:
        data = os.read(fd, 64)
    except OSError:
        return []
    return parse_keys(data)
