"""Training runs as replicates: arms of several runs, a run-aware interval, a run-level test, the smallest
detectable difference and a verdict in plain words.

nnU-Net training is not deterministic: the same command trained twice gives two models that differ on
the same cases, sometimes by more than a method's effect. With one run per arm a case-level p-value
answers "do these two trained models differ on these cases", not "does the method differ". With K >= 2
runs per arm (``X``, ``X_Rep2`` …) the run becomes the unit:

* **run-level test** -- Student's two-sample t-test on the per-run means (each run's mean over the
  compared cases), ``df = K_a + K_b - 2``. It holds its level because the runs of an arm are independent
  repetitions of one command, so their means are independent draws from one distribution; the cases are
  the same for every run of both arms, so whatever they contribute is a constant that cancels in the
  difference and does not enter the spread between runs; a mean over many cases and several fold models
  is close to normal. Nothing that varies between runs is left out of its variance.
* **smallest detectable difference** -- the difference this test detects with 80 % power at
  alpha = 0.05, for these K and the pooled run-to-run SD (``statsmodels.stats.power.TTestIndPower``).
* **run-aware interval** -- a hierarchical bootstrap that resamples what varied when the numbers were
  made: in every fold, each arm's runs with replacement (each fold's model is its own training), and the
  cases of each fold with replacement, the same cases for both arms (paired). Resampling K runs shrinks
  their spread by (K - 1) / K, so the runs' deviations from the arm mean are first scaled by
  sqrt(K / (K - 1)).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from nnunet_selfreg.evaluation.model import (
    DIFFERENCE,
    EQUIVALENT,
    NOT_RESOLVABLE,
    ONE_RUN,
    Arm,
    Equivalence,
    PairedDifference,
    RunLevelResult,
    Verdict,
)
from nnunet_selfreg.evaluation.results import CompareInputError

ALPHA = 0.05
POWER = 0.8
#: resamples evaluated at once (bounds memory: chunk x cases x runs floats)
_CHUNK = 1000


# --------------------------------------------------------------------------- arms


def repeat_of(name: str) -> str:
    """The trainer a repeated run (``X_Rep2``, ``X_Rep3_Budget``, ``X_100epochs_Rep2`` …) repeats; the name
    itself otherwise."""
    return re.sub(r"_Rep\d+(?=_|$)", "", name)


def parse_arms(entries: Sequence[str]) -> list[Arm]:
    """Arms from ``-tr`` entries, in the order of their first run.

    ``NAME=RUN,RUN,…`` is an arm of the runs given; any other entry is a run of arm ``repeat_of(entry)``,
    so ``X``, ``X_Rep2`` and ``X_Rep3`` form one arm ``X``.
    """
    arms: dict[str, Arm] = {}
    explicit: set[str] = set()
    seen: set[str] = set()
    for entry in entries:
        given_as_arm = _is_arm_entry(entry)
        name, runs = _split_entry(entry) if given_as_arm else (repeat_of(entry), [entry])
        if name in explicit or (given_as_arm and name in arms):
            raise CompareInputError(f"arm {name!r} is given twice in -tr: give each arm once")
        twice = [run for run in runs if run in seen]
        if twice:
            raise CompareInputError(f"{twice[0]!r} is given twice in -tr: each run belongs to one arm")
        seen.update(runs)
        if given_as_arm:
            explicit.add(name)
        arms.setdefault(name, Arm(name, [])).runs.extend(runs)
    return list(arms.values())


def _is_arm_entry(entry: str) -> bool:
    """``NAME=…`` with a name that is not a path (a folder's name may hold '=' itself)."""
    name, equals, _ = entry.partition("=")
    return bool(equals and name) and "/" not in name and "\\" not in name


def _split_entry(entry: str) -> tuple[str, list[str]]:
    name, _, runs = entry.partition("=")
    parts = runs.split(",")
    if not all(parts):
        raise CompareInputError(
            f"-tr {entry}: an arm is NAME=RUN,RUN,... with one or more runs (trainer names or result folders)"
        )
    return name, parts


# --------------------------------------------------------------------------- resampling


def inflate_runs(values: np.ndarray) -> np.ndarray:
    """(runs, cases) values with each run's deviation from the arm mean scaled by sqrt(K / (K - 1)).

    Drawing K runs with replacement from K gives a mean whose variance is (K - 1) / K of the run-to-run
    variance divided by K; the scaling makes it the whole (a single run stays as it is).
    """
    k = values.shape[0]
    if k < 2:
        return values
    centre = values.mean(axis=0)
    return centre + math.sqrt(k / (k - 1)) * (values - centre)


def _fold_index(folds: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    ids, index = np.unique(folds, return_inverse=True)
    return index, [np.nonzero(index == f)[0] for f in range(len(ids))]


def resampled_means(arms: Sequence[np.ndarray], folds: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, arms) means of hierarchical resamples of each arm's (runs, cases) values.

    One resample: in every fold, draw each arm's runs with replacement (after :func:`inflate_runs`) and
    the fold's cases with replacement; an arm's value is the mean over its drawn runs and drawn cases.
    The drawn cases are the same for every arm (paired). Values must be defined (no NaN).
    """
    fold_of_case, members = _fold_index(np.asarray(folds))
    n_cases = len(fold_of_case)
    values = [inflate_runs(np.atleast_2d(np.asarray(a, dtype=float))) for a in arms]
    out = np.empty((n_boot, len(values)))
    for start in range(0, n_boot, _CHUNK):
        size = min(_CHUNK, n_boot - start)
        case_counts = np.zeros((size, n_cases))
        for cases in members:
            case_counts[:, cases] = rng.multinomial(len(cases), np.full(len(cases), 1 / len(cases)), size)
        for j, arm in enumerate(values):
            k = arm.shape[0]
            run_weights = rng.multinomial(k, np.full(k, 1 / k), (size, len(members))) / k  # (size, folds, K)
            per_case = np.einsum("bck,kc->bc", run_weights[:, fold_of_case, :], arm)
            out[start : start + size, j] = (per_case * case_counts).sum(axis=1) / n_cases
    return out


def hierarchical_interval(
    baseline: np.ndarray,
    other: np.ndarray,
    folds: np.ndarray,
    n_boot: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``mean(other) - mean(baseline)`` over hierarchical resamples (runs x cases)."""
    means = resampled_means([baseline, other], folds, n_boot, np.random.default_rng(seed))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means[:, 1] - means[:, 0], [tail, 1 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- the run-level test


def run_t_test(baseline_means: np.ndarray, other_means: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Student's two-sample t-test of per-run means along the last axis: t, df, two-sided p."""
    with warnings.catch_warnings():
        # scipy warns when one arm's runs agree exactly (identical copies): the pooled variance still holds
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = stats.ttest_ind(other_means, baseline_means, axis=-1, equal_var=True)
    df = baseline_means.shape[-1] + other_means.shape[-1] - 2
    return res.statistic, df, res.pvalue


def pooled_sd(baseline_means: np.ndarray, other_means: np.ndarray) -> float:
    k_base, k_other = len(baseline_means), len(other_means)
    ss = (k_base - 1) * np.var(baseline_means, ddof=1) + (k_other - 1) * np.var(other_means, ddof=1)
    return float(math.sqrt(ss / (k_base + k_other - 2)))


def detectable_difference(
    sd: float, k_baseline: int, k_other: int, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The smallest difference of arm means that the run-level t-test detects with ``power`` at ``alpha``
    (two-sided): ``d * sd``, where ``d`` is the standardised effect of ``TTestIndPower`` for K_a and K_b
    runs (``df = K_a + K_b - 2``) and ``sd`` the run-to-run SD of the run means."""
    from statsmodels.stats.power import TTestIndPower

    if not (math.isfinite(sd) and k_baseline >= 2 and k_other >= 2):
        return math.nan
    d = TTestIndPower().solve_power(
        effect_size=None, nobs1=k_other, ratio=k_baseline / k_other, alpha=alpha, power=power
    )
    return float(d) * sd


def run_equivalence(baseline_means: np.ndarray, other_means: np.ndarray, margin: float) -> Equivalence:
    """TOST on the run means: two one-sided t-tests of the difference against -margin and +margin
    (``statsmodels.stats.weightstats.ttost_ind``, pooled variance)."""
    from statsmodels.stats.weightstats import ttost_ind

    p, lower, upper = ttost_ind(other_means, baseline_means, -margin, margin, usevar="pooled")
    p_lower, p_upper = float(lower[1]), float(upper[1])
    return Equivalence(
        margin, p_lower, p_upper, float(p), bool(p < ALPHA), ALPHA, test="two one-sided t-tests on the run means"
    )


def run_level(
    baseline: np.ndarray,
    other: np.ndarray,
    folds: np.ndarray,
    n_boot: int,
    seed: int,
    margin: float | None = None,
) -> RunLevelResult:
    """``other`` against ``baseline``, each a (runs, cases) matrix with >= 2 runs, runs as the unit."""
    ok = ~(np.isnan(baseline).any(axis=0) | np.isnan(other).any(axis=0))
    base_means, other_means = baseline[:, ok].mean(axis=1), other[:, ok].mean(axis=1)
    k_base, k_other = len(base_means), len(other_means)
    if not ok.any():
        nan = math.nan
        return RunLevelResult(0, [nan] * k_base, [nan] * k_other, nan, nan, nan, n_boot, nan, nan, nan, nan,
                              k_base + k_other - 2, nan, nan)  # fmt: skip
    sd = pooled_sd(base_means, other_means)
    t, df, p = run_t_test(base_means, other_means) if sd > 0 else (math.nan, k_base + k_other - 2, math.nan)
    low, high = hierarchical_interval(baseline[:, ok], other[:, ok], folds[ok], n_boot, seed)
    equivalence = run_equivalence(base_means, other_means, margin) if margin is not None and sd > 0 else None
    return RunLevelResult(
        n_cases=int(ok.sum()),
        run_means_baseline=base_means.tolist(),
        run_means_other=other_means.tolist(),
        difference=float(other_means.mean() - base_means.mean()),
        ci_low=low,
        ci_high=high,
        n_resamples=n_boot,
        sd_baseline=float(np.std(base_means, ddof=1)),
        sd_other=float(np.std(other_means, ddof=1)),
        sd_pooled=sd,
        t_statistic=float(t),
        df=int(df),
        p_value=float(p),
        detectable_difference=detectable_difference(sd, k_base, k_other),
        equivalence=equivalence,
    )


# --------------------------------------------------------------------------- verdict


def _direction(difference: float, higher_is_better: bool) -> str:
    return "better" if (difference > 0) == higher_is_better else "worse"


def verdict(
    arm: str,
    baseline: str,
    metric: str,
    case_level: PairedDifference,
    run: RunLevelResult | None,
    higher_is_better: bool,
    n_runs: tuple[int, int],
) -> Verdict:
    """The plain-words reading of one method comparison.

    * one arm with a single run: no claim about a method is possible (ONE_RUN);
    * run-level p (corrected over the method family) < 0.05: a DIFFERENCE;
    * else, with ``--margin``, the run-level TOST within +-margin: EQUIVALENT;
    * else NOT_RESOLVABLE: the design detects only differences >= the detectable difference.
    """
    if run is None:
        single = [name for name, k in ((baseline, n_runs[0]), (arm, n_runs[1])) if k == 1]
        return Verdict(
            ONE_RUN,
            f"no claim about the method ({' and '.join(f'`{n}`' for n in single)} trained once): these trained "
            f"models differ by {case_level.mean_difference:+.4f} {metric} on these cases, which training noise "
            "alone can do",
        )
    p = run.p_adjusted if run.p_adjusted is not None else run.p_value
    design = f"{n_runs[0]} + {n_runs[1]} runs, {run.n_cases} cases"
    if math.isnan(p):
        return Verdict(
            NOT_RESOLVABLE,
            f"no run-level test: {run.difference:+.4f} {metric}, and the run means do not vary within either arm "
            f"({design}) or no case is defined in every run",
        )
    if p < ALPHA:
        return Verdict(
            DIFFERENCE,
            f"`{arm}` is {_direction(run.difference, higher_is_better)} than `{baseline}` in {metric} by "
            f"{run.difference:+.4f} (run-level t-test on {design}, corrected p = {p:.3g})",
        )
    if run.equivalence is not None and run.equivalence.equivalent:
        return Verdict(
            EQUIVALENT,
            f"equivalent within ±{run.equivalence.margin:g} {metric}: {run.difference:+.4f} "
            f"(two one-sided t-tests on the run means, p = {run.equivalence.p_value:.3g})",
        )
    return Verdict(
        NOT_RESOLVABLE,
        f"not resolvable here: {run.difference:+.4f} {metric}; this design ({design}) detects only differences "
        f">= {run.detectable_difference:.4f} (80 % power, alpha = 0.05)",
    )
