"""The typed result of ``nnunet-selfreg compare``: what :mod:`.stats` fills, :mod:`.comparison_report`
renders and ``results.json`` serialises (:meth:`ComparisonResult.to_record`).

Words used throughout:

* a **run** is one results folder given to ``compare`` (one trained model per fold: ``nnUNetv2_train``
  with one trainer name). Its per-case values are what nnU-Net measured on the validation cases.
* an **arm** is the runs of one command: ``X``, ``X_Rep2``, ``X_Rep3`` … (or ``NAME=RUN,RUN`` given
  explicitly). Its per-case value is the mean over its runs. The first arm is the baseline.
* a **method comparison** is one arm against the baseline arm for one metric; an **A/A comparison** is
  a run of an arm against the first run of the same arm (training noise only).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np

FOREGROUND = "foreground_mean"
#: where the statistics do not apply: one run per arm
ONE_RUN = "one run"
DIFFERENCE, EQUIVALENT, NOT_RESOLVABLE = "difference", "equivalent", "not resolvable"


def nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without the all-NaN warning (the result is NaN there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def case_foreground_mean(per_label: dict[str, np.ndarray]) -> np.ndarray:
    """Per case: mean over labels of the defined (non-NaN) values; NaN if no label is defined."""
    stacked = np.stack([v for label, v in per_label.items() if label != "0"], axis=0)
    return np.asarray(nanmean(stacked, axis=0), dtype=float)


def record(obj: object) -> dict:
    """A dataclass as a JSON-ready dict; optional fields (default ``None``) are left out while unset."""
    out = asdict(obj)
    for f in fields(obj):
        if f.default is None and out[f.name] is None:
            del out[f.name]
    return out


# --------------------------------------------------------------------------- inputs: arms and per-case values


@dataclass
class Arm:
    """The runs of one training command; the arm's per-case value is the mean over its runs."""

    name: str
    runs: list[str]

    @property
    def n_runs(self) -> int:
        return len(self.runs)


@dataclass
class CaseTable:
    """Every run's per-case values: ``values[run][metric][label]`` is an array over ``cases`` (NaN: undefined).

    ``folds[i]`` is the fold whose model predicted case ``i``: the cases of one fold share one trained model
    per run, which is why resampling keeps cases inside their fold.
    """

    cases: list[str]
    folds: np.ndarray
    values: dict[str, dict[str, dict[str, np.ndarray]]]

    @property
    def runs(self) -> list[str]:
        return list(self.values)

    @property
    def metrics(self) -> list[str]:
        return list(next(iter(self.values.values())))

    def labels(self, metric: str) -> list[str]:
        return list(next(iter(self.values.values()))[metric])

    def run_values(self, run: str, metric: str, label: str = FOREGROUND) -> np.ndarray:
        """Per-case values of one run (``FOREGROUND``: the mean over the labels defined in that case)."""
        per_label = self.values[run][metric]
        return case_foreground_mean(per_label) if label == FOREGROUND else np.asarray(per_label[label], float)

    def arm_matrix(self, arm: Arm, metric: str, label: str = FOREGROUND) -> np.ndarray:
        """(runs, cases) values of an arm."""
        return np.stack([self.run_values(run, metric, label) for run in arm.runs])

    def arm_values(self, arm: Arm, metric: str, label: str = FOREGROUND) -> np.ndarray:
        """An arm's per-case value: the mean over its runs, NaN where any run is undefined."""
        return self.arm_matrix(arm, metric, label).mean(axis=0)


# --------------------------------------------------------------------------- results


@dataclass
class Equivalence:
    """Two one-sided tests (TOST) of ``|difference| < margin``: equivalent when both reject at ``alpha``."""

    margin: float
    p_lower: float  # H0: difference <= -margin
    p_upper: float  # H0: difference >= +margin
    p_value: float  # max of the two
    equivalent: bool
    alpha: float
    test: str = "paired Wilcoxon signed-rank tests of the per-case differences"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairedDifference:
    """``other - baseline`` over the cases defined for both (case level: cases are the unit)."""

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
    p_adjusted: float | None = None  # set when this test is the family's test of a method comparison
    equivalence: Equivalence | None = None  # paired TOST with --margin (Dice)

    def as_dict(self) -> dict:
        return record(self)


