"""The study's stages as data, resolved for a profile with overrides.

    stage           run dir                               does
    stage1          stage1_baseline_eval                  eval, causal mask, base model
    stage2          stage2_ablation_eval                  eval, prefix mask, base model
    stage3a         stage3_finetune_causal                SFT, causal mask, from the base model
    stage3b         stage3_finetune_prefill_bidir         SFT, prefix mask (leakage guard on)
    stage3b-leaky   stage3_finetune_full_bidir            SFT, full_bidir forced (the seed's leak)
    stage4          stage4_post_ft_ablation_eval          eval, prefix mask, 3B checkpoint
    stage4a         stage4a_post_ft_causal_ablation_eval  eval, prefix mask, 3A checkpoint
    report          (local)                               recovery ratios + reports/RESULTS.md

`get_stage(name, profile, overrides)` returns a `StageSpec` whose `task.args` are complete and
validated by the worker's own args model (`state.worker_config`), so a typo in `--set` fails on
the laptop before a box is rented.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from jobs import overrides as ov
from jobs.profiles import Profile, get_profile
from jobs.spec import InputRef, StageSpec
from state import names
from state.errors import ConfigError, StageError
from state.models import Resources, WorkerTask
from state.phases import MaskMode
from state.suggest import did_you_mean
from state.worker_config import ARGS_BY_COMMAND


@dataclass(frozen=True)
class StageRecipe:
    """The profile-independent part of a stage."""

    name: str
    stage_dir: str
    kind: Literal["eval", "train", "report"]
    description: str
    mask: MaskMode | None = None
    input_stage: str | None = None  # the stage whose checkpoint is this stage's model
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific worker args


REPORT_STAGE = "report"

RECIPES: tuple[StageRecipe, ...] = (
    StageRecipe(
        "stage1",
        "stage1_baseline_eval",
        "eval",
        "baseline eval, causal mask, base model",
        MaskMode.CAUSAL,
    ),
    StageRecipe(
        "stage2",
        "stage2_ablation_eval",
        "eval",
        "ablated eval: prompt bidirectional (prefix mask), base model",
        MaskMode.PREFIX,
    ),
    StageRecipe(
        "stage3a",
        "stage3_finetune_causal",
        "train",
        "SFT with the causal mask, from the base model",
        MaskMode.CAUSAL,
    ),
    StageRecipe(
        "stage3b",
        "stage3_finetune_prefill_bidir",
        "train",
        "prefix-LM SFT: prompt bidirectional, response causal (leakage guard on)",
        MaskMode.PREFIX,
        extra={"allow_leaky": False},
    ),
    StageRecipe(
        "stage3b-leaky",
        "stage3_finetune_full_bidir",
        "train",
        "the seed's invalid run reproduced on purpose: SFT with a forced full_bidir mask, so the "
        "leakage probe's collapse is on record",
        MaskMode.FULL_BIDIR,
        extra={"allow_leaky": True},
    ),
    StageRecipe(
        "stage4",
        "stage4_post_ft_ablation_eval",
        "eval",
        "post-FT ablated eval (prefix mask) of the 3B checkpoint",
        MaskMode.PREFIX,
        input_stage="stage3b",
    ),
    StageRecipe(
        "stage4a",
        "stage4a_post_ft_causal_ablation_eval",
        "eval",
        "post-FT ablated eval (prefix mask) of the 3A checkpoint",
        MaskMode.PREFIX,
        input_stage="stage3a",
    ),
    StageRecipe(
        REPORT_STAGE,
        "report",
        "report",
        "recovery ratios and reports/RESULTS.md (runs on the laptop)",
    ),
)

RECIPE_BY_NAME: dict[str, StageRecipe] = {r.name: r for r in RECIPES}
STAGE_NAMES: tuple[str, ...] = tuple(r.name for r in RECIPES)
#: The worker stages of the study (everything but the local report), in a valid run order.
STUDY_STAGES: tuple[str, ...] = tuple(n for n in STAGE_NAMES if n != REPORT_STAGE)
CHECKPOINT = f"{names.CHECKPOINTS}/final"


def recipe(name: str) -> StageRecipe:
    try:
        return RECIPE_BY_NAME[name]
    except KeyError:
        raise StageError(
            f"unknown stage {name!r}",
            hint=did_you_mean(name, STAGE_NAMES, f"known stages: {', '.join(STAGE_NAMES)}"),
        ) from None


def seeded_model(model: str, seed: int) -> str:
    """The base model built from `seed`: `tiny://default` -> `tiny://default?seed=3`, the form
    `worker.tiny.parse_uri` reads (every random choice of the tiny build follows the seed)."""
    return f"{model.partition('?')[0]}?seed={seed}"


def _input_placeholder(stage: str) -> str:
    # Replaced by the launcher with the upstream run's checkpoint path; a loud, unloadable value
    # if it ever reaches the worker unresolved (never silently the base model).
    return f"input:{stage}/{CHECKPOINT}"


def _base_args(r: StageRecipe, p: Profile) -> dict[str, Any]:
    args: dict[str, Any] = {"model": p.model, **copy.deepcopy(p.common)}
    if r.input_stage:
        args["model"] = _input_placeholder(r.input_stage)
        # The checkpoint carries its tokenizer; a base-model tokenizer would be wrong there.
        # A hub revision pins the base model, not a local checkpoint dir.
        args.pop("revision", None)
    if r.kind == "eval":
        args.update(copy.deepcopy(p.eval))
        args["tasks"] = [t.model_dump(mode="json") for t in p.eval_tasks]
    else:
        args.update(copy.deepcopy(p.train))
        args["data"] = p.train_data.model_dump(mode="json")
        if p.train_eval_data is not None:
            args["eval_data"] = p.train_eval_data.model_dump(mode="json")
    if r.mask is not None:
        args["mask"] = r.mask.value
    args.update(copy.deepcopy(r.extra))
    return args


def _spec_fields(r: StageRecipe, p: Profile) -> dict[str, Any]:
    train = r.kind == "train"
    return {
        "timeout_s": p.train_timeout_s if train else p.eval_timeout_s,
        "stale_after_s": p.train_stale_after_s if train else p.eval_stale_after_s,
        "poll_interval_s": None,  # the target's `[monitor] interval_s`
        "nproc_per_node": p.nproc_per_node if train else 1,
        "nodes": 1,
        "tasks_per_node": 1,
        "resources": (p.train_resources if train else p.eval_resources).model_dump(),
    }


def allowed_keys(name: str) -> list[str]:
    """The override keys stage `name` takes (worker args fields + spec-level keys)."""
    r = recipe(name)
    if r.kind == "report":
        return []
    model = ARGS_BY_COMMAND[r.kind]
    return sorted(model.model_fields) + list(ov.SPEC_KEYS)


def _key_hint(key: str, allowed: list[str]) -> str:
    """`did you mean 'max_steps'? allowed keys: ...` (the guess only when one is close)."""
    return did_you_mean(key, allowed, f"allowed keys: {', '.join(allowed)}")


def _takes(name: str, key: str) -> bool:
    head = key.split(".", 1)[0]
    if key in ov.SPEC_KEYS or head == "resources":
        return key in ov.SPEC_KEYS
    r = recipe(name)
    return r.kind != "report" and head in ARGS_BY_COMMAND[r.kind].model_fields


def _format_error(
    name: str, exc: ValidationError, model: type[BaseModel], applied: Mapping[str, Any]
) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        # Name the allowed keys of the nested model the unknown key sits in.
        sub: Any = model
        for part in err["loc"][:-1]:
            if isinstance(part, int):
                continue
            f = (
                sub.model_fields.get(part)
                if isinstance(sub, type) and issubclass(sub, BaseModel)
                else None
            )
            ann = getattr(f, "annotation", None)
            inner = getattr(ann, "__args__", None) or (ann,)
            sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        allowed = sorted(sub.model_fields) if sub is not None else []
        there = did_you_mean(
            str(err["loc"][-1]), allowed, f"allowed keys there: {', '.join(allowed)}"
        )
        return f"stage {name}: unknown key {loc!r}; {there}"
    given = next(
        (
            f" (override {k}={v!r})"
            for k, v in applied.items()
            if loc.startswith(k) or k.startswith(loc)
        ),
        "",
    )
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"stage {name}: {loc}: {err['msg']}{given}{more}"


def get_stage(
    name: str,
    profile: str | Profile | None = "tiny",
    overrides: Mapping[str, Any] | None = None,
    *,
    shared: Mapping[str, Any] | None = None,
) -> StageSpec:
    """Resolve stage `name` for `profile`, with overrides applied and validated.

    `overrides` are strict: every key must be one this stage takes (else ConfigError naming the
    key and listing the allowed ones). `shared` are study-wide overrides (orch.toml's
    `[experiment] overrides`, `run-all --set`): keys this stage does not take are skipped, so
    `max_steps=50` can apply to every training stage. A key may be scoped to one stage
    (`stage3a.max_steps=50`); a scoped key for another stage is ignored here.
    Values may be strings from the command line; they are parsed as JSON when possible.
    """
    r = recipe(name)
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    if r.kind == "report":
        return StageSpec(
            name=r.name,
            stage_dir=r.stage_dir,
            description=r.description,
            task=WorkerTask(
                command="exec", args={"argv": ["python", "-m", "orchestrator", "report"]}
            ),
            outputs=["reports/RESULTS.md"],
            timeout_s=600,
            stale_after_s=600,
            local_only=True,
        )

    applied: dict[str, Any] = {}
    for strict, source in ((False, shared), (True, overrides)):
        for raw_key, value in ov.normalize(source).items():
            scope, key = ov.split_scope(raw_key, STAGE_NAMES)
            if scope is not None and scope != name:
                continue
            val = ov.parse_value(value) if isinstance(value, str) else value
            if not _takes(name, key):
                if strict or scope == name:
                    raise ConfigError(
                        f"stage {name} ({r.kind}) does not take the key {key!r}",
                        hint=_key_hint(key, allowed_keys(name)),
                    )
                continue
            applied[key] = val

    args = _base_args(r, p)
    spec_fields = _spec_fields(r, p)
    for key, val in applied.items():
        if key in ov.SPEC_KEYS:
            ov.set_path(spec_fields, key, val)
        else:
            ov.set_path(args, key, val)
    if p.model_follows_seed and args.get("model") == p.model and isinstance(args.get("seed"), int):
        args["model"] = seeded_model(p.model, args["seed"])

    model = ARGS_BY_COMMAND[r.kind]
    try:
        validated = model.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(_format_error(name, exc, model, applied)) from None
    try:
        resources = Resources.model_validate(spec_fields["resources"])
        spec = StageSpec(
            name=r.name,
            stage_dir=r.stage_dir,
            description=r.description,
            task=WorkerTask(command=r.kind, args=validated.model_dump(mode="json")),
            inputs=[InputRef(stage=r.input_stage, artifact=CHECKPOINT, arg="model")]
            if r.input_stage
            else [],
            outputs=[names.METRICS] if r.kind == "eval" else [names.SUMMARY, CHECKPOINT],
            timeout_s=spec_fields["timeout_s"],
            stale_after_s=spec_fields["stale_after_s"],
            poll_interval_s=spec_fields["poll_interval_s"],
            resources=resources,
            nproc_per_node=spec_fields["nproc_per_node"],
            nodes=_whole(name, "nodes", spec_fields["nodes"]),
            tasks_per_node=_whole(name, "tasks_per_node", spec_fields["tasks_per_node"]),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(map(str, err["loc"]))
        if "resources" not in loc and loc in {"gpus", "min_gpu_ram_gb"}:
            loc = f"resources.{loc}"
        raise ConfigError(f"stage {name}: {loc}: {err['msg']}") from None
    if spec.timeout_s <= 0 or spec.stale_after_s <= 0 or spec.nproc_per_node < 1:
        raise ConfigError(
            f"stage {name}: timeout_s and stale_after_s must be > 0 and nproc_per_node >= 1"
        )
    if spec.tasks > 1 and r.kind != "train":
        raise ConfigError(
            f"stage {name} ({r.kind}): nodes and tasks_per_node are for training stages only"
        )
    return spec


def _whole(stage: str, key: str, value: Any) -> int:
    """`nodes`/`tasks_per_node`: a whole number >= 1 (not `2.5`, `true` or `"two"`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"stage {stage}: {key} must be a whole number >= 1, not {value!r}")
    return value


