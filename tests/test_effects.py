"""Effect sizes, equivalence, p-value corrections and rank stability against hand-worked values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nnunet_selfreg.evaluation.effects import (
    adjust_pvalues,
    hodges_lehmann,
    rank_biserial,
    rank_stability,
    tost,
    win_tie_loss,
)


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, 0.04, 0.04 after the running maximum; NaN stays NaN
    out = adjust_pvalues([0.04, 0.01, math.nan, 0.02], "holm")
    assert out[0] == pytest.approx(0.04) and out[1] == pytest.approx(0.03) and out[3] == pytest.approx(0.04)
    assert math.isnan(out[2])
    assert adjust_pvalues([0.5, 0.6], "holm") == pytest.approx([1.0, 1.0])  # capped at 1


def test_bh_by_hand_and_none():
    # m = 4, sorted 0.01 0.02 0.03 0.20: 0.04, 0.04, 0.04, 0.20
    assert adjust_pvalues([0.03, 0.2, 0.01, 0.02], "bh") == pytest.approx([0.04, 0.2, 0.04, 0.04])
    assert adjust_pvalues([0.03, 0.2], "none") == pytest.approx([0.03, 0.2])
    with pytest.raises(ValueError, match="holm, bh, none"):
        adjust_pvalues([0.1], "bonferroni")


def test_hodges_lehmann_by_hand():
    # d = 1, 2, 4: Walsh averages 1, 1.5, 2.5, 2, 3, 4 -> median 2.25; with n = 3 no cut is possible
    est, low, high = hodges_lehmann(np.array([1.0, 2.0, 4.0]))
    assert est == pytest.approx(2.25) and (low, high) == (1.0, 4.0)


def test_hodges_lehmann_interval_inverts_the_exact_wilcoxon_test():
    # n = 10: P(T+ <= 8) = 0.0244 <= 0.025 < P(T+ <= 9) -> the 95% interval is [W_(9), W_(47)]
    d = np.array([-0.31, 0.12, 0.45, 0.08, 0.67, -0.05, 0.29, 0.9, 0.38, 0.21])
    est, low, high = hodges_lehmann(d)
    i, j = np.triu_indices(10)
    walsh = np.sort((d[i] + d[j]) / 2)
    assert (low, high) == (walsh[8], walsh[46])
    assert est == pytest.approx(np.median(walsh))
    # shifts just inside the interval are not rejected at 5 %, just outside they are
    for theta, rejected in ((low - 1e-6, True), (low + 1e-6, False), (high - 1e-6, False), (high + 1e-6, True)):
        p = stats.wilcoxon(d - theta, method="exact").pvalue
        assert (p < 0.05) == rejected, (theta, p)


def test_rank_biserial_and_win_tie_loss():
    # d = 0.3, -0.1, 0.2, 0 (zero dropped): ranks of |d| 3, 1, 2 -> (5 - 1) / 6
    d = np.array([0.3, -0.1, 0.2, 0.0, math.nan])
    assert rank_biserial(d) == pytest.approx(4 / 6)
    assert win_tie_loss(d) == (2, 1, 1)
    assert math.isnan(rank_biserial(np.zeros(3)))


def test_tost_shows_equivalence_only_for_a_margin_wider_than_the_spread():
    rng = np.random.default_rng(0)
    d = rng.normal(0.0, 0.01, 30)
    assert tost(d, 0.05).equivalent
    narrow = tost(d, 0.001)
    assert not narrow.equivalent and narrow.p_value == max(narrow.p_lower, narrow.p_upper)
    assert not tost(d + 0.1, 0.05).equivalent  # a real shift is not "equivalent"
    with pytest.raises(ValueError, match="margin"):
        tost(d, 0.0)


def test_rank_stability_separated_models_are_stable_and_close_ones_are_not():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.9, 40)
    values = {"a": base + 0.2, "b": base, "c": base + rng.normal(0, 0.02, 40), "d": base - 0.2}
    out = rank_stability(values, n_boot=300, seed=0)
    assert out.full_ranks["a"] == 1 and out.full_ranks["d"] == 4
    assert out.rank_counts["a"][0] == 300 and out.rank_counts["d"][3] == 300  # always first / last
    assert 0 < out.rank_counts["b"][1] < 300  # b and c swap places between resamples
    assert sum(out.rank_counts["c"]) == 300
    assert 0.6 < out.tau["median"] <= 1.0 and out.tau["p2.5"] < 1.0
    # same seed, same result
    assert rank_stability(values, n_boot=300, seed=0).rank_counts == out.rank_counts


def test_rank_stability_resamples_runs_too():
    """Two arms whose runs disagree about the order: case resampling alone (identical runs) never swaps them,
    resampling the runs does."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 0.9, 30)
    folds = np.repeat(np.arange(3), 10)
    steady = {"a": np.stack([base + 0.01, base + 0.01]), "b": np.stack([base, base])}
    assert rank_stability(steady, n_boot=200, seed=0, folds=folds).rank_counts["a"] == [200, 0]
    # arm a: one run well above b, one well below; their mean is still above b
    noisy = {"a": np.stack([base + 0.06, base - 0.04]), "b": np.stack([base, base])}
    out = rank_stability(noisy, n_boot=400, seed=0, folds=folds)
    assert out.full_ranks == {"a": 1.0, "b": 2.0}
    assert 0 < out.rank_counts["a"][1] < 400 and out.n_cases == 30
