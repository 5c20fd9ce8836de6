"""Effect sizes, equivalence, multiple-comparison correction and rank stability for paired case values.

What a fair comparison of segmentation models reports beyond "mean difference and p-value"
(Metrics Reloaded; challengeR's ranking-stability analysis):

- **Corrected p-values**: every comparison in one report is one of a family; Holm (family-wise
  error) or Benjamini–Hochberg (false discovery rate, ``scipy.stats.false_discovery_control``).
- **Hodges–Lehmann estimate**: the median of the Walsh averages ``(d_i + d_j) / 2, i <= j`` of the
  paired differences, with the distribution-free confidence interval that inverts the Wilcoxon
  signed-rank test (exact null distribution up to 400 pairs, normal approximation beyond).
- **Matched-pairs rank-biserial correlation** ``r = (T+ − T−) / (T+ + T−)`` (Kerby 2014): the
  Wilcoxon test's own effect size, in [−1, 1].
- **Win / tie / loss** counts of the per-case differences.
- **Equivalence** (paired two one-sided tests, TOST): "the difference lies within ±margin" is shown
  when both one-sided Wilcoxon signed-rank tests of ``d + margin > 0`` and ``d − margin < 0`` reject.
- **Rank stability**: runs and cases are resampled as for the run-aware interval
  (:func:`nnunet_selfreg.evaluation.replicates.resampled_means`; with one run per arm: the cases of
  each fold), the arms re-ranked on each resample; the rank distribution of each arm and Kendall's τ
  between the full-data ranking and each resampled ranking say how much the ranking is an accident of
  the case sample and of the training runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from nnunet_selfreg.evaluation.model import Equivalence, RankStability
from nnunet_selfreg.evaluation.replicates import resampled_means

CORRECTIONS = ("holm", "bh", "none")


def adjust_pvalues(pvalues: Sequence[float], method: str = "holm") -> list[float]:
    """Multiple-comparison adjusted p-values in the input order; NaN entries stay NaN and do not count.

    ``holm``: ``p_(i) · (m − i + 1)`` in ascending order, made monotone, capped at 1 (Holm 1979).
    ``bh``: Benjamini–Hochberg, via ``scipy.stats.false_discovery_control``. ``none``: unchanged.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
    p = np.asarray(pvalues, dtype=float)
    out = p.copy()
    ok = ~np.isnan(p)
    if method == "none" or not ok.any():
        return out.tolist()
    valid = p[ok]
    if method == "bh":
        out[ok] = stats.false_discovery_control(valid, method="bh")
        return out.tolist()
    m = len(valid)
    order = np.argsort(valid, kind="stable")
    scaled = valid[order] * (m - np.arange(m))
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    result = np.empty(m)
    result[order] = adjusted
    out[ok] = result
    return out.tolist()


def _signed_rank_null_cdf(n: int) -> np.ndarray:
    """``P(T+ <= t)`` for t = 0 … n(n+1)/2 under the null (no ties, no zeros): exact, by counting subsets."""
    total = n * (n + 1) // 2
    counts = np.zeros(total + 1)
    counts[0] = 1.0
    for k in range(1, n + 1):
        counts[k:] = counts[k:] + counts[: total + 1 - k]
    return np.cumsum(counts) / 2.0**n