@dataclass
class RunLevelResult:
    """``other arm - baseline arm`` with the training run as the unit (both arms have >= 2 runs)."""

    n_cases: int  # cases defined in every run of both arms
    run_means_baseline: list[float]
    run_means_other: list[float]
    difference: float  # difference of the arms' means of run means
    ci_low: float  # hierarchical bootstrap (runs within arm and fold, cases within fold, paired)
    ci_high: float
    n_resamples: int
    sd_baseline: float  # run-to-run standard deviation of the run means
    sd_other: float
    sd_pooled: float
    t_statistic: float
    df: int
    p_value: float
    detectable_difference: float  # 80 % power at alpha = 0.05 with this K and this run-to-run SD
    test: str = "Student's two-sample t-test on the per-run means"
    p_adjusted: float | None = None
    equivalence: Equivalence | None = None

    @property
    def n_runs(self) -> tuple[int, int]:
        return len(self.run_means_baseline), len(self.run_means_other)

    def as_dict(self) -> dict:
        return record(self)


@dataclass
class Verdict:
    """What a comparison shows, in plain words: ``kind`` is one of DIFFERENCE, EQUIVALENT, NOT_RESOLVABLE,
    ONE_RUN."""

    kind: str
    text: str


@dataclass
class MethodComparison:
    """One arm against the baseline arm for one metric, pooled over folds."""

    arm: str
    metric: str
    case_level: PairedDifference  # the arms' per-case values (mean over runs), cases as the unit
    run_level: RunLevelResult | None  # None unless both arms have >= 2 runs
    verdict: Verdict

    @property
    def headline_test(self) -> RunLevelResult | PairedDifference:
        """The test that decides: run level where it exists, else the case-level Wilcoxon test."""
        return self.run_level if self.run_level is not None else self.case_level


@dataclass
class AAComparison:
    """A run of an arm against the arm's first run: the same command trained twice (training noise only)."""

    arm: str
    run: str
    reference_run: str
    metric: str
    difference: PairedDifference


@dataclass
class Correction:
    method: str
    family_size: int
    family: str


@dataclass
class Differences:
    """Every paired comparison against the baseline arm."""

    baseline: str
    methods: dict[str, dict[str, MethodComparison]]  # arm -> metric
    per_fold: dict[str, dict[str, dict[str, PairedDifference]]]  # fold -> arm -> metric (case level)
    per_label: dict[str, dict[str, dict[str, PairedDifference]]]  # arm -> metric -> label (case level)
    correction: Correction
    aa: list[AAComparison]

    def comparisons(self) -> list[MethodComparison]:
        return [c for per_metric in self.methods.values() for c in per_metric.values()]


@dataclass
class MatchedMean:
    """A mean over the cases where it is informative (SQ over cases with at least one matched object)."""

    mean: float
    n_cases: int


@dataclass
class Aggregates:
    """nnU-Net's means of each run: run -> metric -> label (and FOREGROUND) -> mean, pooled and per fold."""

    pooled: dict[str, dict[str, dict[str, float]]]
    per_fold: dict[str, dict[str, dict[str, dict[str, float]]]]
    sq_matched_only: dict[str, MatchedMean] = field(default_factory=dict)


@dataclass
class RankStability:
    """How often each arm took each rank when runs and cases were resampled."""

    arms: list[str]
    n_cases: int
    n_boot: int
    seed: int
    full_ranks: dict[str, float]
    rank_counts: dict[str, list[int]]
    tau: dict[str, float]  # Kendall's tau between the full-data and the resampled rankings


@dataclass
class RankEntry:
    position: int
    arm: str
    mean_value: float  # mean per-case foreground value over the ranked cases
    mean_case_rank: float
    n_cases_ranked: int


