"""Recovery math of the study, on fixed inputs (pure; no I/O).

    delta       = stage2 - stage1                       (what the bidirectional prompt costs)
    retention   = stage2 / stage1                       (the seed: 0.355898 / 0.695057 = 0.512x)
    recovery    = stage4 / stage1                       (post-FT ablated vs the causal baseline)
    gap_closed  = (stage4 - stage2) / (stage1 - stage2) (share of the lost accuracy won back)

for 3B (`stage4`, the prefix-LM fine-tune) and 3A (`stage4a`, the causal fine-tune). A ratio
whose denominator is zero (a zero baseline, or no drop to close) is None with the reason, never
an infinity or an exception; a missing input gives None too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: |denominator| below this is treated as zero (accuracies are fractions in [0, 1]).
EPS = 1e-12


@dataclass(frozen=True)
class Ratio:
    """A ratio, or None with the reason it is undefined."""

    value: float | None
    reason: str = ""

    def fmt(self, digits: int = 3, suffix: str = "") -> str:
        return (
            f"{self.value:.{digits}f}{suffix}" if self.value is not None else f"n/a ({self.reason})"
        )


def delta(base: float | None, other: float | None) -> float | None:
    """`other - base` (None if either is missing)."""
    if base is None or other is None:
        return None
    return other - base


def ratio(num: float | None, den: float | None, *, zero_reason: str = "division by zero") -> Ratio:
    """`num / den`, explicit about missing inputs and a zero denominator."""
    if num is None or den is None:
        return Ratio(None, "missing input")
    if abs(den) < EPS:
        return Ratio(None, zero_reason)
    return Ratio(num / den)


def retention(stage1: float | None, stage2: float | None) -> Ratio:
    """stage2 / stage1: the share of baseline accuracy kept under the bidirectional prompt."""
    return ratio(stage2, stage1, zero_reason="stage 1 accuracy is 0")


def recovery_vs_baseline(stage1: float | None, stage4: float | None) -> Ratio:
    """stage4 / stage1."""
    return ratio(stage4, stage1, zero_reason="stage 1 accuracy is 0")


def gap_closed(stage1: float | None, stage2: float | None, stage4: float | None) -> Ratio:
    """(stage4 - stage2) / (stage1 - stage2): 1.0 = all of the ablation's loss recovered.

    Undefined when stage 1 and stage 2 are equal: there was no drop to recover.
    """
    return ratio(
        delta(stage2, stage4),
        delta(stage2, stage1),
        zero_reason="stage 1 == stage 2: no drop to recover",
    )


@dataclass(frozen=True)
class Recovery:
    """One fine-tune's recovery (3A or 3B)."""

    fine_tune: str  # "3A" or "3B"
    eval_stage: str  # "stage4a" or "stage4"
    accuracy: float | None
    vs_baseline: Ratio
    gap_closed: Ratio
    delta_vs_ablated: float | None  # stage4 - stage2
    delta_vs_baseline: float | None  # stage4 - stage1


@dataclass(frozen=True)
class StudyMath:
    """Every derived number of the report, from the stages' macro accuracies."""

    stage1: float | None
    stage2: float | None
    delta: float | None
    retention: Ratio
    recoveries: list[Recovery] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: (fine-tune label, its post-FT ablated eval stage)
FINE_TUNES: tuple[tuple[str, str], ...] = (("3A", "stage4a"), ("3B", "stage4"))


def study_math(acc: Mapping[str, float | None]) -> StudyMath:
    """Derived numbers from `{stage name: macro accuracy}` (missing stages -> None)."""
    s1, s2 = acc.get("stage1"), acc.get("stage2")
    recs = []
    for label, stage in FINE_TUNES:
        s4 = acc.get(stage)
        recs.append(
            Recovery(
                fine_tune=label,
                eval_stage=stage,
                accuracy=s4,
                vs_baseline=recovery_vs_baseline(s1, s4),
                gap_closed=gap_closed(s1, s2, s4),
                delta_vs_ablated=delta(s2, s4),
                delta_vs_baseline=delta(s1, s4),
            )
        )
    return StudyMath(
        stage1=s1, stage2=s2, delta=delta(s1, s2), retention=retention(s1, s2), recoveries=recs
    )


def macro(values: Mapping[str, float]) -> float | None:
    """Unweighted mean over tasks (None for no tasks)."""
    return sum(values.values()) / len(values) if values else None


def leak_ratio(loss_mask: float | None, loss_causal: float | None) -> Ratio:
    """Loss under the training mask / causal loss on the same weights and samples.

    Far below 1 means the mask lets tokens see what they must predict (the seed: 0.070/1.023).
    """
    return ratio(loss_mask, loss_causal, zero_reason="causal loss is 0")
