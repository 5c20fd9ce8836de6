"""Aggregates (nnU-Net's means), paired differences (bootstrap CI, Wilcoxon, effect sizes) and rankings."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from nnunet_selfreg.evaluation import effects

#: metric -> True when larger values are better
HIGHER_IS_BETTER = {
    "Dice": True,
    "IoU": True,
    "HD95": False,
    "NSD": True,
    **{m: True for m in ("PQ", "SQ", "RQ", "AJI")},  # instance metrics
}
FOREGROUND = "foreground_mean"
#: the exact two-sided Wilcoxon p is at least 2 / 2**n, i.e. >= 0.0625 for n <= 5 non-zero differences
MIN_NONZERO_FOR_005 = 6

#: model -> metric -> label key (or FOREGROUND) -> per-case values
Table = dict[str, dict[str, dict[str, np.ndarray]]]


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without the all-NaN warning (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def nnunet_means(per_label: dict[str, np.ndarray]) -> dict[str, float]:
    """nnU-Net's aggregation: per label the mean over cases ignoring NaN; foreground mean over labels."""
    means = {label: float(_nanmean(v)) if len(v) else math.nan for label, v in per_label.items()}
    means[FOREGROUND] = float(np.mean([m for label, m in means.items() if label != "0"]))
    return means


def case_foreground_mean(per_label: dict[str, np.ndarray]) -> np.ndarray:
    """Per case: mean over labels of the defined (non-NaN) values; NaN if no label is defined."""
    stacked = np.stack([v for label, v in per_label.items() if label != "0"], axis=0)
    return np.asarray(_nanmean(stacked, axis=0), dtype=float)


@dataclass
class PairedDifference:
    """``other - baseline`` over cases defined for both."""

    n_pairs: int
    n_excluded: int
    mean_baseline: float
    mean_other: float
    mean_difference: float
    ci_low: float
    ci_high: float
    ci_method: str
    wilcoxon_statistic: float
    p_value: float
    n_nonzero: int
    note: str
    hl_estimate: float = math.nan  # Hodges-Lehmann shift (median of Walsh averages)
    hl_ci_low: float = math.nan
    hl_ci_high: float = math.nan
    rank_biserial: float = math.nan  # matched-pairs, sign of other - baseline
    better: int = 0  # cases where other is better than the baseline (metric direction aware)
    ties: int = 0
    worse: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


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


def ranking(table: Table, metric: str = "Dice") -> list[dict]:
    """Models by pooled nnU-Net foreground mean of ``metric``; mean per-case rank as a second view."""
    higher = HIGHER_IS_BETTER[metric]
    per_case = {m: case_foreground_mean(table[m][metric]) for m in table}
    ranks, n_cases = mean_ranks(per_case, higher)
    pooled = {m: nnunet_means(table[m][metric])[FOREGROUND] for m in table}
    order = sorted(table, key=lambda m: (math.isnan(pooled[m]), -pooled[m] if higher else pooled[m]))
    return [
        {
            "position": i + 1,
            "model": m,
            f"pooled_{metric}": pooled[m],
            "mean_case_rank": ranks[m],
            "n_cases_ranked": n_cases,
        }
        for i, m in enumerate(order)
    ]


