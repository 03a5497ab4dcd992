"""The study across seeds (jobs.seeds) and `--seeds` parsing: pure, fixed inputs."""

from __future__ import annotations

import pytest

from jobs.seeds import NOISE_SDS, across_seeds, spread
from orchestrator.commands.run_all import parse_seeds
from state.errors import ConfigError


def test_spread_is_the_sample_sd_and_noise_needs_one_sign_and_two_sds() -> None:
    s = spread([0.1, 0.2, 0.3, None])
    assert s is not None and s.n == 3 and s.mean == pytest.approx(0.2)
    assert s.sd == pytest.approx(0.1) and (s.lo, s.hi) == (0.1, 0.3)
    assert s.beyond_noise  # 0.2 > 0.1, all positive
    assert not spread([0.01, 0.3, 0.02]).beyond_noise  # type: ignore[union-attr]  # 0.11 < 0.16
    assert not spread([-0.1, 0.5, 0.6]).beyond_noise  # type: ignore[union-attr]  # signs differ
    assert not spread([0.3]).beyond_noise  # type: ignore[union-attr]  # one seed is no spread
    assert spread([None, float("nan")]) is None
    assert NOISE_SDS == 1.0


def _acc(s1: float, s2: float, s4a: float, s4: float) -> dict[str, dict[str, float | None]]:
    return {
        "stage1": {"macro": s1, "dup": s1},
        "stage2": {"macro": s2, "dup": s2},
        "stage4a": {"macro": s4a, "dup": s4a},
        "stage4": {"macro": s4, "dup": s4},
    }


def test_claims_are_checked_per_seed_and_a_missing_stage_is_not_a_pass() -> None:
    st = across_seeds(
        {0: _acc(0.9, 0.7, 0.7, 0.85), 1: _acc(0.9, 0.72, 0.75, 0.8), 2: _acc(0.9, 0.95, 0.7, 0.9)}
    )
    claims = {c.key: c for c in st.claims}
    assert claims["ablation_hurts"].per_seed == {0: True, 1: True, 2: False}
    assert not claims["ablation_hurts"].holds and claims["ablation_hurts"].held == 2
    assert claims["prefix_ft_beats_causal_ft"].holds
    assert st.figures["gap_closed_3B"].n == 3
    assert st.stages["stage2"]["dup"].values == (0.7, 0.72, 0.95)
    partial = across_seeds({0: _acc(0.9, 0.7, 0.7, 0.85), 1: {"stage1": {"macro": 0.9}}})
    c = {c.key: c for c in partial.claims}["ablation_hurts"]
    assert c.per_seed[1] is None and not c.holds  # not checked on seed 1: not a pass


def test_parse_seeds() -> None:
    assert parse_seeds(None) is None
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,4,7") == [0, 4, 7]
    assert parse_seeds("5", count=False) == [5]
    for bad in ("0", "x", "-1", "1,1", ""):
        with pytest.raises(ConfigError) as exc:
            parse_seeds(bad)
        assert "\n" not in str(exc.value)
