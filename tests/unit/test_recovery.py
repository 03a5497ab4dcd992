"""Recovery math on fixed inputs, including the seed's own figures."""

from __future__ import annotations

import math

import pytest

from jobs.recovery import (
    delta,
    gap_closed,
    leak_ratio,
    macro,
    ratio,
    recovery_vs_baseline,
    retention,
    study_math,
)

SEED_S1, SEED_S2 = 0.695057, 0.355898


def test_seed_figures() -> None:
    d = delta(SEED_S1, SEED_S2)
    assert d is not None and round(d, 6) == -0.339159
    ret = retention(SEED_S1, SEED_S2)
    assert ret.value is not None and round(ret.value, 3) == 0.512
    assert ret.fmt(3, "x") == "0.512x"


def test_recovery_ratios() -> None:
    assert recovery_vs_baseline(0.8, 0.6).value == pytest.approx(0.75)
    # half of the ablation's loss recovered
    assert gap_closed(0.7, 0.4, 0.55).value == pytest.approx(0.5)
    # all of it, and more than all of it
    assert gap_closed(0.7, 0.4, 0.7).value == pytest.approx(1.0)
    assert gap_closed(0.7, 0.4, 0.8).value == pytest.approx(4 / 3)
    # worse than the ablated model: negative
    assert gap_closed(0.7, 0.4, 0.3).value == pytest.approx(-1 / 3)


def test_division_by_zero_is_explicit() -> None:
    r = retention(0.0, 0.3)
    assert r.value is None and "stage 1 accuracy is 0" in r.reason
    assert r.fmt() == "n/a (stage 1 accuracy is 0)"
    g = gap_closed(0.5, 0.5, 0.6)
    assert g.value is None and "no drop" in g.reason
    assert recovery_vs_baseline(0.0, 0.4).value is None
    assert ratio(1.0, 1e-15).value is None
    assert leak_ratio(0.07, 0.0).value is None


def test_missing_inputs() -> None:
    assert delta(None, 0.3) is None
    assert retention(0.6, None).reason == "missing input"
    assert gap_closed(0.6, 0.3, None).value is None


def test_study_math_with_seed_and_made_up_stage4() -> None:
    m = study_math({"stage1": SEED_S1, "stage2": SEED_S2, "stage4": 0.6, "stage4a": 0.4})
    assert m.delta is not None and round(m.delta, 6) == -0.339159
    by = {r.fine_tune: r for r in m.recoveries}
    assert by["3B"].eval_stage == "stage4" and by["3A"].eval_stage == "stage4a"
    assert by["3B"].vs_baseline.value == pytest.approx(0.6 / SEED_S1)
    assert by["3B"].gap_closed.value == pytest.approx((0.6 - SEED_S2) / (SEED_S1 - SEED_S2))
    assert by["3A"].delta_vs_ablated == pytest.approx(0.4 - SEED_S2)
    d = m.to_dict()
    assert d["retention"]["value"] == pytest.approx(SEED_S2 / SEED_S1)
    # a study with only stage 1: everything else undefined, nothing raises
    only = study_math({"stage1": 0.7})
    assert only.delta is None and all(r.accuracy is None for r in only.recoveries)


def test_macro() -> None:
    assert macro({"a": 0.5, "b": 1.0}) == pytest.approx(0.75)
    assert macro({}) is None
    assert not math.isnan(macro({"a": 0.0}) or 0.0)