def _select(per_label: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {label: v[mask] for label, v in per_label.items()}


def aggregates(table: Table, folds: np.ndarray, fold_ids: list[int]) -> dict:
    """nnU-Net means per model and metric: pooled over folds and per fold."""
    out: dict = {"pooled": {}, "per_fold": {str(f): {} for f in fold_ids}}
    for model, metrics in table.items():
        out["pooled"][model] = {metric: nnunet_means(v) for metric, v in metrics.items()}
        for f in fold_ids:
            sel = folds == f
            out["per_fold"][str(f)][model] = {metric: nnunet_means(_select(v, sel)) for metric, v in metrics.items()}
    return out


def repeat_of(model: str) -> str:
    """The trainer a repeated run (``X_Rep2``, ``X_Rep3_Budget`` …) repeats; the name itself otherwise."""
    return re.sub(r"_Rep\d+(?=_|$)", "", model)


def differences(
    table: Table,
    folds: np.ndarray,
    fold_ids: list[int],
    n_boot: int,
    seed: int,
    correction: str = "holm",
    margin: float | None = None,
) -> dict:
    """Paired differences of every model against the first: foreground mean pooled and per fold,
    and per label pooled. The pooled comparisons (models x metrics) form the family whose p-values
    are corrected (``p_adjusted``); with ``margin``, pooled Dice gets a paired equivalence test."""
    names = list(table)
    base = names[0]
    out: dict = {"baseline": base, "pooled": {}, "per_fold": {str(f): {} for f in fold_ids}, "per_label": {}}
    for model in names[1:]:
        out["pooled"][model], out["per_label"][model] = {}, {}
        for f in fold_ids:
            out["per_fold"][str(f)][model] = {}
        for metric in table[model]:
            higher = HIGHER_IS_BETTER[metric]
            b = case_foreground_mean(table[base][metric])
            o = case_foreground_mean(table[model][metric])
            out["pooled"][model][metric] = paired_difference(b, o, n_boot, seed, higher).as_dict()
            if margin is not None and metric == "Dice":
                ok = ~(np.isnan(b) | np.isnan(o))
                out["pooled"][model][metric]["equivalence"] = effects.tost(o[ok] - b[ok], margin).as_dict()
            for f in fold_ids:
                sel = folds == f
                out["per_fold"][str(f)][model][metric] = paired_difference(
                    b[sel], o[sel], n_boot, seed, higher
                ).as_dict()
            out["per_label"][model][metric] = {
                label: paired_difference(table[base][metric][label], values, n_boot, seed, higher).as_dict()
                for label, values in table[model][metric].items()
            }
    family = [(m, metric) for m, per in out["pooled"].items() for metric in per]
    adjusted = effects.adjust_pvalues([out["pooled"][m][metric]["p_value"] for m, metric in family], correction)
    for (m, metric), p in zip(family, adjusted, strict=True):
        out["pooled"][m][metric]["p_adjusted"] = p
    out["correction"] = {"method": correction, "family_size": len(family), "family": "pooled, models x metrics"}
    out["noise_floor"] = noise_floor(out["pooled"], base)
    return out


def noise_floor(pooled: dict, baseline: str) -> dict:
    """Run-to-run (A/A) differences: repeated runs of the baseline against the baseline, per metric.

    ``floor`` is the largest absolute mean difference between two runs of the same trainer: a method
    difference smaller than it cannot be told apart from training noise with these runs.
    """
    runs = [m for m in pooled if m != baseline and repeat_of(m) == repeat_of(baseline)]
    out: dict = {"runs": runs, "per_metric": {}}
    if not runs:
        return out
    for metric in pooled[runs[0]]:
        diffs = [pooled[m][metric]["mean_difference"] for m in runs]
        out["per_metric"][metric] = {
            "mean_differences": diffs,
            "floor": float(np.nanmax(np.abs(diffs))) if not np.all(np.isnan(diffs)) else math.nan,
            "p_values": [pooled[m][metric]["p_value"] for m in runs],
        }
    return out


def nan_counts(table: Table) -> dict:
    """model -> metric -> label (and FOREGROUND, per case) -> number of cases with an undefined (NaN) value."""
    out: dict = {}
    for model, metrics in table.items():
        out[model] = {}
        for metric, per_label in metrics.items():
            counts = {label: int(np.isnan(v).sum()) for label, v in per_label.items()}
            counts[FOREGROUND] = int(np.isnan(case_foreground_mean(per_label)).sum())
            out[model][metric] = counts
    return out


def analyse(
    table: Table,
    folds: np.ndarray,
    fold_ids: list[int],
    n_boot: int = 9999,
    seed: int = 0,
    correction: str = "holm",
    margin: float | None = None,
    rank_boot: int = 1000,
) -> dict:
    """Everything the report shows: means, paired differences against the first model, ranking and
    its bootstrap stability, NaN counts."""
    dice = {m: case_foreground_mean(table[m]["Dice"]) for m in table}
    return {
        "aggregates": aggregates(table, folds, fold_ids),
        "differences": differences(table, folds, fold_ids, n_boot, seed, correction, margin),
        "ranking": ranking(table, "Dice"),
        "rank_stability": effects.rank_stability(dice, rank_boot, seed, higher_is_better=True),
        "nan_counts": nan_counts(table),
    }
