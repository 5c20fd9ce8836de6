"""Writing a comparison: ``results.json`` (every number), ``report.md`` and PNG figures, into a new folder.

Everything is rendered from the typed :class:`~nnunet_selfreg.evaluation.model.ComparisonResult`. The report
opens with what the comparison can and cannot say (the design: runs per arm) and the verdicts, before any
p-value. The folder is assembled beside its destination and renamed into place when complete, so an
interrupted run never leaves a half-written report; an existing folder is replaced only when asked to.
"""

from __future__ import annotations

import math
import re
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nnunet_selfreg import outputs
from nnunet_selfreg.evaluation.model import (
    FOREGROUND,
    AAComparison,
    ComparisonResult,
    ModelInfo,
    PairedDifference,
    RunLevelResult,
    Setup,
)
from nnunet_selfreg.evaluation.results import CompareInputError, Comparison
from nnunet_selfreg.evaluation.stats import HIGHER_IS_BETTER, MIN_NONZERO_FOR_005, Analysis
from nnunet_selfreg.nnunet_folders import SUMMARY_JSON
from nnunet_selfreg.report_folder import markdown_table, package_version, pyplot, write_report_folder

#: metrics measured in units of length
DISTANCE_METRICS = ("HD95",)


def build_result(
    comparison: Comparison, analysis: Analysis, table, empty_cases: dict, settings: dict
) -> ComparisonResult:
    """The complete comparison (``settings``: command, surface, statistics, optional notes)."""
    from nnunet_selfreg import __version__

    setup = Setup(
        dataset=comparison.dataset,
        configuration=comparison.configuration,
        plans=comparison.plans_identifier,
        folds=comparison.folds,
        baseline=comparison.arms[0].name,
        models=[
            ModelInfo(
                m.name,
                comparison.arm_of(m.name),
                str(m.folder),
                m.layout,
                m.trainer,
                m.plans_identifier,
                m.configuration,
            )  # fmt: skip
            for m in comparison.models
        ],
        n_cases=len(comparison.cases),
        n_cases_per_fold={
            str(f): sum(case_fold == f for case_fold in comparison.case_folds.values()) for f in comparison.folds
        },
        metrics=table.metrics,
        spatial_unit=comparison.spatial_unit,
        surface=settings["surface"],
        statistics=settings["statistics"],
        versions={
            dist: package_version(dist) for dist in ("nnunetv2", "monai", "scipy", "statsmodels", "numpy", "torch")
        },
        labels=comparison.label_names,
    )
    return ComparisonResult(
        tool="nnunet-selfreg compare",
        version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=settings["command"],
        setup=setup,
        arms=comparison.arms,
        table=table,
        aggregates=analysis.aggregates,
        differences=analysis.differences,
        ranking=analysis.ranking,
        nan_counts=analysis.nan_counts,
        empty_cases=empty_cases,
        notes=list(comparison.notes) + list(settings.get("notes", [])),
    )


# --------------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 4) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_signed(value: float | None, digits: int = 4) -> str:
    return "NaN" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def fmt_p(value: float | None) -> str:
    return "NaN" if value is None or math.isnan(value) else ("<0.0001" if value < 1e-4 else f"{value:.4f}")


def fmt_interval(low: float, high: float) -> str:
    return "NaN" if math.isnan(low) or math.isnan(high) else f"[{fmt_signed(low)}, {fmt_signed(high)}]"


def equivalence_word(equivalent: bool) -> str:
    return "equivalent" if equivalent else "not shown"


def unit_suffix(metric: str, unit: str) -> str:
    return f" ({unit})" if metric in DISTANCE_METRICS else ""


def label_name(result: ComparisonResult, key: str) -> str:
    return "foreground mean" if key == FOREGROUND else f"{result.setup.labels.get(key, key)} ({key})"


def runs_of(result: ComparisonResult) -> str:
    return ", ".join(f"`{a.name}` {a.n_runs}" for a in result.arms)


# --------------------------------------------------------------------------- what the comparison can say


