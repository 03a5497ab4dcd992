"""`orch plan`'s pure half (`jobs.plan`) and its formatting: the numbers per stage, the rows of
the verdict and their fixes, which hub repos the study reads, and the gated-model token rule."""

from __future__ import annotations

import pytest

from jobs.plan import GB, Capacity, Check, Recorded, fit_checks, plan_stages, verdict
from jobs.profiles import (
    DATASET_REVISIONS,
    MINISTRAL_3B_ID,
    MINISTRAL_3B_REVISION,
    get_profile,
)
from jobs.stages import STUDY_STAGES, get_stage
from orchestrator.commands.plan import group_checks, memory_lines
from orchestrator.launch import check_gated_token, forwarded_names
from orchestrator.planning import hub_repos
from state.errors import ConfigError

MINI = get_profile("ministral-3b")
TINY = get_profile("tiny")


def cap(gpu: str | None, mem_gb: float, disk_gb: float, dph: float | None = None) -> Capacity:
    return Capacity(
        "gpu", "vast", "cuda" if gpu else "cpu", gpu_name=gpu, gpu_count=1 if gpu else 0,
        gpu_memory=int(mem_gb * GB) if gpu else None, disk_free=int(disk_gb * GB), dph=dph,
        host_memory=int(64 * GB),
    )  # fmt: skip


def specs(profile=MINI, *names: str, **over: object):
    return [get_stage(n, profile, dict(over)) for n in (names or STUDY_STAGES)]


def bad(rows: list[Check]) -> dict[tuple[str, str], Check]:
    return {(r.stage, r.what.split(" (")[0]): r for r in rows if r.ok is False}


def test_a_24_gb_card_runs_the_evaluations_and_not_the_fine_tune() -> None:
    c = cap("RTX 4090", 24, 500, dph=0.4)
    plans = plan_stages(specs(MINI, "stage1", "stage3b"), MINI, c, Recorded())
    rows = fit_checks(plans, c)
    failing = bad(rows)
    assert ("stage3b", "GPU memory") in failing
    assert ("stage1", "GPU memory") not in failing
    assert "min_gpu_ram_gb" in failing[("stage3b", "GPU memory")].fix
    fits, line = verdict(rows, plans, c)
    assert not fits and line.startswith("does not fit gpu: stage3b needs")


def test_an_80_gb_card_and_160_gb_disk_fit_the_whole_study_with_time_and_dollars() -> None:
    c = cap("H100 SXM", 80, 160, dph=2.2)
    plans = plan_stages(specs(), MINI, c, Recorded())
    rows = fit_checks(plans, c)
    assert not bad(rows), bad(rows)
    assert all(p.seconds and p.dollars for p in plans)
    fits, line = verdict(rows, plans, c)
    assert fits and "$" in line and "7 stage(s)" in line
    # the training stages dominate, and their rate is marked as an estimate
    train = [p for p in plans if p.kind == "train"]
    assert min(p.seconds for p in train) > 10 * max(p.seconds for p in plans if p.kind == "eval")
    assert all("estimate" in p.rate_source for p in plans)


def test_the_default_80_gb_disk_cannot_hold_two_ministral_checkpoints() -> None:
    c = cap("H100 SXM", 80, 80 - 8)  # disk_gb 80 less the image
    [p] = plan_stages(specs(MINI, "stage3a"), MINI, c, Recorded())
    assert 80 * GB < p.disk.checkpoints_peak < 90 * GB  # the one kept + the one being written
    row = bad(fit_checks([p], c))[("stage3a", "disk")]
    assert "disk_gb" in row.fix


def test_the_checkpoint_peak_follows_the_worker_s_prune_before_save_rule() -> None:
    c = cap("H100 SXM", 80, 1000)

    def peak(**over: object) -> tuple[int, int]:
        [p] = plan_stages(specs(MINI, "stage3a", **over), MINI, c, Recorded())
        return p.disk.checkpoints_peak, p.disk.checkpoint

    one, step = peak(keep_checkpoints=1)
    assert one == 2 * step  # the previous one stays until the new one is complete
    assert peak(keep_checkpoints=2)[0] == 2 * step  # pruned to one before the save
    assert peak(keep_checkpoints=3)[0] == 3 * step
    # one save in 2000 steps: that one, and final/ (weights only, a third of it) beside it
    assert 1.2 * step < peak(keep_checkpoints=3, save_every=1000)[0] < 1.5 * step
    # a final with the optimizer state is as big as a step checkpoint
    no_saves = {"save_every": 5000}
    weights_only = peak(**no_saves)[0]
    assert peak(final_weights_only=False, **no_saves)[0] > 2.5 * weights_only


