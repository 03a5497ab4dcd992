"""The run-directory protocol: atomic writes, tolerant readers, manifests."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from state import names
from state.errors import ConfigError, VerifyError
from state.models import Event, RunStatus
from state.protocol import (
    append_event,
    atomic_write_json,
    build_manifest,
    parse_model,
    read_events,
    read_exit_code,
    read_model,
    verify_manifest,
)


def test_roundtrip_status(tmp_path: Path) -> None:
    st = RunStatus(run_id="20260214-204823", stage="stage3b", seq=7, step=3, losses=[1.0, 0.9])
    atomic_write_json(tmp_path / names.STATUS, st)
    r = read_model(tmp_path / names.STATUS, RunStatus)
    assert r.ok and r.value is not None
    assert r.value.seq == 7 and r.value.losses == [1.0, 0.9]


@pytest.mark.parametrize(
    ("content", "state"),
    [
        (b"", "unreadable"),
        (b"   \n", "unreadable"),
        (b"\x00\xff garbage", "unreadable"),
        (b'{"run_id": "x", "stage": "s", "seq": 3', "unreadable"),  # truncated
        (b"[1, 2]", "unreadable"),
        (b'{"stage": "s"}', "unreadable"),  # missing required field
        (b'{"schema_version": 99, "run_id": "x", "stage": "s"}', "newer_schema"),
    ],
)
def test_reader_never_crashes_on_bad_files(tmp_path: Path, content: bytes, state: str) -> None:
    p = tmp_path / names.STATUS
    p.write_bytes(content)
    r = read_model(p, RunStatus)
    assert r.state == state
    assert r.value is None


def test_missing_file_is_missing(tmp_path: Path) -> None:
    assert read_model(tmp_path / "nope.json", RunStatus).state == "missing"


def test_extra_fields_from_newer_worker_are_ignored() -> None:
    r = parse_model(json.dumps({"run_id": "r", "stage": "s", "brand_new": 1}), RunStatus)
    assert r.ok


def _hammer_writer(path: str, n: int) -> None:
    for i in range(n):
        atomic_write_json(path, RunStatus(run_id="r", stage="s", seq=i, message="x" * (i % 5000)))


def test_reader_never_sees_half_written_file(tmp_path: Path) -> None:
    path = tmp_path / names.STATUS
    atomic_write_json(path, RunStatus(run_id="r", stage="s", seq=0))
    proc = mp.get_context("fork").Process(target=_hammer_writer, args=(str(path), 400))
    proc.start()
    seen = 0
    last = -1
    while proc.is_alive() or seen == 0:
        r = read_model(path, RunStatus)
        assert r.state == "ok", r.detail  # never unreadable: replace is atomic
        assert r.value is not None and r.value.seq >= last
        last = r.value.seq
        seen += 1
    proc.join()
    assert proc.exitcode == 0


def test_events_append_and_torn_line(tmp_path: Path) -> None:
    append_event(tmp_path, Event(kind="phase", message="training"))
    append_event(tmp_path, Event(kind="train", step=1, data={"loss": 2.5}))
    with open(tmp_path / names.EVENTS, "a") as f:
        f.write('{"kind": "train", "step": 2, "da')  # a torn final line
    events = read_events(tmp_path)
    assert [e.kind for e in events] == ["phase", "train"]
    assert events[1].data["loss"] == 2.5


def test_manifest_excludes_live_files_and_verifies(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"acc": 0.5}')
    (tmp_path / names.CHECKPOINTS / "final").mkdir(parents=True)
    (tmp_path / names.CHECKPOINTS / "final" / "model.safetensors").write_bytes(os.urandom(1000))
    for live in (names.STATUS, names.EVENTS, names.STDOUT, names.EXIT_CODE):
        (tmp_path / live).write_text("x")
    m = build_manifest(tmp_path, "r1")
    paths = [f.path for f in m.files]
    assert paths == ["checkpoints/final/model.safetensors", "metrics.json"]
    assert verify_manifest(tmp_path, m) == 2
    assert verify_manifest(tmp_path, m, include_checkpoints=False) == 1


def test_manifest_mismatch_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"acc": 0.5}')
    m = build_manifest(tmp_path, "r1")
    (tmp_path / "metrics.json").write_text('{"acc": 0.9}')  # same size, other bytes
    with pytest.raises(VerifyError, match=r"metrics\.json: sha256 differs"):
        verify_manifest(tmp_path, m)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(VerifyError, match="missing"):
        verify_manifest(tmp_path, m)


def test_exit_code_reader(tmp_path: Path) -> None:
    assert read_exit_code(tmp_path) is None
    (tmp_path / names.EXIT_CODE).write_text("137\n")
    assert read_exit_code(tmp_path) == 137
    (tmp_path / names.EXIT_CODE).write_text("")
    assert read_exit_code(tmp_path) is None


@pytest.mark.parametrize(
    "bad", ["", "a b", "x;rm -rf /", "$(id)", "../up", "a" * 65, ".", "..", "é"]
)
def test_check_name_rejects_metacharacters(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        names.check_name(bad)


def test_session_name_and_run_id() -> None:
    rid = names.new_run_id()
    assert names.is_run_id(rid)
    assert names.session_name("stage3b", rid) == f"orch-stage3b-{rid}"
