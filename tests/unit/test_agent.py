"""The poll agent answers one line per request and survives bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from state import names
from state.agent import handle
from state.models import RunStatus, TargetObservation
from state.protocol import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def test_handle_bad_requests(tmp_path: Path) -> None:
    for bad in ["not json", "[]", '{"op": "dance"}', '{"op": "observe", "runs": 5}']:
        answer, keep = handle(str(tmp_path), bad)
        assert keep is True
        assert json.loads(answer)["ok"] is False


def test_observe_run_dir(tmp_path: Path) -> None:
    rd = tmp_path / "runs" / "stage1_baseline_eval" / "20260101-000000"
    rd.mkdir(parents=True)
    atomic_write_json(rd / names.STATUS, RunStatus(run_id="20260101-000000", stage="stage1", seq=4))
    (rd / names.EXIT_CODE).write_text("0")
    (rd / names.RUN_COMPLETE).write_text("{}")
    (rd / names.PID).write_text("999999999")
    answer, _ = handle(
        str(tmp_path),
        json.dumps(
            {
                "op": "observe",
                "runs": [
                    {
                        "run_dir": "runs/stage1_baseline_eval/20260101-000000",
                        "session": "orch-stage1-x",
                    },
                    {"run_dir": "runs/none/20260101-000001"},
                ],
            }
        ),
    )
    obs = TargetObservation.model_validate_json(answer)
    a, b = obs.runs
    assert a.status is not None and a.status.seq == 4 and a.complete and a.exit_code == 0
    assert a.pid_alive is False and a.session_alive is False
    assert b.status_state == "missing" and b.status is None and not b.complete
    assert obs.disk_free_bytes and obs.disk_free_bytes > 0


def test_agent_process_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "state.agent", "--workdir", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdin and proc.stdout
    assert json.loads(proc.stdout.readline())["ready"] is True
    proc.stdin.write('{"op": "ping"}\n')
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["ok"] is True
    proc.stdin.write("garbage\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["ok"] is False
    proc.stdin.write('{"op": "exit"}\n')
    proc.stdin.flush()
    assert proc.wait(10) == 0


def test_observe_reads_the_first_leak_step_from_the_summary(tmp_path: Path) -> None:
    rd = tmp_path / "runs" / "stage3_finetune_full_bidir" / "20260101-000000"
    rd.mkdir(parents=True)
    rid = "20260101-000000"
    atomic_write_json(rd / names.STATUS, RunStatus(run_id=rid, stage="s", seq=3, leak_flag=True))
    request = json.dumps({"op": "observe", "runs": [{"run_dir": str(rd.relative_to(tmp_path))}]})

    def leak_step() -> int | None:
        [run] = TargetObservation.model_validate_json(handle(str(tmp_path), request)[0]).runs
        assert run.status is not None and run.status.leak_flag
        return run.status.first_leak_step

    assert leak_step() is None  # flagged, step not known yet (no summary while training)
    atomic_write_json(rd / names.SUMMARY, {"leak_flag": True, "first_leak_step": 0})
    assert leak_step() == 0
    atomic_write_json(rd / names.SUMMARY, {"first_leak_step": "zero"})
    assert leak_step() is None  # an odd summary is not a step