@dataclass
class Ranking:
    metric: str
    definition: str
    entries: list[RankEntry]
    stability: RankStability


@dataclass
class ModelInfo:
    name: str
    arm: str
    folder: str
    layout: str
    trainer: str | None
    plans: str | None
    configuration: str | None


@dataclass
class Setup:
    dataset: str
    configuration: str
    plans: str
    folds: list[int]
    baseline: str  # the baseline arm
    models: list[ModelInfo]
    n_cases: int
    n_cases_per_fold: dict[str, int]
    metrics: list[str]
    spatial_unit: str  # "mm", or "px" where the images carry no spacing
    surface: dict
    statistics: dict
    versions: dict[str, str]
    labels: dict[str, str]


@dataclass
class ComparisonResult:
    """Everything ``compare`` found; :meth:`to_record` is ``results.json``."""

    tool: str
    version: str
    created: str
    command: str
    setup: Setup
    arms: list[Arm]
    table: CaseTable
    aggregates: Aggregates
    differences: Differences
    ranking: Ranking
    nan_counts: dict
    empty_cases: dict
    notes: list[str]
    figures: list[str] = field(default_factory=list)

    @property
    def runs_as_replicates(self) -> bool:
        """Whether every arm has at least two runs (every method comparison gets a run-level test)."""
        return all(a.n_runs >= 2 for a in self.arms)

    @property
    def single_run_arms(self) -> list[str]:
        return [a.name for a in self.arms if a.n_runs == 1]

    def to_record(self) -> dict:
        d = self.differences
        setup = asdict(self.setup)
        labels = setup.pop("labels")
        return {
            "tool": self.tool,
            "version": self.version,
            "created": self.created,
            "command": self.command,
            "setup": setup,
            "labels": labels,
            "arms": [{"name": a.name, "runs": a.runs} for a in self.arms],
            "aggregates": asdict(self.aggregates),
            "differences": {
                "baseline": d.baseline,
                "pooled": {a: {m: c.case_level.as_dict() for m, c in per.items()} for a, per in d.methods.items()},
                "run_level": {
                    a: {m: c.run_level.as_dict() for m, c in per.items() if c.run_level is not None}
                    for a, per in d.methods.items()
                    if any(c.run_level is not None for c in per.values())
                },
                "verdicts": {a: {m: asdict(c.verdict) for m, c in per.items()} for a, per in d.methods.items()},
                "per_fold": _nested_records(d.per_fold),
                "per_label": _nested_records(d.per_label),
                "correction": asdict(d.correction),
                "aa": [
                    {
                        "arm": x.arm,
                        "run": x.run,
                        "reference_run": x.reference_run,
                        "metric": x.metric,
                        **x.difference.as_dict(),
                    }  # fmt: skip
                    for x in d.aa
                ],
            },
            "ranking": [asdict(e) for e in self.ranking.entries],
            "ranking_definition": self.ranking.definition,
            "rank_stability": asdict(self.ranking.stability),
            "nan_counts": self.nan_counts,
            "empty_cases": self.empty_cases,
            "notes": self.notes,
            "cases": self.case_records(),
        }

    def case_records(self) -> list[dict]:
        """Every per-case number: case, fold, run -> metric -> label (and foreground mean) -> value."""
        table = self.table
        foreground = {r: {m: table.run_values(r, m) for m in table.metrics} for r in table.runs}
        rows = []
        for i, case in enumerate(table.cases):
            values = {
                run: {
                    metric: {**{k: v[i] for k, v in per_label.items()}, FOREGROUND: foreground[run][metric][i]}
                    for metric, per_label in metrics.items()
                }
                for run, metrics in table.values.items()
            }
            rows.append({"case": case, "fold": int(table.folds[i]), "values": values})
        return rows


def _nested_records(tree: dict) -> dict:
    return {k: _nested_records(v) if isinstance(v, dict) else v.as_dict() for k, v in tree.items()}
