"""Trust-on-first-use pinning: the first key is recorded in OpenSSH format, the same key passes,
a different one is refused with an actionable message, and a forgotten pin can be re-learned."""

from __future__ import annotations

import stat
import subprocess
import threading
from pathlib import Path

import paramiko
import pytest

from orchestrator.hostkeys import (
    check_or_pin,
    fingerprint,
    forget_host_key,
    host_entry,
    pinned_keys,
)
from state.errors import HostKeyError


def _key(tmp_path: Path, name: str, kind: str = "ed25519") -> paramiko.PKey:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return paramiko.PKey.from_path(path)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, paramiko.PKey]:
    return {"a": _key(tmp_path, "a"), "b": _key(tmp_path, "b"), "ec": _key(tmp_path, "ec", "ecdsa")}


def test_first_use_pins_in_openssh_format(tmp_path: Path, keys) -> None:
    kh = tmp_path / "orch" / "known_hosts"
    assert check_or_pin(kh, "127.0.0.1", 2222, keys["a"]) is True
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    line = kh.read_text().strip()
    assert line == f"[127.0.0.1]:2222 ssh-ed25519 {keys['a'].get_base64()}"
    # OpenSSH itself finds the pin, so ssh/rsync with StrictHostKeyChecking=yes will accept it.
    found = subprocess.run(
        ["ssh-keygen", "-F", "[127.0.0.1]:2222", "-f", str(kh)], capture_output=True, text=True
    )
    assert found.returncode == 0 and keys["a"].get_base64() in found.stdout


def test_same_key_passes_and_is_not_pinned_twice(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "box.example", 22, keys["a"])
    assert check_or_pin(kh, "box.example", 22, keys["a"]) is False
    assert len(kh.read_text().splitlines()) == 1
    assert kh.read_text().startswith("box.example ssh-ed25519 ")  # port 22: no brackets


def test_changed_key_is_refused_with_instructions(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "127.0.0.1", 2222, keys["a"])
    before = kh.read_text()
    with pytest.raises(HostKeyError) as exc:
        check_or_pin(kh, "127.0.0.1", 2222, keys["b"], target="box")
    msg = str(exc.value)
    assert "target box" in msg and "changed" in msg
    assert fingerprint(keys["a"]) in msg and fingerprint(keys["b"]) in msg
    assert f"ssh-keygen -R '[127.0.0.1]:2222' -f {kh}" in msg
    assert "\n" not in msg
    assert kh.read_text() == before  # never accepted, never overwritten


def test_other_key_type_is_refused_not_added(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "127.0.0.1", 2222, keys["a"])
    with pytest.raises(HostKeyError):
        check_or_pin(kh, "127.0.0.1", 2222, keys["ec"])
    assert set(pinned_keys(kh, "127.0.0.1", 2222)) == {"ssh-ed25519"}


def test_ports_are_separate_hosts(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "127.0.0.1", 2222, keys["a"])
    assert check_or_pin(kh, "127.0.0.1", 2223, keys["b"]) is True
    assert pinned_keys(kh, "127.0.0.1", 2223)["ssh-ed25519"].asbytes() == keys["b"].asbytes()


def test_forget_then_relearn(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "127.0.0.1", 2222, keys["a"])
    check_or_pin(kh, "127.0.0.1", 3333, keys["a"])
    assert forget_host_key(kh, "127.0.0.1", 2222) == 1
    assert pinned_keys(kh, "127.0.0.1", 2222) == {}
    assert pinned_keys(kh, "127.0.0.1", 3333)  # the other pin stays
    assert check_or_pin(kh, "127.0.0.1", 2222, keys["b"]) is True
    assert forget_host_key(tmp_path / "missing", "h", 22) == 0


def test_forget_matches_the_exact_entry(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    check_or_pin(kh, "10.0.0.1", 22, keys["a"])
    check_or_pin(kh, "10.0.0.10", 22, keys["b"])
    assert forget_host_key(kh, "10.0.0.1", 22) == 1
    assert pinned_keys(kh, "10.0.0.10", 22)


def test_concurrent_first_use_pins_once(tmp_path: Path, keys) -> None:
    kh = tmp_path / "known_hosts"
    results: list[object] = []

    def pin() -> None:
        try:
            results.append(check_or_pin(kh, "127.0.0.1", 2222, keys["a"]))
        except Exception as exc:  # pragma: no cover - would fail the assertion below
            results.append(exc)

    threads = [threading.Thread(target=pin) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(map(str, results)) == ["False"] * 7 + ["True"]
    assert len(kh.read_text().splitlines()) == 1


def test_host_entry() -> None:
    assert host_entry("h", 22) == "h"
    assert host_entry("h", 2222) == "[h]:2222"