def design_statement(result: ComparisonResult) -> str:
    """The report's first words: what the p-values of this design can support."""
    single = result.single_run_arms
    if not single:
        return (
            f"**Training runs as replicates** (runs per arm: {runs_of(result)}). Verdicts follow the run-level "
            "t-test on the per-run means, which counts run-to-run training noise; case-level p-values further "
            "down compare cases only and ignore it."
        )
    if len(single) == len(result.arms):
        return (
            "**One training run per arm: no claim about a method is possible.** Every p-value in this report "
            "compares these trained models on these cases; it ignores run-to-run training noise (two runs of the "
            "same command differ too) and cannot support a claim about a method. Train each arm at least twice "
            "under its own name (`TRAINER_Rep2`, …) and give every run to `-tr` for a run-level test."
        )
    names = ", ".join(f"`{n}`" for n in single)
    return (
        f"**Not every arm was trained twice** (runs per arm: {runs_of(result)}). Comparisons that involve {names} "
        "get no run-level test: their p-values compare trained models on these cases, ignore run-to-run training "
        "noise and cannot support a claim about a method. Train those arms again (`TRAINER_Rep2`, …) for a "
        "run-level test."
    )


def verdict_section(result: ComparisonResult) -> list[str]:
    differences = result.differences
    lines = ["## Verdict", "", design_statement(result), ""]
    for arm, per_metric in differences.methods.items():
        lines.append(f"- `{arm}` vs `{differences.baseline}`, Dice: {per_metric['Dice'].verdict.text}.")
    lines.append("")
    if not any(c.run_level is not None for c in differences.comparisons()):
        return lines
    rows = [[f"`{c.arm}`", c.metric, c.verdict.kind] for c in differences.comparisons()]
    return lines + [
        "Every metric (numbers in *Run level* below):",
        "",
        *markdown_table(["arm", "metric", "verdict"], rows),
    ]


# --------------------------------------------------------------------------- setup


def setup_section(result: ComparisonResult) -> list[str]:
    setup = result.setup
    per_fold = ", ".join(f"fold {f}: {n}" for f, n in setup.n_cases_per_fold.items())
    lines = [
        "## Setup",
        "",
        f"- dataset `{setup.dataset}`, configuration `{setup.configuration}`, plans `{setup.plans}`",
        f"- folds {', '.join(map(str, setup.folds))}: {setup.n_cases} validation cases ({per_fold}), paired by case",
        f"- baseline (first arm): `{setup.baseline}`; runs per arm: {runs_of(result)}",
        f"- Dice and IoU: nnU-Net's own numbers from each `{SUMMARY_JSON}`",
        *surface_lines(result),
        *statistics_lines(result),
        f"- nnU-Net {setup.versions['nnunetv2']}, scipy {setup.versions['scipy']}, statsmodels "
        f"{setup.versions['statsmodels']}; created {result.created}",
        "",
    ]
    lines += markdown_table(
        ["#", "run", "arm", "layout", "folder"],
        [[str(i), f"`{m.name}`", f"`{m.arm}`", m.layout, f"`{m.folder}`"] for i, m in enumerate(setup.models)],
    )
    return lines + ["Command:", "", "```", result.command, "```", ""]


def surface_lines(result: ComparisonResult) -> list[str]:
    setup, surface = result.setup, result.setup.surface
    unit = setup.spatial_unit
    lines = []
    if surface["computed"]:
        why = " (the images carry no spacing: nnU-Net reads them with spacing 1)" if unit == "px" else ""
        lines.append(
            f"- HD95 (95th-percentile Hausdorff distance, {unit}) and NSD (normalised surface Dice, tolerance "
            f"{surface['nsd_tolerance_mm']} {unit}){why}: MONAI's values (MONAI {setup.versions['monai']}), from the "
            f"prediction and reference files, spacing from nnU-Net's reader `{surface['reader']}`"
        )
        if "hd95_one_empty" in surface:
            lines.append(f"- missed or spurious class: {surface['hd95_one_empty']['description']}")
    else:
        lines.append(f"- HD95 and NSD: not computed ({surface['reason']})")
    cache = surface.get("cache")
    if cache:
        lines.append(
            f"- file metrics: {cache['from_cache']} of {cache['pairs']} (case, model) pairs read from the metric "
            f"cache `{cache['folder']}`, {cache['computed']} computed"
            if cache["used"]
            else f"- file metrics: all {cache['pairs']} (case, model) pairs computed (`--no-cache`)"
        )
    instances = surface.get("instances")
    if instances:
        lines.append(
            f"- instance metrics of label {instances['label']} ({label_name(result, instances['label'])}): objects "
            f"are its connected components ({instances['connectivity']}); PQ, SQ and RQ (= F1 of the objects "
            "matched at IoU > 0.5) by MONAI's `compute_panoptic_quality`, AJI (aggregated Jaccard index) as "
            "defined by Kumar et al.; a case with no object in either map is NaN; SQ is 0 in a case without a "
            "match (MONAI's convention)"
        )
    return lines


