"""The study over several seeds: mean and spread per stage and task, and whether each
conclusion outlives the seed-to-seed noise (pure; no I/O).

    study = across_seeds({0: acc0, 1: acc1, 2: acc2})   # {seed: {stage: {task: acc, "macro": acc}}}
    study.stages["stage2"]["macro"].mean, .sd, .lo, .hi
    study.figures["gap_closed_3B"].beyond_noise          # |mean| > 2 sd and one sign on every seed
    [c.holds for c in study.claims]                      # the seed's shape, checked per seed

One seed's numbers say what one pre-training and one fine-tune did; a difference between stages
is a finding only when it is larger than what changing the seed alone moves. The tiny model is
rebuilt from the seed (its initial weights, pre-training rows and batch order), so the spread
covers pre-training as well as fine-tuning. On the same machine every seed's numbers are
bit-identical run to run; across machines (other CPU kernels round differently) the
per-seed numbers move, and the claims are what must hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.recovery import study_math

#: A figure counts as larger than the seed-to-seed spread when its sign is the same on every
#: seed and |mean| > NOISE_SDS * the sample sd across seeds. (One sd of the seeds, not of the
#: mean: with 5 seeds that is already about 2.2 standard errors.)
NOISE_SDS = 1.0

#: `{seed: {stage: {"macro": acc, task: acc, ...}}}`
SeedAcc = Mapping[int | None, Mapping[str, Mapping[str, float | None]]]


@dataclass(frozen=True)
class Spread:
    """Mean, sample sd (0 for one value), range and the values themselves, seed order."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def sd(self) -> float:
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def one_sign(self) -> bool:
        return all(v > 0 for v in self.values) or all(v < 0 for v in self.values)

    @property
    def beyond_noise(self) -> bool:
        """Larger than the seed-to-seed spread: one sign on every seed and |mean| > sd."""
        return self.n >= 2 and self.one_sign and abs(self.mean) > NOISE_SDS * self.sd

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f} ± {self.sd:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "sd": self.sd,
            "min": self.lo,
            "max": self.hi,
            "n": self.n,
            "values": list(self.values),
            "beyond_noise": self.beyond_noise,
        }


def spread(values: Sequence[float | None]) -> Spread | None:
    """The spread of the values that exist (None when none does)."""
    got = tuple(v for v in values if v is not None and math.isfinite(v))
    return Spread(got) if got else None


@dataclass(frozen=True)
class Claim:
    """One conclusion of the study, checked on each seed separately."""

    key: str
    text: str
    per_seed: dict[int | None, bool | None]  # None: a stage it needs is missing on that seed

    @property
    def checked(self) -> int:
        return sum(v is not None for v in self.per_seed.values())

    @property
    def held(self) -> int:
        return sum(v is True for v in self.per_seed.values())

    @property
    def holds(self) -> bool:
        """True on every seed, and checked on every seed."""
        return self.checked == len(self.per_seed) > 0 and self.held == self.checked

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "holds": self.holds,
            "held": self.held,
            "checked": self.checked,
            "per_seed": {str(k): v for k, v in self.per_seed.items()},
        }


def _macro(acc: Mapping[str, Mapping[str, float | None]], stage: str) -> float | None:
    return (acc.get(stage) or {}).get("macro")


def _lt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a < b


#: The seed's shape (Ministral 3B): the claims the study makes, each a test on one seed's macro
#: accuracies. Text says what holding means.
CLAIMS: tuple[
    tuple[str, str, Callable[[Mapping[str, Mapping[str, float | None]]], bool | None]], ...
] = (
    (
        "ablation_hurts",
        "a bidirectional prompt costs the causally trained model accuracy (stage 2 < stage 1)",
        lambda a: _lt(_macro(a, "stage2"), _macro(a, "stage1")),
    ),
    (
        "prefix_ft_recovers",
        "prefix-LM fine-tuning (3B) wins accuracy back under the bidirectional prompt "
        "(stage 4 > stage 2)",
        lambda a: _lt(_macro(a, "stage2"), _macro(a, "stage4")),
    ),
    (
        "prefix_ft_beats_causal_ft",
        "prefix-LM fine-tuning recovers more than causal fine-tuning (stage 4 > stage 4A)",
        lambda a: _lt(_macro(a, "stage4a"), _macro(a, "stage4")),
    ),
)


def _figures(acc: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """The recovery figures of one seed, named."""
    m = study_math({s: _macro(acc, s) for s in acc})
    out: dict[str, float | None] = {"delta": m.delta, "retention": m.retention.value}
    for rec in m.recoveries:
        out[f"gap_closed_{rec.fine_tune}"] = rec.gap_closed.value
        out[f"recovery_{rec.fine_tune}"] = rec.vs_baseline.value
        out[f"vs_stage2_{rec.fine_tune}"] = rec.delta_vs_ablated
    return out


#: Figure key -> what it is, for the report.
FIGURES: dict[str, str] = {
    "delta": "delta, stage 2 - stage 1",
    "retention": "retention, stage 2 / stage 1",
    "vs_stage2_3A": "4A - stage 2 (causal FT)",
    "vs_stage2_3B": "4 - stage 2 (prefix FT)",
    "gap_closed_3A": "gap closed by 3A (causal FT)",
    "gap_closed_3B": "gap closed by 3B (prefix FT)",
    "recovery_3A": "recovery vs stage 1, 3A",
    "recovery_3B": "recovery vs stage 1, 3B",
}
#: Figures whose size against the noise is the finding (a ratio such as retention is compared
#: with 1, not 0, so it is shown but not judged).
JUDGED = ("delta", "vs_stage2_3A", "vs_stage2_3B", "gap_closed_3A", "gap_closed_3B")


@dataclass
class SeedStudy:
    seeds: list[int | None]
    #: stage -> task (and "macro") -> spread over the seeds that ran it
    stages: dict[str, dict[str, Spread]] = field(default_factory=dict)
    figures: dict[str, Spread] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "stages": {s: {t: v.to_dict() for t, v in d.items()} for s, d in self.stages.items()},
            "figures": {k: v.to_dict() for k, v in self.figures.items()},
            "claims": {c.key: c.to_dict() for c in self.claims},
        }


def across_seeds(per_seed: SeedAcc) -> SeedStudy:
    """Aggregate `{seed: {stage: {task or "macro": acc}}}` (see the module docstring)."""
    seeds = list(per_seed)
    study = SeedStudy(seeds=seeds)
    stage_names = list(dict.fromkeys(s for acc in per_seed.values() for s in acc))
    for stage in stage_names:
        keys = list(dict.fromkeys(k for acc in per_seed.values() for k in acc.get(stage, {})))
        row = {}
        for key in keys:
            sp = spread([(acc.get(stage) or {}).get(key) for acc in per_seed.values()])
            if sp is not None:
                row[key] = sp
        if row:
            study.stages[stage] = row
    figs = {seed: _figures(acc) for seed, acc in per_seed.items()}
    for key in FIGURES:
        sp = spread([f.get(key) for f in figs.values()])
        if sp is not None:
            study.figures[key] = sp
    for key, text, test in CLAIMS:
        study.claims.append(Claim(key, text, {seed: test(acc) for seed, acc in per_seed.items()}))
    return study