def test_a_run_s_own_throughput_replaces_the_profile_table() -> None:
    c = cap("H100 SXM", 80, 500, dph=2.2)
    rec = Recorded()
    rec.add("train", "H100 SXM", 3000.0, "run stage3_x/1 on H100 SXM")
    [est] = plan_stages(specs(MINI, "stage3a"), MINI, c, Recorded())
    [own] = plan_stages(specs(MINI, "stage3a"), MINI, c, rec)
    assert own.rate == 3000.0 and "run stage3_x/1" in own.rate_source
    assert own.seconds > est.seconds  # 3000 tok/s is slower than the FLOPs estimate


def test_rows_saying_the_same_thing_for_every_stage_read_as_one() -> None:
    rows = [Check(s, "GPU memory", "20 GB", "no GPU", False, "use a GPU") for s in "abc"]
    rows.append(Check("c", "disk", "1 GB", "2 GB", True))
    grouped = group_checks(rows, ["a", "b", "c"])
    assert [(g.stage, g.what) for g in grouped] == [("all stages", "GPU memory"), ("c", "disk")]
    assert group_checks(rows[:2], ["a", "b", "c"])[0].stage == "a b"


def test_memory_lines_name_each_part_once_per_kind_of_stage() -> None:
    plans = plan_stages(specs(), MINI, cap("H100 SXM", 80, 500), Recorded())
    lines = memory_lines(plans)
    assert len(lines) == 2
    train = next(ln for ln in lines if "AdamW" in ln)
    assert "stage3a" in train and "grads" in train and "stage1" not in train


def test_the_hub_repos_are_the_pinned_model_and_data_sets() -> None:
    repos = hub_repos(specs(MINI, "stage1", "stage3a", "stage4"))
    models = {(r.repo_id, r.revision) for r in repos if r.kind == "model"}
    assert models == {(MINISTRAL_3B_ID, MINISTRAL_3B_REVISION)}  # stage 4 loads a checkpoint
    data = {(r.repo_id, r.revision) for r in repos if r.kind == "dataset"}
    assert data == set(DATASET_REVISIONS.items())
    assert hub_repos(specs(TINY)) == []


def test_the_gated_model_needs_a_token_and_the_token_is_forwarded_when_set() -> None:
    [s1] = specs(MINI, "stage1")
    with pytest.raises(ConfigError, match="gated hub model.*HF_TOKEN"):
        check_gated_token(s1, "ministral-3b", {})
    check_gated_token(s1, "ministral-3b", {"HF_TOKEN": "hf_x"})
    [t1] = specs(TINY, "stage1")
    check_gated_token(t1, "tiny", {})  # nothing gated
    assert forwarded_names([], True, {"HF_TOKEN": "hf_x"}) == ["HF_TOKEN"]
    assert forwarded_names([], True, {}) == []
    assert forwarded_names([], False, {"HF_TOKEN": "hf_x"}) == []
    assert forwarded_names(["HF_TOKEN"], True, {"HF_TOKEN": "hf_x"}) == ["HF_TOKEN"]


def test_the_report_prints_each_stage_s_pinned_revisions() -> None:
    from jobs.report import StageResult, spec_revisions
    from jobs.report_text import stage_table

    [s1] = specs(MINI, "stage1")
    revs = spec_revisions(s1.task.args)
    assert revs["model"] == MINISTRAL_3B_REVISION
    assert revs["boolq"] == DATASET_REVISIONS["google/boolq"]
    [t1] = specs(TINY, "stage1")
    assert spec_revisions(t1.task.args) == {}  # tiny: nothing from a hub
    unpinned = {"tasks": [{"name": "x", "source": "hf:a/b"}]}
    assert spec_revisions(unpinned) == {"x": "default branch"}
    text = "\n".join(
        stage_table(
            StageResult("stage1", "stage1_baseline_eval", "r1", "runs/x", "eval", revisions=revs)
        )
    )
    assert f"model `{MINISTRAL_3B_REVISION[:12]}`" in text and "default branch" not in text