def statistics_lines(result: ComparisonResult) -> list[str]:
    stats_ = result.setup.statistics
    return [
        f"- case level (cases as the unit; an arm's per-case value is the mean over its runs): mean paired "
        f"difference with its {stats_['confidence_level']:.0%} bootstrap CI (`scipy.stats.bootstrap`, "
        f"{stats_['method']}, {stats_['n_resamples']} resamples, seed {stats_['seed']}) and the two-sided Wilcoxon "
        "signed-rank test (`scipy.stats.wilcoxon`, zero differences dropped)",
        f"- run level (arms with two or more runs): {stats_['run_level']}; run-aware interval: "
        f"{stats_['run_aware_interval']}",
        f"- correction ({stats_['correction']}) over the {result.differences.correction.family}",
    ]


# --------------------------------------------------------------------------- run level


def run_level_section(result: ComparisonResult) -> list[str]:
    differences = result.differences
    comparisons = [c for c in differences.comparisons() if c.run_level is not None]
    if not comparisons:
        return []
    method = differences.correction.method
    lines = [
        f"## Run level: arms against `{differences.baseline}`",
        "",
        "The unit is the training run: each run's mean over the cases defined in every run of both arms. "
        "Difference: of the arms' mean run means (other - baseline). Run-aware 95% interval: hierarchical "
        "bootstrap (in each fold the runs of each arm and the cases are drawn with replacement, the same cases "
        "for both arms). p: Student's two-sample t-test on the run means "
        f"(df = runs - 2), corrected ({method}) over the method family. SD: run-to-run standard deviation of "
        "the run means. Detectable: the smallest difference this t-test detects with 80% power at alpha = "
        "0.05 with these runs and the pooled SD (itself estimated from few runs).",
        "",
    ]
    rows = [run_level_row(c.arm, c.metric, c.run_level, c.verdict.kind) for c in comparisons]
    header = ["arm", "metric", "runs", "cases", "difference", "run-aware 95% CI", "t (df)", "p", f"p ({method})",
              "SD baseline", "SD arm", "detectable", "verdict"]  # fmt: skip
    lines += markdown_table(header, rows)
    lines += run_means_table(result, comparisons)
    return lines + run_equivalence_table(comparisons)


def run_level_row(arm: str, metric: str, run: RunLevelResult, verdict: str) -> list[str]:
    k_base, k_other = run.n_runs
    return [
        f"`{arm}`",
        metric,
        f"{k_base} + {k_other}",
        str(run.n_cases),
        fmt_signed(run.difference),
        fmt_interval(run.ci_low, run.ci_high),
        f"{fmt(run.t_statistic, 2)} ({run.df})",
        fmt_p(run.p_value),
        fmt_p(run.p_adjusted),
        fmt(run.sd_baseline),
        fmt(run.sd_other),
        fmt(run.detectable_difference),
        verdict,
    ]


def run_means_table(result: ComparisonResult, comparisons) -> list[str]:
    dice = [c for c in comparisons if c.metric == "Dice"]
    if not dice:
        return []
    rows = [[f"`{result.differences.baseline}`", ", ".join(fmt(x) for x in dice[0].run_level.run_means_baseline)]]
    rows += [[f"`{c.arm}`", ", ".join(fmt(x) for x in c.run_level.run_means_other)] for c in dice]
    return ["Per-run mean foreground Dice (the run level's data):", "", *markdown_table(["arm", "runs"], rows)]


def run_equivalence_table(comparisons) -> list[str]:
    tested = [c for c in comparisons if c.run_level.equivalence is not None]
    if not tested:
        return []
    margin = tested[0].run_level.equivalence.margin
    rows = [
        [f"`{c.arm}`", fmt_p(equivalence.p_lower), fmt_p(equivalence.p_upper), equivalence_word(equivalence.equivalent)]
        for c in tested
        for equivalence in [c.run_level.equivalence]
    ]
    return [
        f"Equivalence within ±{margin:g} Dice on the run means (two one-sided t-tests, "
        "`statsmodels.stats.weightstats.ttost_ind`):",
        "",
        *markdown_table(["arm", "p (> -margin)", "p (< +margin)", "result"], rows),
    ]


# --------------------------------------------------------------------------- nnU-Net's means


