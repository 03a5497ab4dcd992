"""Stage specs, profiles, overrides and the pipeline graph (pure, no I/O)."""

from __future__ import annotations

import pytest

from jobs import overrides as ov
from jobs.pipeline import (
    Scheduler,
    check_graph,
    dependency_graph,
    find_cycle,
    missing_upstream,
    plan,
    topological_order,
    upstream,
)
from jobs.profiles import MINISTRAL_3B_ID, PROFILES, get_profile
from jobs.stages import STAGE_NAMES, get_stage, list_stages, seeded_model
from state.errors import ConfigError, StageError
from state.phases import MaskMode
from state.worker_config import ARGS_BY_COMMAND

EXPECTED = {
    "stage1": ("stage1_baseline_eval", "eval", "causal", []),
    "stage2": ("stage2_ablation_eval", "eval", "prefix", []),
    "stage3a": ("stage3_finetune_causal", "train", "causal", []),
    "stage3b": ("stage3_finetune_prefill_bidir", "train", "prefix", []),
    "stage3b-leaky": ("stage3_finetune_full_bidir", "train", "full_bidir", []),
    "stage4": ("stage4_post_ft_ablation_eval", "eval", "prefix", ["stage3b"]),
    "stage4a": ("stage4a_post_ft_causal_ablation_eval", "eval", "prefix", ["stage3a"]),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_every_stage_resolves_on_every_profile(profile: str, name: str) -> None:
    spec = get_stage(name, profile)
    assert spec.name == name
    if name == "report":
        assert spec.local_only
        return
    stage_dir, command, mask, deps = EXPECTED[name]
    assert spec.stage_dir == stage_dir
    assert spec.task.command == command
    assert spec.task.args["mask"] == mask
    assert spec.depends_on == deps
    # The args are complete and the worker's own model accepts them unchanged.
    model = ARGS_BY_COMMAND[command]
    assert model.model_validate(spec.task.args).model_dump(mode="json") == spec.task.args
    for ref in spec.inputs:
        assert (ref.artifact, ref.arg) == ("checkpoints/final", "model")
        # never silently the base model: unresolved it is an unloadable placeholder
        assert spec.task.args["model"].startswith("input:")
    if not deps:
        prof = get_profile(profile)
        want = (
            seeded_model(prof.model, spec.task.args["seed"])
            if prof.model_follows_seed
            else prof.model
        )
        assert spec.task.args["model"] == want
    assert spec.timeout_s > 0 and spec.stale_after_s > 0


def test_profiles_differ_where_they_should() -> None:
    tiny, big = get_stage("stage3b", "tiny"), get_stage("stage3b", "ministral-3b")
    # the tiny model is built from the study seed (default 0); a hub model is what it is
    assert tiny.task.args["model"] == "tiny://default?seed=0" and tiny.task.args["seed"] == 0
    assert get_stage("stage1", "tiny", {"seed": 3}).task.args["model"] == "tiny://default?seed=3"
    assert get_stage("stage1", "ministral-3b", {"seed": 3}).task.args["model"] == MINISTRAL_3B_ID
    assert tiny.task.args["data"]["source"].startswith("tiny:")
    assert tiny.resources.gpus == 0 and tiny.task.args["device"] == "cpu"
    assert big.task.args["model"] == MINISTRAL_3B_ID
    # training keeps fp32 master weights (bf16 autocast on CUDA); evaluation runs in bf16
    assert big.task.args["dtype"] == "float32" and big.task.args["attn_implementation"] == "sdpa"
    assert get_stage("stage2", "ministral-3b").task.args["dtype"] == "bfloat16"
    assert big.resources.gpus == 1 and big.resources.min_gpu_ram_gb
    assert big.timeout_s == 9 * 3600
    sources = {
        t["name"]: (t["source"], t["format"], t["split"])
        for t in get_stage("stage1", "ministral-3b").task.args["tasks"]
    }
    assert sources["arc_easy"] == ("hf:allenai/ai2_arc", "arc", "test")
    assert sources["arc_challenge"][0] == "hf:allenai/ai2_arc"
    assert sources["hellaswag"] == ("hf:Rowan/hellaswag", "hellaswag", "validation")
    assert sources["boolq"] == ("hf:google/boolq", "boolq", "validation")
    assert sources["piqa"][1:] == ("piqa", "validation")


def test_leakage_guard_flags() -> None:
    assert get_stage("stage3b").task.args["allow_leaky"] is False
    leaky = get_stage("stage3b-leaky").task.args
    assert leaky["allow_leaky"] is True and leaky["mask"] == MaskMode.FULL_BIDIR.value


def test_overrides_apply_with_dotted_keys_and_json_values() -> None:
    spec = get_stage(
        "stage3a",
        "tiny",
        {
            "max_steps": "50",
            "data.limit": "10",
            "gradient_checkpointing": "true",
            "timeout_s": "60",
            "resources.gpus": 2,
        },
    )
    assert spec.task.args["max_steps"] == 50
    assert spec.task.args["data"]["limit"] == 10
    assert spec.task.args["gradient_checkpointing"] is True
    assert spec.timeout_s == 60 and spec.resources.gpus == 2
    ev = get_stage("stage1", "ministral-3b", {"tasks.1.limit": 100, "tasks.-1.split": "train"})
    assert ev.task.args["tasks"][1]["limit"] == 100 and ev.task.args["tasks"][0]["limit"] is None
    assert ev.task.args["tasks"][-1]["split"] == "train"


@pytest.mark.parametrize(
    ("stage", "overrides", "needle"),
    [
        ("stage1", {"max_steps": 5}, "does not take the key 'max_steps'"),
        ("stage3a", {"maxsteps": 5}, "allowed keys: "),
        ("stage1", {"tasks.7.limit": 1}, "index 7 is out of range"),
        ("stage1", {"tasks.0.bogus": 1}, "unknown key 'tasks.0.bogus'"),
        ("stage3a", {"data.colour": 1}, "allowed keys there: format, limit"),
        ("stage3a", {"max_steps": 0}, "max_steps"),
        ("stage1", {"mask": "sideways"}, "mask"),
        ("stage1", {"resources.gpus": "many"}, "resources.gpus"),
        ("stage1", {"max_length.x": 1}, "is a value"),
        ("stage1", {"stage1.max_steps": 5}, "does not take the key 'max_steps'"),
        ("stage3b", {"poll_interval_s": 0}, "poll_interval_s"),
    ],
)
def test_bad_overrides_are_one_clear_config_error(stage: str, overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        get_stage(stage, "tiny", overrides)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_stage_can_ask_for_faster_polls() -> None:
    assert get_stage("stage3b", "tiny").poll_interval_s is None  # the target's interval
    spec = get_stage("stage3b", "tiny", {"stage3b.poll_interval_s": "2"})
    assert spec.poll_interval_s == 2.0
    assert get_stage("stage1", "tiny", {"stage3b.poll_interval_s": "2"}).poll_interval_s is None


def test_unknown_key_lists_allowed_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        get_stage("stage3a", "tiny", {"maxsteps": 5})
    msg = str(exc.value)
    assert "'maxsteps'" in msg and "max_steps" in msg and "lr" in msg


def test_shared_overrides_skip_stages_that_do_not_take_them() -> None:
    shared = {"max_steps": 7, "stage3b.lr": 0.5}
    assert get_stage("stage1", "tiny", shared=shared).task.args.get("max_steps") is None
    assert get_stage("stage3a", "tiny", shared=shared).task.args["max_steps"] == 7
    assert get_stage("stage3a", "tiny", shared=shared).task.args["lr"] != 0.5
    assert get_stage("stage3b", "tiny", shared=shared).task.args["lr"] == 0.5
    # strict overrides win over shared ones
    assert get_stage("stage3a", "tiny", {"max_steps": 9}, shared=shared).task.args["max_steps"] == 9
    # a study-wide key that no stage takes is still a typo
    with pytest.raises(ConfigError, match="takes the key 'max_stepz'"):
        list_stages("tiny", shared={"max_stepz": 3})
    # nested TOML tables flatten to scoped keys
    assert (
        get_stage("stage3b", "tiny", shared={"stage3b": {"max_steps": 3}}).task.args["max_steps"]
        == 3
    )


def test_unknown_stage_and_profile() -> None:
    with pytest.raises(StageError, match="unknown stage 'stage5'.*stage4a"):
        get_stage("stage5")
    with pytest.raises(ConfigError, match="unknown experiment profile 'huge'.*ministral-3b"):
        get_stage("stage1", "huge")


def test_parse_assignments() -> None:
    assert ov.parse_assignments(["a=1", "b=x", "c=null", "d=[1, 2]", "e=a=b"]) == {
        "a": 1,
        "b": "x",
        "c": None,
        "d": [1, 2],
        "e": "a=b",
    }
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        ov.parse_assignments(["max_steps"])


def test_list_stages_in_run_order() -> None:
    names = [s.name for s in list_stages("ministral-3b")]
    assert names == list(STAGE_NAMES)
    assert names.index("stage3b") < names.index("stage4") and names[-1] == "report"


# --- the graph -----------------------------------------------------------------------------
def test_study_graph_has_no_cycle_and_orders_inputs_first() -> None:
    g = dependency_graph(list_stages("tiny"))
    assert find_cycle(g) is None
    check_graph(g)
    order = topological_order(g)
    for stage, deps in g.items():
        for d in deps:
            assert order.index(d) < order.index(stage)
    assert order[-1] == "report"


def test_cycle_is_detected_and_named() -> None:
    g = {"a": ["c"], "b": ["a"], "c": ["b"], "d": []}
    cycle = find_cycle(g)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    with pytest.raises(StageError, match="cycle"):
        topological_order(g)
    with pytest.raises(StageError, match="not a stage"):
        check_graph({"a": ["zz"]})


def test_missing_upstream_and_plan() -> None:
    g = {"x": [], "y": ["x"], "z": ["y"]}
    assert missing_upstream("z", set(), g) == ["x", "y"]
    assert missing_upstream("z", {"y"}, g) == []
    assert missing_upstream("z", {"x"}, g) == ["y"]
    assert upstream("z", g) == ["x", "y"]
    assert missing_upstream("stage4", set()) == ["stage3b"]
    assert missing_upstream("stage4", {"stage3b"}) == []
    with pytest.raises(StageError) as exc:
        plan(["stage4"], set(), with_deps=False)
    assert "stage3b" in str(exc.value) and "--with-deps" in str(exc.value)
    assert plan(["stage4"], set(), with_deps=True) == ["stage3b", "stage4"]
    assert plan(["stage4"], {"stage3b"}, with_deps=False) == ["stage4"]
    # a stage in the plan satisfies its downstream
    assert plan(["stage4", "stage3b"], set(), with_deps=False) == ["stage3b", "stage4"]
    assert plan(["all"], set(), with_deps=False)[-1] == "report"


def _drive(s: Scheduler, fail: str | None = None) -> list[list[tuple[str, str]]]:
    waves = []
    while not s.finished_all():
        launched = s.next_launches()
        if launched:
            waves.append(launched)
        busy = s.busy
        stage = next(iter(busy.values()))
        s.finished(stage, ok=stage != fail)
    return waves


def test_scheduler_one_target_runs_in_table_order() -> None:
    s = Scheduler(order=plan(["all"], set(), with_deps=False), targets=["local"])
    waves = _drive(s)
    assert [w[0][0] for w in waves] == list(STAGE_NAMES)
    assert all(len(w) == 1 for w in waves)


def test_scheduler_several_targets_run_in_parallel_and_follow_checkpoints() -> None:
    s = Scheduler(order=plan(["all"], set(), with_deps=False), targets=["a", "b"])
    waves = _drive(s)
    assert len(waves[0]) == 2  # two independent stages at once
    placed = {stage: t for w in waves for stage, t in w}
    assert placed["stage4"] == placed["stage3b"]
    assert placed["stage4a"] == placed["stage3a"]
    assert placed["report"] == "local"


def test_scheduler_uses_the_target_of_an_existing_checkpoint() -> None:
    s = Scheduler(order=["stage4"], targets=["a", "b"], located={"stage3b": "b"})
    assert s.next_launches() == [("stage4", "b")]


def test_scheduler_stops_after_a_failure() -> None:
    s = Scheduler(order=plan(["stage4"], set(), with_deps=True), targets=["local"])
    _drive(s, fail="stage3b")
    assert s.failed == ["stage3b"]
    assert s.not_launched() == ["stage4"]
    assert s.next_launches() == []


def test_pipeline_specs_take_study_wide_overrides() -> None:
    from orchestrator.pipeline_runner import resolve_specs

    specs = resolve_specs(
        ["stage1", "stage3a", "stage4", "report"],
        "tiny",
        {"max_steps": "5", "tasks.0.limit": "3"},
        {"lr": 0.1},
    )
    assert specs["stage3a"].task.args["max_steps"] == 5 and specs["stage3a"].task.args["lr"] == 0.1
    assert (
        specs["stage1"].task.args["tasks"][0]["limit"] == 3
        and "max_steps" not in specs["stage1"].task.args
    )
    assert specs["stage4"].task.args["tasks"][0]["limit"] == 3
    assert specs["report"].local_only
    with pytest.raises(ConfigError, match="max_stepz"):
        resolve_specs(["stage3a"], "tiny", {"max_stepz": 5}, None)
    # a key only eval stages take is a typo for a plan of training stages
    with pytest.raises(ConfigError, match="tasks"):
        resolve_specs(["stage3a", "stage3b"], "tiny", {"tasks.0.limit": 5}, None)


# --- the ministral-3b profile's data, through the worker's real loaders -----------------------
# One row per data set in its hub schema (as `datasets` yields it), written to a local file:
# nothing here touches the network, and a profile whose `format` does not fit its data fails.
REAL_ROWS = {
    "arc_easy": {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?",
        "choices": {
            "text": [
                "Planetary density will decrease.",
                "Planetary years will become longer.",
                "Planetary days will become shorter.",
                "Planetary gravity will become stronger.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "C",
    },
    "hellaswag": {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
    "piqa": {
        "goal": "How do I ready a guinea pig cage for it's new occupants?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
        "label": 0,
    },
    "boolq": {
        "question": "do iran and afghanistan speak the same language",
        "answer": True,
        "passage": "Persian language -- Persian is a pluricentric language predominantly spoken in Iran, Afghanistan and Tajikistan.",
    },
    "no_robots": {
        "prompt": "Write a haiku about autumn.",
        "prompt_id": "abc123",
        "messages": [
            {"content": "Write a haiku about autumn.", "role": "user"},
            {
                "content": "Leaves drift on cold wind\nthe maple lets go of red\nsoft rain keeps the time",
                "role": "assistant",
            },
        ],
        "category": "Generation",
    },
}


def test_ministral_profile_formats_fit_the_real_schemas(tmp_path) -> None:
    import json as _json

    from jobs.profiles import MINISTRAL_3B
    from worker import data

    def local(src, row_key):
        path = tmp_path / f"{src.name}.jsonl"
        path.write_text(_json.dumps(REAL_ROWS[row_key]) + "\n")
        return src.model_copy(update={"source": str(path)})

    answers = {}
    for src in MINISTRAL_3B.eval_tasks:
        assert src.source.startswith("hf:") and src.format in {"arc", "hellaswag", "piqa", "boolq"}
        key = "arc_easy" if src.format == "arc" else src.format
        (ex,) = data.load_mc_task(local(src, key))
        answers[src.name] = ex.choices[ex.label]
    assert answers["arc_easy"].strip() == "Planetary days will become shorter."
    assert answers["hellaswag"].strip().startswith("starts pulling up roofing")
    assert (
        answers["piqa"]
        .strip()
        .startswith(
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper"
        )
    )
    assert answers["boolq"].strip().lower() == "yes"
    for src in (MINISTRAL_3B.train_data, MINISTRAL_3B.train_eval_data):
        assert src is not None and src.format == "sft"
        (ex,) = data.load_sft(local(src, "no_robots"))
        assert ex.prompt == "Write a haiku about autumn." and ex.response.startswith("Leaves drift")


def test_mistyped_stages_and_keys_say_what_was_meant() -> None:
    from jobs.pipeline import dependency_graph, missing_upstream, topological_order

    with pytest.raises(
        StageError, match=r"unknown stage 'stage3b-leakey' \(did you mean 'stage3b-leaky'\?"
    ):
        get_stage("stage3b-leakey")
    with pytest.raises(StageError, match="did you mean 'stage4a'"):
        topological_order(dependency_graph(), ["stage4aa"])
    with pytest.raises(StageError, match="did you mean 'stage2'"):
        missing_upstream("stag2", set())
    with pytest.raises(ConfigError, match=r"'max_step' \(did you mean 'max_steps'\? allowed keys"):
        get_stage("stage3b", "tiny", {"max_step": 5})
    with pytest.raises(ConfigError, match="did you mean 'tasks.0.limit'"):
        get_stage("stage1", "tiny", {"tsks.0.limit": 5})
    with pytest.raises(ConfigError, match="unknown key 'tasks.0.limt'; did you mean 'limit'"):
        get_stage("stage1", "tiny", {"tasks.0.limt": 5})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        list_stages("tiny", shared={"max_stesp": 3})  # study-wide (orch.toml, run-all --set)
    with pytest.raises(
        ConfigError, match="stage stage3a does not take the key 'lrr' .did you mean 'lr'"
    ):
        list_stages("tiny", shared={"stage3a.lrr": 3})
    with pytest.raises(StageError) as exc:
        get_stage("zzzz")
    assert "did you mean" not in str(exc.value)
