"""Aggregates (nnU-Net's means), paired differences (bootstrap CI, Wilcoxon, effect sizes), run-level
comparisons of arms with several runs, verdicts and rankings: they fill :mod:`.model`'s dataclasses."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from nnunet_selfreg.evaluation import effects, replicates
from nnunet_selfreg.evaluation.model import (
    FOREGROUND,
    AAComparison,
    Aggregates,
    Arm,
    CaseTable,
    Correction,
    Differences,
    MatchedMean,
    MethodComparison,
    PairedDifference,
    RankEntry,
    Ranking,
    RunLevelResult,
    case_foreground_mean,
    nanmean,
)
from nnunet_selfreg.evaluation.replicates import repeat_of

__all__ = ["FOREGROUND", "HIGHER_IS_BETTER", "case_foreground_mean", "paired_difference", "repeat_of"]

#: metric -> True when larger values are better
HIGHER_IS_BETTER = {
    "Dice": True,
    "IoU": True,
    "HD95": False,
    "NSD": True,
    **{m: True for m in ("PQ", "SQ", "RQ", "AJI")},  # instance metrics
}
#: the exact two-sided Wilcoxon p is at least 2 / 2**n, i.e. >= 0.0625 for n <= 5 non-zero differences
MIN_NONZERO_FOR_005 = 6


def nnunet_means(per_label: dict[str, np.ndarray]) -> dict[str, float]:
    """nnU-Net's aggregation: per label the mean over cases ignoring NaN; foreground mean over labels."""
    means = {label: float(nanmean(v)) if len(v) else math.nan for label, v in per_label.items()}
    means[FOREGROUND] = float(np.mean([m for label, m in means.items() if label != "0"]))
    return means