def pooled_section(result: ComparisonResult) -> list[str]:
    metrics, pooled, unit = result.setup.metrics, result.aggregates.pooled, result.setup.spatial_unit
    lines = [
        "## Pooled over folds",
        "",
        "nnU-Net's aggregation per run: per label the mean over cases (NaN cases excluded), then the mean over labels.",
        "",
    ]
    lines += markdown_table(
        ["run", *[f"{m}{unit_suffix(m, unit)}" for m in metrics]],
        [[f"`{run}`", *[fmt(values[m][FOREGROUND]) for m in metrics]] for run, values in pooled.items()],
    )
    for metric in metrics:
        labels = [k for k in next(iter(pooled.values()))[metric] if k != FOREGROUND]
        lines += [f"Per label, {metric}{unit_suffix(metric, unit)}:", ""]
        lines += markdown_table(
            ["run", *[label_name(result, k) for k in labels]],
            [[f"`{run}`", *[fmt(values[metric][k]) for k in labels]] for run, values in pooled.items()],
        )
    return lines + matched_sq_lines(result)


def matched_sq_lines(result: ComparisonResult) -> list[str]:
    matched = result.aggregates.sq_matched_only
    if not matched:
        return []
    rows = [
        [f"`{run}`", fmt(result.aggregates.pooled[run]["SQ"][FOREGROUND]), fmt(m.mean), str(m.n_cases)]
        for run, m in matched.items()
    ]
    return [
        "SQ is 0 in a case where no object is matched (MONAI's convention), which pulls the mean SQ down although "
        "SQ is the quality of the matches; beside it, the mean over the cases with at least one match:",
        "",
        *markdown_table(["run", "SQ (all cases)", "SQ (matched cases only)", "cases with a match"], rows),
    ]


def fold_section(result: ComparisonResult) -> list[str]:
    lines = ["## Per fold", "", "Foreground mean (nnU-Net's aggregation) per fold and run.", ""]
    runs, unit = result.table.runs, result.setup.spatial_unit
    for metric in result.setup.metrics:
        rows = [
            [f, str(result.setup.n_cases_per_fold[f]), *[fmt(per[run][metric][FOREGROUND]) for run in runs]]
            for f, per in result.aggregates.per_fold.items()
        ]
        header = ["fold", "cases", *[f"`{run}`" for run in runs]]
        lines += [f"{metric}{unit_suffix(metric, unit)}:", ""] + markdown_table(header, rows)
    return lines


# --------------------------------------------------------------------------- case level


DIFFERENCE_HEADER = ["pairs", "excluded", "mean baseline", "mean other", "difference", "95% CI", "Wilcoxon p", "note"]


def difference_row(d: PairedDifference) -> list[str]:
    dagger = " †" if 0 < d.n_nonzero < MIN_NONZERO_FOR_005 else ""
    return [
        str(d.n_pairs),
        str(d.n_excluded),
        fmt(d.mean_baseline),
        fmt(d.mean_other),
        fmt(d.mean_difference),
        fmt_interval(d.ci_low, d.ci_high).replace("+", ""),
        fmt_p(d.p_value) + dagger,
        d.note,
    ]


def case_level_section(result: ComparisonResult) -> list[str]:
    differences = result.differences
    lines = [
        f"## Case level: differences against the baseline `{differences.baseline}`",
        "",
        "Cases are the unit: these intervals and p-values ignore run-to-run training noise. Per case, the metric "
        "is averaged over the labels defined for that case (NaN labels skipped), and an arm's value is the mean "
        "over its runs; cases undefined for either arm are excluded from the pair (column *excluded*). "
        "Difference = other - baseline: positive is better for Dice, IoU, NSD and the instance metrics, worse "
        f"for HD95. †: fewer than {MIN_NONZERO_FOR_005} non-zero differences, so the exact two-sided Wilcoxon p "
        "cannot go below 0.05 whatever the data.",
        "",
        "### Pooled over folds",
        "",
    ]
    rows = [[f"`{c.arm}`", c.metric, *difference_row(c.case_level)] for c in differences.comparisons()]
    lines += markdown_table(["arm", "metric", *DIFFERENCE_HEADER], rows)
    lines += ["### Per fold (uncorrected)", ""]
    rows = [
        [f, f"`{arm}`", metric, *difference_row(v)]
        for f, per_fold in differences.per_fold.items()
        for arm, per in per_fold.items()
        for metric, v in per.items()
    ]
    lines += markdown_table(["fold", "arm", "metric", *DIFFERENCE_HEADER], rows)
    lines += ["### Per label, pooled over folds (uncorrected)", ""]
    rows = [
        [f"`{arm}`", metric, label_name(result, label), *difference_row(v)]
        for arm, per in differences.per_label.items()
        for metric, per_label in per.items()
        for label, v in per_label.items()
    ]
    return lines + markdown_table(["arm", "metric", "label", *DIFFERENCE_HEADER], rows)