def list_stages(
    profile: str | Profile | None = "tiny",
    *,
    shared: Mapping[str, Any] | None = None,
    include_report: bool = True,
) -> list[StageSpec]:
    """Every stage of the study resolved for `profile`, in a valid run order."""
    check_shared(shared, STAGE_NAMES)
    return [
        get_stage(n, profile, shared=shared)
        for n in STAGE_NAMES
        if include_report or n != REPORT_STAGE
    ]


def check_shared(shared: Mapping[str, Any] | None, stages: tuple[str, ...] | list[str]) -> None:
    """ConfigError when a study-wide override is taken by none of `stages` (a typo)."""
    for raw_key in ov.normalize(shared):
        scope, key = ov.split_scope(raw_key, STAGE_NAMES)
        candidates = [scope] if scope else list(stages)
        if scope is None and not any(_takes(s, key) for s in candidates):
            keys = sorted({k for s in candidates for k in allowed_keys(s)})
            raise ConfigError(
                f"no stage of {', '.join(candidates)} takes the key {key!r}",
                hint=_key_hint(key, keys),
            )
        if scope is not None and not _takes(scope, key):
            raise ConfigError(
                f"stage {scope} does not take the key {key!r}",
                hint=_key_hint(key, allowed_keys(scope)),
            )
