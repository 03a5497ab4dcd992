"""The results report from fixture run dirs written with the run-directory protocol's writers."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from jobs.report import collect, latest_succeeded, write_report
from jobs.report_text import SECTIONS
from jobs.stages import get_stage
from state import names
from state.errors import StageError
from state.models import Event, RunComplete, RunFailed, RunSpec
from state.protocol import append_event, atomic_write_json, build_manifest, sha256_file

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def make_run(
    runs: Path,
    stage: str,
    run_id: str,
    *,
    result: dict[str, Any] | None = None,
    events: list[Event] | None = None,
    profile: str = "tiny",
    ok: bool = True,
    commit: str = "e98bea1f00",
    seed: int | None = None,
) -> Path:
    spec_model = get_stage(stage, profile, {} if seed is None else {"seed": seed})
    run_dir = runs / spec_model.stage_dir / run_id
    run_dir.mkdir(parents=True)
    spec = RunSpec(
        run_id=run_id,
        stage=stage,
        stage_dir=spec_model.stage_dir,
        profile=profile,
        task=spec_model.task,
        git_commit=commit,
        target="local",
    )
    atomic_write_json(run_dir / names.SPEC, spec)
    for ev in events or []:
        append_event(run_dir, ev)
    if result is not None:
        fname = names.METRICS if spec_model.task.command == "eval" else names.SUMMARY
        atomic_write_json(run_dir / fname, result)
    if ok:
        atomic_write_json(run_dir / names.MANIFEST, build_manifest(run_dir, run_id))
        digest = sha256_file(run_dir / names.MANIFEST)
        atomic_write_json(
            run_dir / names.RUN_COMPLETE, RunComplete(run_id=run_id, manifest_sha256=digest)
        )
    else:
        atomic_write_json(run_dir / names.RUN_FAILED, RunFailed(run_id=run_id, reason="boom"))
    return run_dir


def eval_metrics(accs: dict[str, float]) -> dict[str, Any]:
    """The shape worker/evaluate.py writes."""
    tasks = {
        n: {"acc": a, "acc_norm": a - 0.01, "n": 200, "source": f"tiny:{n}", "format": "mc"}
        for n, a in accs.items()
    }
    macro = sum(accs.values()) / len(accs)
    return {
        "model": "tiny://default",
        "tasks": tasks,
        "macro_acc": macro,
        "macro_acc_norm": macro - 0.01,
        "n_questions": 200 * len(accs),
        "eval_seconds": 4.0,
    }


def train_events(mask: str, final_loss: float, probe: tuple[float, float]) -> list[Event]:
    evs = [
        Event(kind="train", step=s, data={"loss": 3.0 - s * (3.0 - final_loss) / 100})
        for s in range(0, 101, 10)
    ]
    evs += [
        Event(kind="eval", step=s, data={"eval_loss": 3.2 - s * (3.2 - final_loss) / 100})
        for s in (50, 100)
    ]
    evs.append(
        Event(
            kind="probe",
            step=0,
            data={"mask": mask, "loss_mask": 3.0, "loss_causal": 3.0, "ratio": 1.0, "leak": False},
        )
    )
    lm, lc = probe
    evs.append(
        Event(
            kind="probe",
            step=100,
            data={
                "mask": mask,
                "loss_mask": lm,
                "loss_causal": lc,
                "ratio": lm / lc,
                "leak": lm < 0.5 * lc,
            },
        )
    )
    return evs


def make_study(runs: Path) -> None:
    # the seed's stage 1/2 macro accuracies, split over two tasks
    make_run(
        runs,
        "stage1",
        "20260214-145148",
        result=eval_metrics({"recall": 0.695057, "arith": 0.695057}),
    )
    make_run(
        runs, "stage1", "20260101-000000", result=eval_metrics({"recall": 0.1, "arith": 0.1})
    )  # older
    make_run(
        runs,
        "stage1",
        "20260301-000000",
        result=eval_metrics({"recall": 0.9, "arith": 0.9}),
        ok=False,
    )  # failed newer
    make_run(
        runs,
        "stage2",
        "20260214-145456",
        result=eval_metrics({"recall": 0.355898, "arith": 0.355898}),
    )
    make_run(
        runs,
        "stage3a",
        "20260214-201019",
        events=train_events("causal", 1.3, (1.0, 1.0)),
        result={
            "train_loss": 1.3377,
            "eval_loss": 1.3752,
            "train_steps_per_second": 2.425,
            "steps": 100,
        },
    )
    make_run(
        runs,
        "stage3b",
        "20260214-204823",
        events=train_events("prefix", 1.4, (1.02, 1.03)),
        result={
            "train_loss": 1.41,
            "eval_loss": 1.45,
            "train_steps_per_second": 2.07,
            "steps": 100,
        },
    )
    make_run(
        runs,
        "stage3b-leaky",
        "20260214-201020",
        events=train_events("full_bidir", 0.07, (0.070, 1.023)),
        # as worker/train.py writes it: every periodic probe in `probes`, the final one in `probe`
        result={
            "train_loss": 5.4243,
            "eval_loss": 7.0321,
            "steps": 100,
            "mask": "full_bidir",
            "probes": [
                {
                    "step": 50,
                    "mask": "full_bidir",
                    "loss_mask": 0.5,
                    "loss_causal": 1.1,
                    "ratio": 0.5 / 1.1,
                    "leak": True,
                },
                {
                    "step": 100,
                    "mask": "full_bidir",
                    "loss_mask": 0.070,
                    "loss_causal": 1.023,
                    "ratio": 0.070 / 1.023,
                    "leak": True,
                },
            ],
            "probe": {
                "mask": "full_bidir",
                "loss_mask": 0.070,
                "loss_causal": 1.023,
                "ratio": 0.070 / 1.023,
                "leak": True,
            },
        },
    )
    make_run(runs, "stage4", "20260215-000000", result=eval_metrics({"recall": 0.6, "arith": 0.6}))
    make_run(
        runs, "stage4a", "20260215-000001", result=eval_metrics({"recall": 0.45, "arith": 0.45})
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIG
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(data[12:29]) == crc
    return w, h


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    w, h = png_size(data)
    assert w >= 400 and h >= 200
    assert len(data) > 10_000  # axes, bars, text: far more than a blank canvas
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    # many distinct colours: something was drawn
    flat = img.reshape(-1, img.shape[-1])
    assert len({tuple(px) for px in flat[:: max(1, len(flat) // 20000)]}) > 20


def test_report_has_every_section_numbers_and_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_study(runs)
    out = tmp_path / "docs" / "RESULTS.md"
    res = write_report(runs, out)
    text = out.read_text()
    for section in SECTIONS:
        assert section in text, section
    assert "Profile: **tiny**" in text
    # the seed's figures through the whole path: files -> collect -> math -> markdown
    assert "-0.339159" in text and "0.512x" in text
    assert (
        res.data.stages["stage1"].run_id == "20260214-145148"
    )  # latest succeeded, not the failed one
    assert "`20260214-145148`" in text and "`e98bea1f00`" in text
    # recovery: 3B 0.6 / 0.695057 and gap closed (0.6-0.355898)/(0.339159)
    assert f"{0.6 / 0.695057:.3f}x" in text and f"{(0.6 - 0.355898) / 0.339159:.3f}" in text
    # per-task and throughput and losses
    assert "| recall | 0.6951 |" in text and "train_steps_per_second" in text
    # counts print as counts, rates as rates; the chance column falls back to the profile's
    assert "| n_questions | 400 |" in text and "| questions_per_s | 100 |" in text
    assert "| recall | 0.6951 | 0.6851 | 200 | 0.250 |" in text
    assert "1.3752" in text and "7.0321" in text
    # the leak: last probe of the leaky run collapses, prefix does not
    leaky = res.data.stages["stage3b-leaky"].probes
    assert [p.step for p in leaky] == [50, 100]  # from summary.json's `probes`, not duplicated
    assert leaky[-1].ratio == pytest.approx(0.070 / 1.023)
    assert "LEAK" in text and "caught" in text
    # plots beside the report, referenced by it, real images
    assert {p.name for p in res.plots} == {"accuracy_by_stage.png", "loss_curves_3a_vs_3b.png"}
    for p in res.plots:
        assert p.parent == out.parent
        assert f"]({p.name})" in text
        assert_real_png(p)
    # the JSON carries the same numbers
    js = json.loads(json.dumps(res.data.to_json()))
    assert js["profile"] == "tiny"
    assert round(js["math"]["delta"], 6) == -0.339159
    assert js["stages"]["stage3a"]["train_curve"][0] == [0, 3.0]


def test_partial_study_reports_what_exists(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(
        runs,
        "stage1",
        "20260214-145148",
        result={"tasks": [{"name": "recall", "acc": 0.8}, {"name": "succ", "acc": 0.6}]},
    )
    res = write_report(runs, tmp_path / "R.md")
    text = (tmp_path / "R.md").read_text()
    assert res.data.stages["stage1"].macro_acc == pytest.approx(0.7)  # macro computed from tasks
    assert "not run" in text and "n/a (missing input)" in text
    # chance from the profile when the tasks do not state it: 0.25 for tiny
    assert "clearly above chance" in text


def test_no_pulled_runs_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "runs" / "stage1_baseline_eval" / "20260101-000000").mkdir(
        parents=True
    )  # not complete
    with pytest.raises(StageError) as exc:
        collect(tmp_path / "runs")
    assert "no pulled succeeded runs" in str(exc.value) and "\n" not in str(exc.value)


def test_latest_succeeded_ignores_incomplete(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "stage2", "20260101-000000", result=eval_metrics({"a": 0.5}))
    make_run(runs, "stage2", "20260102-000000", result=eval_metrics({"a": 0.5}), ok=False)
    found = latest_succeeded(runs / "stage2_ablation_eval")
    assert found is not None and found.name == "20260101-000000"
    assert latest_succeeded(runs / "nothing") is None


def test_report_without_matplotlib_still_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import plots

    runs = tmp_path / "runs"
    make_run(runs, "stage1", "20260214-145148", result=eval_metrics({"recall": 0.7}))
    monkeypatch.setattr(plots, "available", lambda: False)
    res = write_report(runs, tmp_path / "R.md")
    assert res.plots == [] and "orch[report]" in (tmp_path / "R.md").read_text()


def make_seeded(runs: Path, seed: int, acc: dict[str, float], day: int) -> None:
    """The four eval stages of one seed (two tasks each), run ids of one day."""
    for i, (stage, a) in enumerate(acc.items()):
        make_run(
            runs,
            stage,
            f"202603{day:02d}-00000{i}",
            result=eval_metrics({"dup": a, "arith": a}),
            seed=seed,
        )


SEEDED = {
    0: {"stage1": 0.90, "stage2": 0.70, "stage4a": 0.72, "stage4": 0.88},
    1: {"stage1": 0.92, "stage2": 0.74, "stage4a": 0.70, "stage4": 0.90},
    2: {"stage1": 0.88, "stage2": 0.72, "stage4a": 0.74, "stage4": 0.86},
}


def test_report_over_seeds_shows_spread_and_checks_each_claim(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, acc in SEEDED.items():
        make_seeded(runs, seed, acc, day=seed + 1)
    res = write_report(runs, tmp_path / "out" / "RESULTS.md")
    text = res.path.read_text()
    assert res.study is not None and list(res.study.runs) == [0, 1, 2]
    sp = res.study.spread
    # per seed, each seed's own runs: seed 0 is not shadowed by the newer runs of seed 2
    assert res.study.runs[0].stages["stage1"].macro_acc == pytest.approx(0.90)
    assert sp.stages["stage1"]["macro"].mean == pytest.approx(0.90)
    assert sp.stages["stage1"]["macro"].sd == pytest.approx(0.02)
    # delta -0.20, -0.18, -0.16: far beyond its sd 0.02; 4A - stage 2 is +0.02, -0.04, +0.02
    assert sp.figures["delta"].beyond_noise
    assert not sp.figures["vs_stage2_3A"].beyond_noise and sp.figures["vs_stage2_3B"].beyond_noise
    assert all(c.holds for c in sp.claims)
    assert "## Across seeds" in text and "3 seeds (0, 1, 2)" in text
    assert "| 1 causal (base) | 0.900 ± 0.020 | 0.880 .. 0.920 |" in text
    assert "| 4A - stage 2 (causal FT) | +0.000 ± 0.035 |" in text and "within the spread" in text
    assert text.count("**holds** on 3 of 3 seeds") == 3
    assert "| 1 | 0.9200 | 0.7400 | 0.7000 | 0.9000 |" in text  # per-seed table
    js = res.study.to_json()
    assert js["seeds"]["seeds"] == [0, 1, 2]
    assert js["seeds"]["claims"]["ablation_hurts"]["holds"] is True
    assert js["seeds"]["figures"]["delta"]["values"] == pytest.approx([-0.20, -0.18, -0.16])


def test_a_claim_that_fails_on_one_seed_says_which(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, acc in SEEDED.items():
        make_seeded(runs, seed, acc if seed != 2 else {**acc, "stage2": 0.95}, day=seed + 1)
    res = write_report(runs, tmp_path / "R.md")
    text = res.path.read_text()
    assert res.study is not None
    claims = {c.key: c for c in res.study.spread.claims}
    assert not claims["ablation_hurts"].holds and claims["ablation_hurts"].held == 2
    assert "**does NOT hold** on 2 of 3 seeds (fails on seed 2)" in text
    # only the seeds asked for
    res = write_report(runs, tmp_path / "R2.md", seeds=[0, 1])
    assert res.study is not None and list(res.study.runs) == [0, 1]
    assert all(c.holds for c in res.study.spread.claims)
    with pytest.raises(StageError, match="no pulled succeeded runs with seed 7"):
        write_report(runs, tmp_path / "R3.md", seeds=[0, 7])


def test_one_seed_is_the_single_run_report_and_names_missing_stages(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_seeded(runs, 0, {"stage1": 0.9, "stage2": 0.7}, day=1)
    res = write_report(runs, tmp_path / "R.md")
    text = res.path.read_text()
    assert "## Across seeds" not in text and "Profile: **tiny**, seed 0." in text
    assert (
        "no succeeded pulled run, seed 0): stage3a, stage3b, stage3b-leaky, stage4, stage4a" in text
    )
    assert res.replaced == []
    again = write_report(runs, tmp_path / "R.md")
    assert tmp_path / "R.md" in again.replaced


def _git(root: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    ).stdout


def test_orch_report_leaves_a_clean_clone_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a clone whose docs/RESULTS.md is tracked, `orch report` writes under reports/
    (ignored) and `git status` stays clean; only `--out docs/RESULTS.md` touches the tracked
    file, and it says so."""
    from orchestrator.cli import main
    from tests.conftest import REPO

    root = tmp_path / "clone"
    (root / "docs").mkdir(parents=True)
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (root / "docs" / "RESULTS.md").write_text("# the committed results\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    make_seeded(root / "runs", 0, {"stage1": 0.9, "stage2": 0.7}, day=1)
    monkeypatch.chdir(root)
    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "reports/RESULTS.md" in out and "stage3a" in out  # says what it lacks
    assert (root / "reports" / "RESULTS.md").is_file()
    assert _git(root, "status", "--porcelain") == ""
    assert (root / "docs" / "RESULTS.md").read_text() == "# the committed results\n"
    assert main(["report", "--out", "docs/RESULTS.md"]) == 0
    out = capsys.readouterr().out
    assert "replaced docs/RESULTS.md" in out.replace("\n", " ")
    changed = sorted(_git(root, "status", "--porcelain").splitlines())
    assert changed == [
        " M docs/RESULTS.md",
        "?? docs/accuracy_by_stage.png",
        "?? docs/loss_curves_3a_vs_3b.png",
    ]
