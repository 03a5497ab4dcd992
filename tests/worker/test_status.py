"""StatusWriter: atomic status.json on a heartbeat, seq only goes up, rates/ETA, events."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from state import names
from state.models import RunStatus
from state.phases import WorkerPhase
from state.protocol import parse_model, read_events, read_model
from worker.status import RECENT_LOSSES, StatusWriter


def _wait(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_reader_never_sees_a_partial_status(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, "r1", "s", heartbeat_s=0.001, echo=False)
    # A large `extra` makes each write take several syscalls: a torn write would be visible.
    writer.set_extra(blob="x" * 200_000)
    stop = threading.Event()

    def steps() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            writer.step(i, loss=1.0 / i, tokens=10)

    with writer:
        t = threading.Thread(target=steps)
        t.start()
        seqs: list[int] = []
        try:
            # 600 reads, and on until the writer has moved at least once (a loaded machine may
            # not schedule the writer thread during the first 600; 30 s at most)
            deadline = time.monotonic() + 30.0
            while len(seqs) < 600 or (seqs[-1] == seqs[0] and time.monotonic() < deadline):
                data = (tmp_path / names.STATUS).read_bytes()
                r = parse_model(data, RunStatus)
                assert r.ok, f"reader saw a partial/invalid status.json: {r.state} {r.detail}"
                seqs.append(r.value.seq)
        finally:
            stop.set()
            t.join()
    assert seqs == sorted(seqs), "seq went down"
    assert seqs[-1] > seqs[0], "seq never moved"
    assert not list(tmp_path.glob("*.tmp")), "temp files left behind"


def test_heartbeat_moves_seq_without_updates(tmp_path: Path) -> None:
    with StatusWriter(tmp_path, "r1", "s", heartbeat_s=0.02, echo=False):
        first = read_model(tmp_path / names.STATUS, RunStatus).value.seq
        _wait(lambda: read_model(tmp_path / names.STATUS, RunStatus).value.seq >= first + 3)
    st = read_model(tmp_path / names.STATUS, RunStatus).value
    assert st.pid is not None and st.disk_free_bytes and st.disk_free_bytes > 0


def test_step_rates_eta_and_recent_losses(tmp_path: Path) -> None:
    w = StatusWriter(tmp_path, "r1", "s", total_steps=100, echo=False)
    for i in range(1, 31):
        # 2 steps per second, 50 tokens per step -> 100 tokens/s.
        w.step(i, loss=float(i), lr=0.1, tokens=50, now=i * 0.5)
    st = read_model(tmp_path / names.STATUS, RunStatus).value
    assert st.step == 30 and st.total_steps == 100
    assert abs(st.steps_per_s - 2.0) < 1e-9
    assert abs(st.tokens_per_s - 100.0) < 1e-9
    assert abs(st.eta_s - 35.0) < 1e-9  # 70 steps left at 2 steps/s
    assert st.losses == [float(i) for i in range(31 - RECENT_LOSSES, 31)]
    assert st.loss == 30.0 and st.lr == 0.1


def test_phase_goes_to_status_and_events(tmp_path: Path) -> None:
    w = StatusWriter(tmp_path, "r1", "stage-a", echo=False)
    w.set_phase(WorkerPhase.TRAINING, "step 0")
    w.event("checkpoint", "saved", step=3, path="checkpoints/step-3")
    st = read_model(tmp_path / names.STATUS, RunStatus).value
    assert st.phase == WorkerPhase.TRAINING and st.stage == "stage-a" and st.message == "step 0"
    events = read_events(tmp_path)
    assert [e.kind for e in events] == ["phase", "checkpoint"]
    assert events[1].step == 3 and events[1].data["path"] == "checkpoints/step-3"


def test_failed_write_is_remembered_not_raised(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    w = StatusWriter(rd, "r1", "s", echo=False)
    shutil.rmtree(rd)
    rd.write_text("a file where the run dir was")  # every write now fails with an OSError
    assert w.write() is False
    assert w.last_error
    w.step(1, loss=1.0)  # must not raise into the training loop
    rd.unlink()
    rd.mkdir()
    assert w.write() is True and w.last_error is None


def test_progress_carries_tokens_into_the_rates(tmp_path: Path) -> None:
    # Evaluation reports questions done plus the tokens forwarded since its previous call.
    w = StatusWriter(tmp_path, "r1", "s", echo=False)
    w.progress(0, 40, "evaluated 0/40")
    w.progress(8, 40, "evaluated 8/40", tokens=800)
    w.progress(16, 40, "evaluated 16/40", tokens=400)
    st = read_model(tmp_path / names.STATUS, RunStatus).value
    assert st.step == 16 and st.total_steps == 40 and st.message == "evaluated 16/40"
    assert st.tokens_per_s is not None and st.tokens_per_s > 0
    # over one window: 1200 tokens for 16 questions, whatever the seconds were
    assert abs(st.tokens_per_s / st.steps_per_s - 75.0) < 1e-9
