"""The report's data model: what `jobs.report` reads from the pulled runs and
`jobs.report_text` renders (plain dataclasses, no I/O).

    TaskScore    one task's accuracy in one eval run
    LeakProbe    one leakage-probe measurement of a training run
    StageResult  everything read from one stage's run (spec, metrics, summary, events)
    ReportData   the study of one seed: every stage's result and the study's math
    StudyReport  the study per seed and its spread across seeds
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.recovery import StudyMath
from jobs.seeds import SeedStudy


@dataclass
class TaskScore:
    acc: float | None
    acc_norm: float | None = None
    n: int | None = None
    chance: float | None = None


@dataclass
class LeakProbe:
    mask: str
    loss_mask: float | None
    loss_causal: float | None
    ratio: float | None
    flagged: bool | None
    step: int | None = None
    #: The counterfactual test: loss change and max |logit change| at label positions when the
    #: tokens after a cut are replaced (0 for a leak-free mask, whatever the weights learned).
    future_sensitivity: float | None = None
    max_logit_diff: float | None = None


@dataclass
class StageResult:
    stage: str
    stage_dir: str
    run_id: str
    run_dir: str
    kind: str
    commit: str | None = None
    dirty: bool = False
    profile: str | None = None
    target: str | None = None
    model: str | None = None
    #: the pinned inputs of spec.json: the model's hub revision, and each data set's
    #: (`name@revision`; `default branch` when unpinned)
    revisions: dict[str, str] = field(default_factory=dict)
    mask: str | None = None
    macro_acc: float | None = None
    macro_acc_norm: float | None = None
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    train_loss: float | None = None
    eval_loss: float | None = None
    steps: int | None = None
    throughput: dict[str, float] = field(default_factory=dict)
    probes: list[LeakProbe] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    profile_chance: float | None = None  # the profile's stated chance level, when tasks omit it
    seed: int | None = None  # the study seed the run was launched with

    @property
    def chance(self) -> float | None:
        values = [t.chance for t in self.tasks.values() if t.chance is not None]
        if values and len(values) == len(self.tasks):
            return sum(values) / len(values)
        return self.profile_chance


@dataclass
class ReportData:
    runs_dir: str
    stages: dict[str, StageResult]
    math: StudyMath
    profiles: list[str]
    generated_at: str
    seed: int | None = None
    #: stages of the study with no succeeded pulled run (for this seed)
    missing: list[str] = field(default_factory=list)

    @property
    def profile(self) -> str:
        return (
            self.profiles[0]
            if len(self.profiles) == 1
            else ("mixed: " + ", ".join(self.profiles) if self.profiles else "unknown")
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "profile": self.profile,
            "profiles": self.profiles,
            "generated_at": self.generated_at,
            "runs_dir": self.runs_dir,
            "seed": self.seed,
            "missing": self.missing,
            "stages": {},
            "math": self.math.to_dict(),
        }
        for name, r in self.stages.items():
            d = asdict(r)
            d["train_curve"] = [list(p) for p in r.train_curve]
            d["eval_curve"] = [list(p) for p in r.eval_curve]
            out["stages"][name] = d
        return out


@dataclass
class StudyReport:
    """The study per seed (`runs[seed]`, seed order) and its spread across seeds."""

    runs: dict[int | None, ReportData]
    spread: SeedStudy

    @property
    def first(self) -> ReportData:
        return next(iter(self.runs.values()))

    def to_json(self) -> dict[str, Any]:
        """The first seed's numbers as the top level (the single-seed shape), plus `seeds`."""
        out = self.first.to_json()
        out["seeds"] = {
            "seeds": list(self.runs),
            "per_seed": {str(k): v.to_json() for k, v in self.runs.items()},
            **self.spread.to_dict(),
        }
        return out