def effects_section(result: ComparisonResult) -> list[str]:
    differences = result.differences
    method = differences.correction.method
    lines = [
        "### Effect sizes (case level, pooled over folds)",
        "",
        f"p ({method}): corrected together with the other deciding tests of the "
        f"{differences.correction.family_size} method "
        "comparisons; shown where this case-level Wilcoxon test decides (an arm with one run), blank where the "
        "run-level test does. HL: "
        "Hodges-Lehmann shift (median of the Walsh averages of the paired differences) with its "
        "distribution-free 95% interval; r: matched-pairs rank-biserial correlation (sign of other - baseline); "
        "better / tie / worse: cases where the other arm is better, equal, worse.",
        "",
    ]
    rows = [effects_row(c.arm, c.metric, c.case_level) for c in differences.comparisons()]
    header = ["arm", "metric", "difference", "p", f"p ({method})", "HL [95% CI]", "r", "better/tie/worse"]
    return lines + markdown_table(header, rows) + case_equivalence_section(result)


def effects_row(arm: str, metric: str, d: PairedDifference) -> list[str]:
    return [
        f"`{arm}`",
        metric,
        fmt(d.mean_difference),
        fmt_p(d.p_value),
        "" if d.p_adjusted is None else fmt_p(d.p_adjusted),
        f"{fmt(d.hl_estimate)} [{fmt(d.hl_ci_low)}, {fmt(d.hl_ci_high)}]",
        fmt(d.rank_biserial, 2),
        f"{d.better} / {d.ties} / {d.worse}",
    ]


def case_equivalence_section(result: ComparisonResult) -> list[str]:
    tested = [c for c in result.differences.comparisons() if c.case_level.equivalence is not None]
    if not tested:
        return []
    margin = tested[0].case_level.equivalence.margin
    rows = [
        [
            f"`{c.arm}`",
            fmt_p(equivalence.p_lower),
            fmt_p(equivalence.p_upper),
            fmt_p(equivalence.p_value),
            equivalence_word(equivalence.equivalent),
        ]
        for c in tested
        for equivalence in [c.case_level.equivalence]
    ]
    return [
        f"### Equivalence within ±{margin:g} Dice (case level)",
        "",
        "Paired two one-sided Wilcoxon signed-rank tests (TOST) of the per-case Dice differences against "
        f"-{margin:g} and +{margin:g}; *equivalent* when both reject at alpha = 0.05, else *not shown* (which is "
        "not evidence of a difference). Cases are the unit: this says nothing about a method with one run per arm.",
        "",
        *markdown_table(["arm", "p (> -margin)", "p (< +margin)", "TOST p", "result"], rows),
    ]


def aa_section(result: ComparisonResult) -> list[str]:
    aa = result.differences.aa
    lines = ["## Run-to-run (A/A) differences", ""]
    if not aa:
        return lines + [
            "Not measured: every arm was trained once. nnU-Net training is not deterministic; train an arm again "
            "under another name (`TRAINER_Rep2`, or `nnunet-selfreg demo --repeats 2`) and add it to `-tr` to see "
            "how far two runs of the same command land apart.",
            "",
        ]
    lines += [
        "Each later run of an arm against the arm's first run: the same command trained again. The interval is "
        "the case-level bootstrap CI of that difference; an interval away from 0 means the two trained models "
        "differ on these cases although the method is the same. These comparisons are not part of the corrected "
        "method family.",
        "",
    ]
    rows = [aa_row(check) for check in aa]
    return lines + markdown_table(["arm", "run", "against", "metric", "difference", "95% CI", "Wilcoxon p"], rows)


def aa_row(check: AAComparison) -> list[str]:
    difference = check.difference
    return [f"`{check.arm}`", f"`{check.run}`", f"`{check.reference_run}`", check.metric,
            fmt_signed(difference.mean_difference), fmt_interval(difference.ci_low, difference.ci_high),
            fmt_p(difference.p_value)]  # fmt: skip


# --------------------------------------------------------------------------- ranking


def ranking_section(result: ComparisonResult) -> list[str]:
    ranking = result.ranking
    rows = [
        [str(entry.position), f"`{entry.arm}`", fmt(entry.mean_value), fmt(entry.mean_case_rank, 2)]
        for entry in ranking.entries
    ]
    n = ranking.entries[0].n_cases_ranked if ranking.entries else 0
    return [
        "## Ranking",
        "",
        f"By the {ranking.definition} Second view: the mean rank over the {n} cases (1 = best, ties share ranks).",
        "",
        *markdown_table(["position", "arm", f"mean {ranking.metric}", "mean case rank"], rows),
    ]


