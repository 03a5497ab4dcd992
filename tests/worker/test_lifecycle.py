"""The run lifecycle: result -> manifest -> .run_complete last; .run_failed + exit codes on
failure, including a real full disk (a small tmpfs in a private mount namespace)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from state import names
from state.errors import WorkerError
from state.models import Manifest, RunComplete, RunFailed, RunStatus
from state.phases import WorkerExit, WorkerPhase
from state.protocol import read_model, sha256_file, verify_manifest
from worker import lifecycle

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _worker(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [PY, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=120, **kw
    )


def test_success_writes_manifest_then_marker_last(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    seen_bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the marker must never be visible without the manifest
        while not stop.is_set():
            if (rd / names.RUN_COMPLETE).exists() and not (rd / names.MANIFEST).exists():
                seen_bad.append("marker before manifest")
            time.sleep(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    try:
        code = lifecycle.execute(
            rd,
            "exec",
            {
                "argv": [
                    PY,
                    "-c",
                    "import os; open(os.environ['ORCH_RUN_DIR'] + '/out.bin', 'wb').write(b'abc' * 1000)",
                ]
            },
        )
    finally:
        stop.set()
        t.join()
    assert code == 0 and not seen_bad
    manifest = read_model(rd / names.MANIFEST, Manifest).value
    done = read_model(rd / names.RUN_COMPLETE, RunComplete).value
    # The marker carries the digest of the final manifest: it was written after it.
    assert done.manifest_sha256 == sha256_file(rd / names.MANIFEST)
    assert (rd / names.RUN_COMPLETE).stat().st_mtime_ns >= (rd / names.MANIFEST).stat().st_mtime_ns
    assert [f.path for f in manifest.files] == ["out.bin"]
    assert verify_manifest(rd, manifest) == 1
    assert not (rd / names.RUN_FAILED).exists() and not (rd / lifecycle.RESERVE).exists()
    st = read_model(rd / names.STATUS, RunStatus).value
    assert st.phase == WorkerPhase.DONE


def test_child_failure_leaves_reason_and_no_marker(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    code = lifecycle.execute(
        rd, "exec", {"argv": [PY, "-c", "print('boom: bad thing'); raise SystemExit(5)"]}
    )
    assert code == WorkerExit.ERROR
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert "exited with code 5" in failed.reason and "boom: bad thing" in failed.reason
    assert failed.exit_code == WorkerExit.ERROR and failed.error_type == "RuntimeError"
    assert "Traceback" in failed.traceback_tail
    assert not (rd / names.RUN_COMPLETE).exists() and not (rd / names.MANIFEST).exists()
    assert read_model(rd / names.STATUS, RunStatus).value.phase == WorkerPhase.FAILED


@pytest.mark.parametrize(
    ("command", "args", "needle"),
    [
        ("train", {"data": {"name": "x", "source": "tiny:sft"}, "max_stepz": 3}, "max_stepz"),
        ("probe", {}, "data"),
        ("exec", {"argv": ["/nonexistent/program"]}, "cannot start"),
        ("nope", {}, "unknown worker command"),
    ],
)
def test_bad_input_is_bad_input_exit(tmp_path: Path, command: str, args: dict, needle: str) -> None:
    rd = tmp_path / "run"
    code = lifecycle.execute(rd, command, args)
    assert code == WorkerExit.BAD_INPUT
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert needle in failed.reason and failed.error_type == "WorkerError"


def test_exit_codes_by_exception() -> None:
    assert lifecycle.exit_code_for(lifecycle.LeakageError("label leakage")) == WorkerExit.LEAKAGE
    assert lifecycle.exit_code_for(WorkerError("bad")) == WorkerExit.BAD_INPUT
    assert lifecycle.exit_code_for(lifecycle.Interrupted(signal.SIGTERM)) == WorkerExit.INTERRUPTED
    assert lifecycle.exit_code_for(ValueError("x")) == WorkerExit.ERROR


def test_sigterm_leaves_interrupted_reason(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [PY, "-m", "worker", "exec", "--run-dir", str(rd), "--", "sleep", "60"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            st = read_model(rd / names.STATUS, RunStatus).value
            if st is not None and st.phase == WorkerPhase.RUNNING:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == WorkerExit.INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
    failed = read_model(rd / names.RUN_FAILED, RunFailed).value
    assert "SIGTERM" in failed.reason and failed.exit_code == 130


def test_relaunch_clears_stale_failure_and_complete_is_kept(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    assert lifecycle.execute(rd, "exec", {"argv": [PY, "-c", "raise SystemExit(1)"]}) == 1
    assert (rd / names.RUN_FAILED).exists()
    assert lifecycle.execute(rd, "exec", {"argv": [PY, "-c", "pass"]}) == 0
    assert not (rd / names.RUN_FAILED).exists() and (rd / names.RUN_COMPLETE).exists()
    before = (rd / names.RUN_COMPLETE).read_bytes()
    # A complete run is never run again nor overwritten.
    assert lifecycle.execute(rd, "exec", {"argv": [PY, "-c", "raise SystemExit(1)"]}) == 0
    assert (rd / names.RUN_COMPLETE).read_bytes() == before and not (rd / names.RUN_FAILED).exists()


def test_failed_marker_fits_in_reserve_when_disk_is_full(tmp_path: Path) -> None:
    """In-process part: a failing normal write falls back to the preallocated reserve."""
    rd = tmp_path / "run"
    rd.mkdir()
    lifecycle.reserve_failure_space(rd)
    assert (rd / lifecycle.RESERVE).stat().st_size == lifecycle.RESERVE_BYTES
    rec = RunFailed(run_id="r", reason="disk full: x", traceback_tail="t" * 100_000, exit_code=1)
    data = lifecycle._fit(rec, lifecycle.RESERVE_BYTES)
    assert len(data) <= lifecycle.RESERVE_BYTES
    assert json.loads(data)["reason"] == "disk full: x"


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return r.returncode == 0


FILL = (
    "import os\n"
    "f = open(os.environ['ORCH_RUN_DIR'] + '/fill.bin', 'wb')\n"
    "try:\n"
    "    while True:\n"
    "        f.write(b'x' * 4096); f.flush()\n"
    "except OSError as e:\n"
    "    print('child:', e)\n"
    "    raise SystemExit(EXIT)\n"
)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root + unshare -m to mount a small tmpfs")
@pytest.mark.parametrize("child_exit", [0, 1])
def test_real_disk_full_still_leaves_readable_reason(tmp_path: Path, child_exit: int) -> None:
    """A 256 KiB tmpfs filled to the last block by the stage: with child_exit=1 the stage fails
    on ENOSPC; with 0 the worker's own manifest write hits ENOSPC. Either way `.run_failed`
    must be readable JSON with a reason."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    rd = mnt / "run"
    script = FILL.replace("EXIT", str(child_exit))
    inner = (
        f"mount -t tmpfs -o size=256k tmpfs {mnt} && "
        f'PYTHONPATH={REPO} {PY} -m worker exec --run-dir {rd} -- {PY} -c "$FILL"; '
        f"code=$?; df -k {mnt} | tail -1; cat {rd}/.run_failed; echo; echo EXIT=$code"
    )
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", inner],
        env=dict(os.environ, FILL=script),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = r.stdout
    assert "EXIT=1" in out, out + r.stderr
    marker = next(line for line in out.splitlines() if line.startswith("{"))
    failed = RunFailed.model_validate_json(marker)
    assert failed.exit_code == 1
    if child_exit == 0:
        assert failed.reason.startswith("disk full:"), failed.reason
        assert "No space left on device" in failed.reason
    else:
        assert "exited with code 1" in failed.reason and "No space left" in failed.reason
