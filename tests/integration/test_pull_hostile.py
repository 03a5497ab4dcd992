"""A pull from a box that is not to be trusted (issue 13, defect 7), over a real sshd + rsync:
manifest paths out of the run dir are refused before anything is opened, symlinks on the box
are not copied (so never followed here), and every error names the file on the box."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.pull import pull_run
from state import names
from state.errors import VerifyError
from state.models import Manifest, ManifestEntry, RunComplete, RunRecord
from state.phases import Phase
from state.protocol import atomic_write_json, build_manifest, sha256_file
from tests.integration.test_launch import ssh_project

pytestmark = pytest.mark.integration

RID = "20260101-000000"
RUN_DIR = f"runs/s1/{RID}"


def _box_run(tmp_path: Path, ctx: Context) -> tuple[RunRecord, Path]:
    """A finished run on the box (files written by hand, as a hostile box could) + its record."""
    rd = tmp_path / "remote" / RUN_DIR
    rd.mkdir(parents=True)
    (rd / "metrics.json").write_text('{"acc": 0.5}')
    atomic_write_json(rd / names.RUN_COMPLETE, RunComplete(run_id=RID))
    (rd / names.EXIT_CODE).write_text("0\n")
    now = datetime.now(timezone.utc)
    rec = RunRecord(
        run_id=RID, stage="stage1", stage_dir="s1", target="box", phase=Phase.SUCCEEDED,
        session="", run_dir=RUN_DIR, created_at=now, updated_at=now,
    )  # fmt: skip
    ctx.store.insert_run(rec)
    return rec, rd


def _outside(tmp_path: Path) -> Path:
    """A file of "the laptop" outside any run dir (stands in for /etc/shadow)."""
    secret = tmp_path / "laptop-secret"
    secret.write_text("root:$6$not-for-the-box\n")
    return secret


def _manifest(rd: Path, *extra: ManifestEntry) -> None:
    m = build_manifest(rd, RID)
    atomic_write_json(rd / names.MANIFEST, Manifest(run_id=RID, files=[*m.files, *extra]))


def test_manifest_paths_out_of_the_run_are_refused_before_any_read(
    sshd_server, tmp_path, monkeypatch
):
    """Injected: manifests naming `../../..`, an absolute path, `./x`. Must report: a
    VerifyError naming the box's manifest and the entry; nothing outside is stat'ed (the
    error never carries the outside file's size)."""
    ssh_project(tmp_path, sshd_server, monkeypatch)
    secret = _outside(tmp_path)
    ctx = Context()
    try:
        rec, rd = _box_run(tmp_path, ctx)
        local = ctx.runs_dir / "s1" / RID
        depth = len(local.relative_to(local.anchor).parts)
        for path in ("../" * depth + str(secret).lstrip("/"), str(secret), "./metrics.json"):
            entry = ManifestEntry(path=path, size=1, sha256="0" * 64)
            _manifest(rd, entry)
            with pytest.raises(VerifyError) as err:
                pull_run(ctx, rec)
            msg = str(err.value)
            assert "refused" in msg and repr(path) in msg, msg
            assert f"127.0.0.1:{tmp_path / 'remote' / RUN_DIR}/{names.MANIFEST}" in msg, msg
            assert str(secret.stat().st_size) not in msg.replace(str(tmp_path), "")
        assert ctx.store.get_run("s1", RID).pulled_at is None
    finally:
        ctx.close()


def test_symlinks_on_the_box_are_not_copied_nor_followed(sshd_server, tmp_path, monkeypatch):
    """Injected: `shadow_link -> <laptop file>` and `data -> <laptop dir>` in the run dir on the
    box, both listed in the manifest with the laptop file's true hash (an old pull copied the
    link and then hashed the laptop's file: "verified"). Must report: the entry is a symlink
    on the box that was not copied (not "missing here, pull again": pulling again cannot help),
    naming it on the box; no symlink lands under runs/; the real artifacts still arrive."""
    ssh_project(tmp_path, sshd_server, monkeypatch)
    secret = _outside(tmp_path)
    (tmp_path / "laptop-dir").mkdir()
    (tmp_path / "laptop-dir" / "key").write_text("k")
    ctx = Context()
    try:
        rec, rd = _box_run(tmp_path, ctx)
        os.symlink(secret, rd / "shadow_link")
        os.symlink(tmp_path / "laptop-dir", rd / "data")
        size, digest = secret.stat().st_size, sha256_file(secret)
        _manifest(rd, ManifestEntry(path="shadow_link", size=size, sha256=digest))
        with pytest.raises(VerifyError) as err:
            pull_run(ctx, rec)
        msg = str(err.value)
        box_link = f"{sshd_server.user}@127.0.0.1:{rd}/shadow_link"
        assert msg.startswith(f"{box_link}: a symlink or special file on the box, not copied"), msg
        assert "missing here" not in msg and "pull again" not in msg, msg
        local = ctx.runs_dir / "s1" / RID
        assert json.loads((local / "metrics.json").read_text()) == {"acc": 0.5}
        assert not any(p.is_symlink() for p in ctx.runs_dir.rglob("*"))
        assert not (local / "data").exists()

        _manifest(rd, ManifestEntry(path="data/key", size=1, sha256=sha256_file(secret)))
        with pytest.raises(VerifyError) as err:
            pull_run(ctx, rec)
        msg = str(err.value)  # the link is the box's dir `data`, whatever the entry under it
        assert msg.startswith(f"{sshd_server.user}@127.0.0.1:{rd}/data: a symlink"), msg
        assert "'data/key'" in msg, msg
    finally:
        ctx.close()


def test_a_link_left_by_an_older_pull_is_removed_not_followed(sshd_server, tmp_path, monkeypatch):
    ssh_project(tmp_path, sshd_server, monkeypatch)
    secret = _outside(tmp_path)
    ctx = Context()
    try:
        rec, rd = _box_run(tmp_path, ctx)
        (rd / "model.bin").write_bytes(b"weights")
        _manifest(rd)
        local = ctx.runs_dir / "s1" / RID
        local.mkdir(parents=True)
        os.symlink(secret, local / "stale_link")
        res = pull_run(ctx, rec)
        assert res.verified == 2  # metrics.json, model.bin
        assert not (local / "stale_link").is_symlink() and secret.exists()
    finally:
        ctx.close()