def stability_section(result: ComparisonResult) -> list[str]:
    st = result.ranking.stability
    if not st.rank_counts:
        return []
    rows = [[f"`{a}`", fmt(st.full_ranks[a], 1), *map(str, st.rank_counts[a])] for a in st.arms]
    tau = st.tau
    return [
        "### Ranking stability",
        "",
        f"{st.n_boot} resamples (seed {st.seed}) of the {st.n_cases} cases within their folds, and of each arm's "
        "runs, as for the run-aware interval; the arms ranked on each by the same mean. Columns: how often each "
        "arm took each rank. Kendall's tau between the full-data ranking and the resampled rankings: median "
        f"{fmt(tau['median'], 3)} (2.5-97.5%: {fmt(tau['p2.5'], 3)} to {fmt(tau['p97.5'], 3)}); 1 means the "
        "ranking never changes.",
        "",
        *markdown_table(["arm", "rank (all cases)", *[f"rank {i}" for i in range(1, len(st.arms) + 1)]], rows),
    ]


# --------------------------------------------------------------------------- excluded values


def exclusion_section(result: ComparisonResult) -> list[str]:
    lines = [
        "## Excluded (NaN) values",
        "",
        "As in nnU-Net, a label whose reference and prediction are both empty in a case has Dice, IoU, HD95 and "
        "NSD NaN and is left out of every mean. If only one of them is empty, Dice, IoU and NSD are 0 and HD95 "
        "is the image diagonal (a worst-case penalty; see Setup), all counted. Counts per run and label:",
        "",
    ]
    surface = result.setup.surface["computed"] and "HD95" in result.setup.metrics
    rows = []
    for run, per_label in result.empty_cases.items():
        for label, c in per_label.items():
            row = [f"`{run}`", label_name(result, label), str(c["both_empty"]), str(c["reference_empty_only"]),
                   str(c["prediction_empty_only"])]  # fmt: skip
            rows.append(row + ([str(result.nan_counts[run]["HD95"][label])] if surface else []))
    header = ["run", "label", "both empty (all NaN)", "reference empty only", "prediction empty only"]
    lines += markdown_table(header + (["HD95 NaN"] if surface else []), rows)
    rows = [
        [f"`{run}`", metric, str(counts[FOREGROUND])]
        for run, per_metric in result.nan_counts.items()
        for metric, counts in per_metric.items()
        if counts[FOREGROUND]
    ]
    if not rows:
        return lines + ["Every case has a defined per-case foreground mean for every run and metric.", ""]
    lines += ["Cases whose per-case foreground mean is undefined (no label defined), left out of the pairs:", ""]
    return lines + markdown_table(["run", "metric", "cases"], rows)