def hodges_lehmann(diff: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Hodges–Lehmann estimate of the paired shift and its signed-rank confidence interval (low, high).

    With ``M = n(n+1)/2`` sorted Walsh averages ``W_(1) … W_(M)``, the interval is
    ``[W_(k+1), W_(M−k)]`` where ``k`` is the largest value with ``P(T+ <= k) <= (1 − confidence)/2``
    under the null distribution of the signed-rank statistic (as R's ``wilcox.test(conf.int=TRUE)``).
    Fewer than 2 values: NaNs.
    """
    d = np.asarray(diff, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    if n < 2:
        return math.nan, math.nan, math.nan
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    estimate = float(np.median(walsh))
    m = len(walsh)
    alpha = (1.0 - confidence) / 2.0
    if n <= 400:
        cdf = _signed_rank_null_cdf(n)
        below = np.nonzero(cdf <= alpha)[0]
        k = int(below[-1]) if len(below) else 0  # Walsh averages cut from each end
    else:
        sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
        k = max(int(math.floor(m / 2.0 - stats.norm.ppf(1 - alpha) * sd)), 0)
    return estimate, float(walsh[k]), float(walsh[m - k - 1])


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of the non-zero differences (NaN if all are zero)."""
    d = np.asarray(diff, dtype=float)
    d = d[~np.isnan(d) & (d != 0)]
    if not len(d):
        return math.nan
    ranks = stats.rankdata(np.abs(d))
    plus, minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((plus - minus) / (plus + minus))


def win_tie_loss(diff: np.ndarray) -> tuple[int, int, int]:
    """Cases where ``other`` is above, equal to, below the baseline (NaN differences not counted)."""
    d = np.asarray(diff, dtype=float)
    d = d[~np.isnan(d)]
    return int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())


def tost(diff: np.ndarray, margin: float, alpha: float = 0.05) -> Equivalence:
    """Two one-sided Wilcoxon signed-rank tests of the differences against ``±margin``."""
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"the equivalence margin must be a finite number > 0, got {margin}")
    d = np.asarray(diff, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return Equivalence(margin, math.nan, math.nan, math.nan, False, alpha)
    lower, upper = d + margin, d - margin
    p_lower = float(stats.wilcoxon(lower, alternative="greater").pvalue) if np.any(lower) else math.nan
    p_upper = float(stats.wilcoxon(upper, alternative="less").pvalue) if np.any(upper) else math.nan
    p = max(p_lower, p_upper)
    return Equivalence(margin, p_lower, p_upper, p, bool(p < alpha), alpha)


def _ranks(means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks (1 = best, ties averaged) along the last axis."""
    return stats.rankdata(-means if higher_is_better else means, axis=-1)


def rank_stability(
    values: dict[str, np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    higher_is_better: bool = True,
    folds: np.ndarray | None = None,
) -> RankStability:
    """Resample runs and cases, rank the arms by their mean on each resample.

    ``values``: arm -> per-case values over the same cases, one row per run ((runs, cases), or (cases,) for
    one run); cases with a NaN in any run of any arm are dropped. ``folds`` keeps each case inside its fold
    (None: one fold). Returns the full-data ranking, each arm's rank distribution (counts of each rank over
    the resamples, ranks rounded down for ties), and Kendall's τ between the full-data ranking and each
    resampled ranking (median, 2.5 and 97.5 percentiles).
    """
    names = list(values)
    matrices = [np.atleast_2d(np.asarray(values[n], dtype=float)) for n in names]
    n_all = matrices[0].shape[1]
    folds = np.zeros(n_all, dtype=int) if folds is None else np.asarray(folds)
    keep = ~np.any([np.isnan(m).any(axis=0) for m in matrices], axis=0)
    matrices = [m[:, keep] for m in matrices]
    n_cases, k = int(keep.sum()), len(names)
    if n_cases < 2 or k < 2:
        return RankStability(names, n_cases, 0, seed, {}, {}, {})
    full = _ranks(np.array([m.mean() for m in matrices]), higher_is_better)
    boot_ranks = _ranks(resampled_means(matrices, folds[keep], n_boot, np.random.default_rng(seed)), higher_is_better)
    taus = np.array([stats.kendalltau(full, r).statistic if np.ptp(r) > 0 else math.nan for r in boot_ranks])
    counts = {
        n: [int((np.floor(boot_ranks[:, j]) == rank).sum()) for rank in range(1, k + 1)] for j, n in enumerate(names)
    }
    finite = taus[~np.isnan(taus)]
    tau = (
        {
            "median": float(np.median(finite)),
            "p2.5": float(np.percentile(finite, 2.5)),
            "p97.5": float(np.percentile(finite, 97.5)),
            "undefined": int(np.isnan(taus).sum()),
        }
        if len(finite)
        else {"median": math.nan, "p2.5": math.nan, "p97.5": math.nan, "undefined": int(len(taus))}
    )
    return RankStability(
        arms=names,
        n_cases=n_cases,
        n_boot=int(n_boot),
        seed=int(seed),
        full_ranks={n: float(r) for n, r in zip(names, full, strict=True)},
        rank_counts=counts,
        tau=tau,
    )