def bootstrap_ci(
    baseline: np.ndarray, other: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, str, str]:
    """Paired bootstrap CI of the mean difference (cases resampled): low, high, method, note."""
    diff = other - baseline
    if len(diff) < 2:
        return math.nan, math.nan, "none", "fewer than 2 paired cases: no confidence interval"
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0]), "none", "all differences are equal: the interval is a point"
    note = ""
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples: checked below
            res = stats.bootstrap(
                (baseline, other),
                lambda a, b, axis: np.mean(b - a, axis=axis),
                paired=True,
                vectorized=True,
                n_resamples=n_boot,
                confidence_level=confidence,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high, method, note
        note = "BCa interval undefined for these data: percentile interval instead"
    return math.nan, math.nan, "none", "bootstrap interval undefined"


def wilcoxon_test(diff: np.ndarray) -> tuple[float, float, int, str]:
    """Two-sided Wilcoxon signed-rank test of the differences: statistic, p, non-zero count, note.

    With fewer than ``MIN_NONZERO_FOR_005`` non-zero differences the exact p cannot go below 0.05.
    """
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        return math.nan, math.nan, 0, "all differences are zero: Wilcoxon test undefined (p = NaN)"
    res = stats.wilcoxon(diff)
    return float(res.statistic), float(res.pvalue), nonzero, ""


def paired_difference(
    baseline: np.ndarray, other: np.ndarray, n_boot: int = 9999, seed: int = 0, higher_is_better: bool = True
) -> PairedDifference:
    """Mean paired difference ``other - baseline``, its bootstrap CI, the Wilcoxon signed-rank test and
    effect sizes (Hodges-Lehmann shift with its interval, rank-biserial correlation, better/tie/worse)."""
    baseline, other = np.asarray(baseline, dtype=float), np.asarray(other, dtype=float)
    ok = ~(np.isnan(baseline) | np.isnan(other))
    b, o = baseline[ok], other[ok]
    n, excluded = int(ok.sum()), int((~ok).sum())
    if n == 0:
        nan = math.nan
        return PairedDifference(0, excluded, nan, nan, nan, nan, nan, "none", nan, nan, 0, "no paired cases")
    low, high, method, ci_note = bootstrap_ci(b, o, n_boot, seed)
    statistic, p, nonzero, w_note = wilcoxon_test(o - b)
    note = "; ".join(x for x in (ci_note, w_note) if x)
    hl, hl_low, hl_high = effects.hodges_lehmann(o - b)
    up, tie, down = effects.win_tie_loss(o - b)
    better, worse = (up, down) if higher_is_better else (down, up)
    return PairedDifference(
        n,
        excluded,
        float(b.mean()),
        float(o.mean()),
        float((o - b).mean()),
        low,
        high,
        method,
        statistic,
        p,
        nonzero,
        note,
        hl,
        hl_low,
        hl_high,
        effects.rank_biserial(o - b),
        better,
        tie,
        worse,
    )


def mean_ranks(values: dict[str, np.ndarray], higher_is_better: bool = True) -> tuple[dict[str, float], int]:
    """Mean rank (1 = best, ties averaged) of each model over the cases defined for all models."""
    names = list(values)
    matrix = np.stack([values[n] for n in names], axis=1)
    matrix = matrix[~np.isnan(matrix).any(axis=1)]
    if not len(matrix):
        return {n: math.nan for n in names}, 0
    ranks = stats.rankdata(-matrix if higher_is_better else matrix, axis=1)
    return {n: float(r) for n, r in zip(names, ranks.mean(axis=0), strict=True)}, len(matrix)


def _select(per_label: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {label: v[mask] for label, v in per_label.items()}


def aggregates(table: CaseTable) -> Aggregates:
    """nnU-Net means of every run and metric: pooled over folds and per fold; SQ also over matched cases."""
    pooled = {run: {metric: nnunet_means(v) for metric, v in metrics.items()} for run, metrics in table.values.items()}
    per_fold = {
        str(f): {
            run: {metric: nnunet_means(_select(v, table.folds == f)) for metric, v in metrics.items()}
            for run, metrics in table.values.items()
        }
        for f in np.unique(table.folds)
    }
    return Aggregates(pooled, per_fold, sq_matched_only(table))


def sq_matched_only(table: CaseTable) -> dict[str, MatchedMean]:
    """Mean SQ of each run over the cases with at least one matched object.

    MONAI's panoptic quality gives SQ = 0 to a case without a match (a matched pair has IoU > 0.5, so a
    positive SQ means a match): those zeros pull the mean SQ down although SQ is meant as the quality of
    the matches.
    """
    if "SQ" not in table.metrics:
        return {}
    out = {}
    for run in table.runs:
        sq = table.run_values(run, "SQ")
        matched = sq[~np.isnan(sq) & (sq > 0)]
        out[run] = MatchedMean(float(matched.mean()) if len(matched) else math.nan, int(len(matched)))
    return out


def _arm_pair(table: CaseTable, baseline: Arm, arm: Arm, metric: str, label: str = FOREGROUND):
    return table.arm_values(baseline, metric, label), table.arm_values(arm, metric, label)


def _run_level(
    table: CaseTable, baseline: Arm, arm: Arm, metric: str, n_boot: int, seed: int, margin: float | None
) -> RunLevelResult | None:
    if baseline.n_runs < 2 or arm.n_runs < 2:
        return None
    equivalence_margin = margin if metric == "Dice" else None
    return replicates.run_level(
        table.arm_matrix(baseline, metric), table.arm_matrix(arm, metric), table.folds, n_boot, seed, equivalence_margin
    )


def _case_level(
    table: CaseTable, baseline: Arm, arm: Arm, metric: str, n_boot: int, seed: int, margin: float | None
) -> PairedDifference:
    base, other = _arm_pair(table, baseline, arm, metric)
    diff = paired_difference(base, other, n_boot, seed, HIGHER_IS_BETTER[metric])
    if margin is not None and metric == "Dice":
        ok = ~(np.isnan(base) | np.isnan(other))
        diff.equivalence = effects.tost(other[ok] - base[ok], margin)
    return diff


def correct(tests: list[PairedDifference | RunLevelResult], method: str) -> None:
    """Set ``p_adjusted`` of the method comparisons' deciding tests, corrected together as one family."""
    adjusted = effects.adjust_pvalues([t.p_value for t in tests], method)
    for test, p in zip(tests, adjusted, strict=True):
        test.p_adjusted = p


def method_comparisons(
    table: CaseTable, arms: list[Arm], n_boot: int, seed: int, correction: str, margin: float | None
) -> tuple[dict[str, dict[str, MethodComparison]], Correction]:
    """Every arm against the first, pooled over folds: case level always, run level where both arms have
    two or more runs; the deciding tests (run level, else case level) form the corrected family, and each
    comparison gets its verdict."""
    baseline = arms[0]
    levels = {
        (arm.name, metric): (
            _case_level(table, baseline, arm, metric, n_boot, seed, margin),
            _run_level(table, baseline, arm, metric, n_boot, seed, margin),
        )
        for arm in arms[1:]
        for metric in table.metrics
    }
    correct([run if run is not None else case for case, run in levels.values()], correction)
    n_runs = {arm.name: arm.n_runs for arm in arms}
    out: dict[str, dict[str, MethodComparison]] = {arm.name: {} for arm in arms[1:]}
    for (name, metric), (case, run) in levels.items():
        verdict = replicates.verdict(
            name, baseline.name, metric, case, run, HIGHER_IS_BETTER[metric], (n_runs[baseline.name], n_runs[name])
        )
        out[name][metric] = MethodComparison(name, metric, case, run, verdict)
    family = (
        "method comparisons (arms x metrics): the run-level t-test where both arms have two or more runs, the "
        "case-level Wilcoxon test otherwise; A/A comparisons are not part of it"
    )
    return out, Correction(correction, len(levels), family)


def per_fold_differences(
    table: CaseTable, arms: list[Arm], n_boot: int, seed: int
) -> dict[str, dict[str, dict[str, PairedDifference]]]:
    """Case-level differences of the arms' per-case values, fold by fold (uncorrected)."""
    baseline = arms[0]
    out: dict = {}
    for f in np.unique(table.folds):
        sel = table.folds == f
        out[str(f)] = {
            arm.name: {
                metric: paired_difference(
                    *(v[sel] for v in _arm_pair(table, baseline, arm, metric)), n_boot, seed, HIGHER_IS_BETTER[metric]
                )
                for metric in table.metrics
            }
            for arm in arms[1:]
        }
    return out


def per_label_differences(
    table: CaseTable, arms: list[Arm], n_boot: int, seed: int
) -> dict[str, dict[str, dict[str, PairedDifference]]]:
    """Case-level differences of the arms' per-case values, label by label (uncorrected)."""
    baseline = arms[0]
    return {
        arm.name: {
            metric: {
                label: paired_difference(
                    *_arm_pair(table, baseline, arm, metric, label), n_boot, seed, HIGHER_IS_BETTER[metric]
                )
                for label in table.labels(metric)
            }
            for metric in table.metrics
        }
        for arm in arms[1:]
    }


def aa_comparisons(table: CaseTable, arms: list[Arm], n_boot: int, seed: int) -> list[AAComparison]:
    """Each later run of an arm against the arm's first run: the same command trained again, with the
    interval of its difference (what training noise alone does on these cases)."""
    return [
        AAComparison(
            arm.name,
            run,
            arm.runs[0],
            metric,
            paired_difference(
                table.run_values(arm.runs[0], metric),
                table.run_values(run, metric),
                n_boot,
                seed,
                HIGHER_IS_BETTER[metric],
            ),
        )
        for arm in arms
        for run in arm.runs[1:]
        for metric in table.metrics
    ]


def differences(
    table: CaseTable,
    arms: list[Arm],
    n_boot: int,
    seed: int,
    correction: str = "holm",
    margin: float | None = None,
) -> Differences:
    """Every comparison against the first arm: pooled (with run level and verdict), per fold, per label,
    and the A/A comparisons inside each arm."""
    methods, corrected = method_comparisons(table, arms, n_boot, seed, correction, margin)
    return Differences(
        baseline=arms[0].name,
        methods=methods,
        per_fold=per_fold_differences(table, arms, n_boot, seed),
        per_label=per_label_differences(table, arms, n_boot, seed),
        correction=corrected,
        aa=aa_comparisons(table, arms, n_boot, seed),
    )


RANKING_DEFINITION = (
    "mean over the cases defined for every arm of each case's foreground {metric} (the mean over the labels "
    "defined in that case; an arm's value is the mean over its runs): the per-case values that the paired "
    "differences use. The same mean ranks the resamples of the stability analysis."
)


def ranking(table: CaseTable, arms: list[Arm], metric: str = "Dice", n_boot: int = 1000, seed: int = 0) -> Ranking:
    """Arms by the mean of their per-case foreground values over the cases defined for every arm, the mean
    per-case rank as a second view, and the ranking's stability under resampling of runs and cases."""
    higher = HIGHER_IS_BETTER[metric]
    per_case = {arm.name: table.arm_values(arm, metric) for arm in arms}
    ranks, n_cases = mean_ranks(per_case, higher)
    complete = ~np.any([np.isnan(v) for v in per_case.values()], axis=0)
    means = {name: float(v[complete].mean()) if complete.any() else math.nan for name, v in per_case.items()}
    order = sorted(means, key=lambda a: (math.isnan(means[a]), -means[a] if higher else means[a]))
    entries = [RankEntry(i + 1, a, means[a], ranks[a], n_cases) for i, a in enumerate(order)]
    stability = effects.rank_stability(
        {arm.name: table.arm_matrix(arm, metric) for arm in arms}, n_boot, seed, higher, folds=table.folds
    )
    return Ranking(metric, RANKING_DEFINITION.format(metric=metric), entries, stability)


def nan_counts(table: CaseTable) -> dict:
    """run -> metric -> label (and FOREGROUND, per case) -> number of cases with an undefined (NaN) value."""
    out: dict = {}
    for run, metrics in table.values.items():
        out[run] = {}
        for metric, per_label in metrics.items():
            counts = {label: int(np.isnan(v).sum()) for label, v in per_label.items()}
            counts[FOREGROUND] = int(np.isnan(case_foreground_mean(per_label)).sum())
            out[run][metric] = counts
    return out


@dataclass
class Analysis:
    aggregates: Aggregates
    differences: Differences
    ranking: Ranking
    nan_counts: dict


def analyse(
    table: CaseTable,
    arms: list[Arm],
    n_boot: int = 9999,
    seed: int = 0,
    correction: str = "holm",
    margin: float | None = None,
    rank_boot: int = 1000,
) -> Analysis:
    """Everything the report shows: means, comparisons against the first arm, ranking and its stability,
    NaN counts."""
    return Analysis(
        aggregates=aggregates(table),
        differences=differences(table, arms, n_boot, seed, correction, margin),
        ranking=ranking(table, arms, "Dice", rank_boot, seed),
        nan_counts=nan_counts(table),
    )
