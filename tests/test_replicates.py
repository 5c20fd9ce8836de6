"""Runs as replicates: arms from names, the hierarchical resampling, the run-level test, the detectable
difference and the verdicts against hand-worked values and independent formulas; and the calibration
on simulated A/A data (the run-level test rejects at about 5 %, the case-level Wilcoxon test far more)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from nnunet_selfreg.evaluation.calibration import Design, calibrate
from nnunet_selfreg.evaluation.model import Arm, PairedDifference, RunLevelResult
from nnunet_selfreg.evaluation.replicates import (
    detectable_difference,
    hierarchical_interval,
    inflate_runs,
    parse_arms,
    repeat_of,
    resampled_means,
    run_equivalence,
    run_t_test,
    verdict,
)
from nnunet_selfreg.evaluation.results import CompareInputError


@pytest.mark.parametrize(
    ("name", "arm"),
    [
        ("nnUNetTrainer_Rep2", "nnUNetTrainer"),
        ("nnUNetTrainer_Rep3_Budget", "nnUNetTrainer_Budget"),  # demo --repeats
        ("nnUNetTrainerSelfReg_Budget_Rep2", "nnUNetTrainerSelfReg_Budget"),  # a full trainer name + _RepK
        ("nnUNetTrainer_100epochs_Rep2", "nnUNetTrainer_100epochs"),
        ("nnUNetTrainer_Rep2__nnUNetPlans__2d", "nnUNetTrainer__nnUNetPlans__2d"),
        ("nnUNetTrainer_Replay", "nnUNetTrainer_Replay"),
    ],
)
def test_repeat_of(name: str, arm: str) -> None:
    assert repeat_of(name) == arm


def test_parse_arms_groups_repeats_and_takes_explicit_arms() -> None:
    arms = parse_arms(["A", "B", "A_Rep2", "mine=/x/run1,/x/run2", "B_Rep2", "ensembles/e"])
    assert arms == [
        Arm("A", ["A", "A_Rep2"]),
        Arm("B", ["B", "B_Rep2"]),
        Arm("mine", ["/x/run1", "/x/run2"]),
        Arm("ensembles/e", ["ensembles/e"]),
    ]
    assert parse_arms(["/data/a=b/T__P__C", "x"])[0] == Arm("/data/a=b/T__P__C", ["/data/a=b/T__P__C"])  # a path
    with pytest.raises(CompareInputError, match="given twice"):
        parse_arms(["A", "A=B,C"])
    with pytest.raises(CompareInputError, match="NAME=RUN,RUN"):
        parse_arms(["A", "x=B,"])


def test_inflated_runs_keep_the_mean_and_scale_the_deviations() -> None:
    runs = np.array([[1.0, 2.0], [3.0, 6.0]])
    out = inflate_runs(runs)
    assert out.mean(axis=0) == pytest.approx(runs.mean(axis=0))
    assert out - out.mean(axis=0) == pytest.approx(math.sqrt(2) * (runs - runs.mean(axis=0)))
    assert inflate_runs(runs[:1]) is not None and (inflate_runs(runs[:1]) == runs[:1]).all()


def test_resampling_is_paired_and_stratified_by_fold() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, (1, 20))
    folds = np.repeat([0, 1], 10)
    # one run each, other = base + 0.1 in every case: the same cases are drawn for both arms
    assert hierarchical_interval(base, base + 0.1, folds, 500, 0) == pytest.approx((0.1, 0.1))
    # each fold keeps its number of cases: fold 0 all ones, fold 1 all zeros -> every resample has mean 0.5
    values = np.concatenate([np.ones(10), np.zeros(10)])[None]
    assert resampled_means([values], folds, 300, rng)[:, 0] == pytest.approx(0.5)


def test_resampled_run_variance_matches_the_run_to_run_variance() -> None:
    """Two runs that differ by delta in every case of a fold: per fold, the resampled mean of the (inflated)
    runs is +delta/sqrt(2), 0, -delta/sqrt(2) with probabilities 1/4, 1/2, 1/4 (variance delta^2 / 4, the
    variance of a two-run mean when the run-to-run variance is delta^2 / 2); the five folds are drawn
    independently, each weighing 1/5: SD = delta / 2 / sqrt(5)."""
    delta, folds = 0.04, np.repeat(np.arange(5), 4)
    other = np.stack([np.full(20, delta / 2), np.full(20, -delta / 2)])
    means = resampled_means([np.zeros((1, 20)), other], folds, 40_000, np.random.default_rng(1))
    diff = means[:, 1] - means[:, 0]
    assert diff.mean() == pytest.approx(0.0, abs=3 * delta / 2 / math.sqrt(5) / math.sqrt(40_000))
    assert diff.std() == pytest.approx(delta / 2 / math.sqrt(5), rel=0.02)


def test_run_t_test_and_equivalence_by_hand() -> None:
    base, other = np.array([0.61, 0.63, 0.62]), np.array([0.64, 0.66])
    t, df, p = run_t_test(base, other)
    sp = math.sqrt((2 * base.var(ddof=1) + other.var(ddof=1)) / 3)
    se = sp * math.sqrt(1 / 3 + 1 / 2)
    diff = other.mean() - base.mean()
    assert (t, df, p) == pytest.approx((diff / se, 3, 2 * stats.t.sf(diff / se, 3)))
    eq = run_equivalence(base, other, 0.05)
    assert eq.p_lower == pytest.approx(stats.t.sf((diff + 0.05) / se, 3))
    assert eq.p_upper == pytest.approx(stats.t.cdf((diff - 0.05) / se, 3))
    assert eq.p_value == max(eq.p_lower, eq.p_upper) and eq.equivalent == (eq.p_value < 0.05)
    # vectorised over simulations: the same numbers row by row
    rows_t, _, rows_p = run_t_test(np.stack([base, base + 0.01]), np.stack([other, other]))
    assert rows_t[0] == pytest.approx(t) and rows_p[0] == pytest.approx(p)


@pytest.mark.parametrize(("k_base", "k_other"), [(2, 2), (3, 3), (3, 2), (5, 5)])
def test_detectable_difference_has_80_percent_power(k_base: int, k_other: int) -> None:
    """At the detectable difference the two-sided t-test (df = K_a + K_b - 2) rejects with probability 0.8:
    the noncentral t with noncentrality difference / (sd sqrt(1/K_a + 1/K_b)) (scipy.stats.nct)."""
    sd = 0.01
    mdd = detectable_difference(sd, k_base, k_other)
    df = k_base + k_other - 2
    nc = mdd / (sd * math.sqrt(1 / k_base + 1 / k_other))
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.8, abs=1e-3)
    assert math.isnan(detectable_difference(sd, 1, 3))


def _case(diff: float) -> PairedDifference:
    return PairedDifference(6, 0, 0.5, 0.5 + diff, diff, -1, 1, "BCa", 1, 0.01, 6, "")


def _run(diff: float, p: float, equivalent: bool | None = None) -> RunLevelResult:
    from nnunet_selfreg.evaluation.model import Equivalence

    eq = None if equivalent is None else Equivalence(0.01, 0.01, 0.01, 0.01, equivalent, 0.05)
    return RunLevelResult(6, [0.5, 0.5], [0.5, 0.5], diff, -1, 1, 999, 0.01, 0.01, 0.01, 1.0, 2, p, 0.05,
                          p_adjusted=p, equivalence=eq)  # fmt: skip


def test_verdict_rules() -> None:
    one = verdict("B", "A", "Dice", _case(0.03), None, True, (2, 1))
    assert one.kind == "one run" and "`B` trained once" in one.text and "+0.0300" in one.text
    worse = verdict("B", "A", "HD95", _case(0.5), _run(0.5, 0.01), False, (3, 3))
    assert worse.kind == "difference" and "`B` is worse than `A` in HD95 by +0.5000" in worse.text
    same = verdict("B", "A", "Dice", _case(0.001), _run(0.001, 0.4, equivalent=True), True, (3, 3))
    assert same.kind == "equivalent" and "within ±0.01 Dice" in same.text
    unknown = verdict("B", "A", "Dice", _case(0.01), _run(0.01, 0.4, equivalent=False), True, (2, 2))
    assert unknown.kind == "not resolvable" and "detects only differences >= 0.0500" in unknown.text


def test_run_level_test_holds_its_level_on_simulated_aa_data() -> None:
    """Two arms of the same method, two runs each, case and model effects of the size seen in two real baseline
    runs: the run-level t-test rejects in about 5 % of the simulations (within 3 binomial standard errors),
    the case-level Wilcoxon test on the same data far more often; the run-aware interval covers 0 at least as
    often as 95 % allows; at the detectable difference the test has about 80 % power."""
    result = calibrate(Design(runs=2), n_simulations=2000, n_interval=200, n_boot=499, seed=0)
    assert abs(result.run_level_rate - 0.05) < 3 * result.binomial_se(0.05)
    for rate in (result.wilcoxon_rate, result.wilcoxon_one_run_rate):
        assert rate > 0.05 + 3 * result.binomial_se(0.05) + 3 * result.binomial_se(rate)
    assert result.interval_coverage > 0.95 - 3 * result.binomial_se(0.95, result.n_interval_simulations)
    assert abs(result.power_at_detectable - 0.8) < 3 * result.binomial_se(0.8)
    # model effects larger than the case noise: the test still holds its level
    strong = calibrate(Design(runs=3, sd_model=0.04, sd_noise=0.02), n_simulations=2000, n_interval=0, seed=1)
    assert abs(strong.run_level_rate - 0.05) < 3 * strong.binomial_se(0.05)
    assert strong.wilcoxon_rate > 0.05 + 3 * strong.binomial_se(0.05) + 3 * strong.binomial_se(strong.wilcoxon_rate)