def render_markdown(result: ComparisonResult) -> str:
    """``report.md``: the verdict first, then the numbers behind it."""
    lines = [f"# nnU-Net comparison: {' vs '.join(a.name for a in result.arms)}", ""]
    for section in (verdict_section, setup_section, run_level_section, pooled_section, fold_section,
                    case_level_section, effects_section, aa_section, ranking_section, stability_section,
                    exclusion_section):  # fmt: skip
        lines += section(result)
    if result.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    if result.figures:
        lines += ["## Figures", "", *[f"![{Path(f).stem}]({f})" for f in result.figures], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- console


def console_summary(result: ComparisonResult, output: Path) -> list[str]:
    """What ``compare`` prints: the design statement before any p-value, then one block per comparison."""
    setup, differences = result.setup, result.differences
    lines = [
        f"compared {setup.n_cases} cases over folds {setup.folds}; runs per arm: "
        + ", ".join(f"{a.name} {a.n_runs}" for a in result.arms),
        *textwrap.wrap(design_statement(result).replace("**", "").replace("`", ""), 100),
    ]
    lines += [
        f"  {entry.position}. {entry.arm}: mean Dice {entry.mean_value:.4f}, mean case rank {entry.mean_case_rank:.2f}"
        for entry in result.ranking.entries
    ]
    for arm, per_metric in differences.methods.items():
        lines += comparison_lines(arm, differences.baseline, per_metric["Dice"], differences.correction.method)
    for check in (check for check in differences.aa if check.metric == "Dice"):
        diff = check.difference
        lines.append(
            f"  A/A {check.run} - {check.reference_run}: Dice {diff.mean_difference:+.4f} "
            f"{fmt_interval(diff.ci_low, diff.ci_high)} (same command trained twice)"
        )
    return lines + [f"report: {output / 'report.md'}"]


def comparison_lines(arm: str, baseline: str, comparison, correction: str) -> list[str]:
    run, case = comparison.run_level, comparison.case_level
    if run is not None:
        numbers = (
            f"Dice {run.difference:+.4f} {fmt_interval(run.ci_low, run.ci_high)} (run-aware), run-level p = "
            f"{run.p_value:.4g} ({correction} {fmt_p(run.p_adjusted)}); run SD {run.sd_baseline:.4f} / "
            f"{run.sd_other:.4f}; detects >= {run.detectable_difference:.4f}"
        )
    else:
        numbers = (
            f"Dice {case.mean_difference:+.4f} {fmt_interval(case.ci_low, case.ci_high)}, case-level Wilcoxon p = "
            f"{case.p_value:.4g} ({correction} {fmt_p(case.p_adjusted)}): trained models, not methods"
        )
    return [f"  {arm} - {baseline}: {numbers}", f"    verdict: {comparison.verdict.text}"]


# --------------------------------------------------------------------------- figures


def figure_name(name: str, width: int = 28) -> str:
    """A run or arm name broken into lines for axis labels, after '_' or '/' where it can."""
    lines = [""]
    for token in re.split(r"(?<=[_/])", name):
        if lines[-1] and len(lines[-1]) + len(token) > width:
            lines.append("")
        lines[-1] += token
    return "\n".join(part for line in lines for part in textwrap.wrap(line, width) or [line])


def paired_figure(result: ComparisonResult, plt, path: Path) -> None:
    """Per-case foreground Dice of every arm against the baseline arm (runs averaged)."""
    table, arms = result.table, result.arms
    base, others = arms[0], arms[1:]
    fig, axes = plt.subplots(len(others), 2, figsize=(10, 4.5 * len(others)), squeeze=False)
    b = table.arm_values(base, "Dice")
    for row, other in zip(axes, others, strict=True):
        o = table.arm_values(other, "Dice")
        ok = ~(np.isnan(b) | np.isnan(o))
        for bi, oi in zip(b[ok], o[ok], strict=True):
            row[0].plot([0, 1], [bi, oi], color="tab:green" if oi >= bi else "tab:red", alpha=0.5, lw=1)
        row[0].set_xticks([0, 1], [figure_name(base.name), figure_name(other.name)], fontsize=9)
        row[0].set_ylabel("foreground Dice per case")
        row[0].set_title(f"{int(ok.sum())} paired cases", fontsize=10)
        for f in np.unique(table.folds[ok]):
            sel = ok & (table.folds == f)
            row[1].scatter(b[sel], o[sel], s=14, label=f"fold {f}")
        lims = [np.nanmin([b[ok].min(initial=1), o[ok].min(initial=1)]), 1.0]
        row[1].plot(lims, lims, color="grey", lw=1, ls="--")
        row[1].set_xlabel(f"{figure_name(base.name, 40)} (baseline)", fontsize=9)
        row[1].set_ylabel(figure_name(other.name, 40), fontsize=9)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def box_figure(result: ComparisonResult, plt, metric: str, path: Path) -> None:
    """Per-case values of each arm (runs averaged), per label."""
    table, arms = result.table, result.arms
    labels = [k for k in result.setup.labels if k in table.labels(metric)]  # instance metrics: one label
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(arms)), 4.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        data = [table.arm_values(arm, metric, label) for label in labels]
        data = [values[~np.isnan(values)] for values in data]
        positions = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(labels))]
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False,
                           medianprops={"color": "black"})  # fmt: skip
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{j}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=f"{arm.name} ({arm.n_runs} run{'s' * (arm.n_runs > 1)})")
    ax.set_xticks(range(len(labels)), [label_name(result, k) for k in labels], fontsize=9)
    ax.set_ylabel(f"{metric}{unit_suffix(metric, result.setup.spatial_unit)} per case (NaN excluded)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_colours(result: ComparisonResult) -> dict[str, tuple]:
    """Each run in its arm's colour, later runs lighter."""
    from matplotlib.colors import to_rgba

    return {
        run: to_rgba(f"C{j}", 1.0 - 0.45 * i / max(arm.n_runs - 1, 1))
        for j, arm in enumerate(result.arms)
        for i, run in enumerate(arm.runs)
    }


def fold_figure(result: ComparisonResult, plt, path: Path) -> None:
    """Foreground mean per fold and pooled, one bar per run, one panel per metric (two panels a row)."""
    runs, metrics = result.table.runs, result.setup.metrics
    groups = [*result.aggregates.per_fold, "pooled"]
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    legend_height = 0.28 * math.ceil(len(runs) / 3) + 0.12  # inches below the panels
    height = 3.4 * nrows + legend_height
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, height), squeeze=False)
    width, colours = 0.8 / len(runs), run_colours(result)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for j, run in enumerate(runs):
            values = [result.aggregates.per_fold[f][run][metric][FOREGROUND] for f in groups[:-1]]
            values.append(result.aggregates.pooled[run][metric][FOREGROUND])
            x = np.arange(len(groups)) + (j - (len(runs) - 1) / 2) * width
            ax.bar(x, np.array(values, dtype=float), width, label=run, color=colours[run])
        ax.set_xticks(range(len(groups)), [f"fold {g}" if g != "pooled" else g for g in groups], fontsize=9)
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_title(f"{metric}{unit_suffix(metric, result.setup.spatial_unit)} ({better} is better)", fontsize=10)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, len(runs)), fontsize=9)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def runs_figure(result: ComparisonResult, plt, path: Path) -> None:
    """Each arm's per-run means (dots) and their mean (bar), one panel per metric: the run-level data."""
    metrics, table = result.setup.metrics, result.table
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for j, arm in enumerate(result.arms):
            means = table.arm_matrix(arm, metric)
            means = np.array([np.nanmean(row) if np.isfinite(row).any() else np.nan for row in means])
            ax.scatter(np.full(len(means), j), means, color=f"C{j}", zorder=3)
            ax.hlines(np.nanmean(means), j - 0.3, j + 0.3, color=f"C{j}")
        ax.set_xticks(range(len(result.arms)), [figure_name(a.name, 18) for a in result.arms], fontsize=9)
        ax.set_xlim(-0.6, len(result.arms) - 0.4)
        ax.set_title(f"{metric}{unit_suffix(metric, result.setup.spatial_unit)}: mean of each run", fontsize=10)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stability_figure(result: ComparisonResult, plt, path: Path) -> None:
    """challengeR-style blob plot: each arm's resampled rank distribution (area = frequency)."""
    st = result.ranking.stability
    k = len(st.arms)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * k), 4.2))
    for x, arm in enumerate(st.arms):
        counts = np.array(st.rank_counts[arm], dtype=float)
        ax.scatter([x] * k, np.arange(1, k + 1), s=counts / max(counts.sum(), 1) * 900, alpha=0.6, color="C0")
        ax.scatter([x], [st.full_ranks[arm]], marker="x", color="k", zorder=3)
    ax.set_xticks(range(k), [figure_name(a, 22) for a in st.arms], fontsize=9)
    ax.set_xlim(-0.6, k - 0.4)
    ax.set_ylim(k + 0.6, 0.4)
    ax.set_yticks(range(1, k + 1))
    ax.set_ylabel("rank (1 = best)")
    ax.set_title(f"Rank stability: {st.n_boot} resamples\n(circle area: how often; x: rank on all cases)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_figures(result: ComparisonResult, folder: Path) -> list[str]:
    """PNG figures in ``folder``; returns their file names."""
    plt = pyplot()
    names = ["paired_dice.png"]
    paired_figure(result, plt, folder / names[0])
    for metric in result.setup.metrics:
        names.append(f"box_{metric.lower()}.png")
        box_figure(result, plt, metric, folder / names[-1])
    names.append("folds.png")
    fold_figure(result, plt, folder / names[-1])
    if any(a.n_runs > 1 for a in result.arms):
        names.append("runs.png")
        runs_figure(result, plt, folder / names[-1])
    if result.ranking.stability.rank_counts:
        names.append("rank_stability.png")
        stability_figure(result, plt, folder / names[-1])
    return names


# --------------------------------------------------------------------------- output folder


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty output folder unless ``overwrite``."""
    outputs.check_output_folder(folder, overwrite, CompareInputError)


def write_outputs(result: ComparisonResult, folder: Path, overwrite: bool = False) -> list[Path]:
    """Write figures, ``results.json`` and ``report.md`` into ``folder`` (atomically replaced)."""
    check_output_folder(folder, overwrite)

    def figures(tmp: Path) -> list[str]:
        result.figures = make_figures(result, tmp)
        return result.figures

    return write_report_folder(folder, result.to_record(), figures, lambda _record: render_markdown(result))
