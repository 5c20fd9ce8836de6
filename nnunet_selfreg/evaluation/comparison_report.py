"""Writing a comparison: ``results.json`` (every number), ``report.md`` and PNG figures, into a new folder.

The folder is assembled beside its destination and renamed into place when complete, so an interrupted
run never leaves a half-written report; an existing folder is replaced only when asked to.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nnunet_selfreg import outputs
from nnunet_selfreg.evaluation.results import CompareInputError, Comparison
from nnunet_selfreg.evaluation.stats import (
    FOREGROUND,
    HIGHER_IS_BETTER,
    MIN_NONZERO_FOR_005,
    Table,
    case_foreground_mean,
)
from nnunet_selfreg.report_folder import markdown_table, package_version, pyplot, write_report_folder

UNITS = {"Dice": "", "IoU": "", "HD95": " (mm)", "NSD": "", "PQ": "", "SQ": "", "RQ": "", "AJI": ""}


# --------------------------------------------------------------------------- results.json


def per_case_values(comparison: Comparison, table: Table) -> list[dict]:
    """Every per-case number: case, fold, and model -> metric -> label (and foreground mean) -> value."""
    fg = {m: {metric: case_foreground_mean(v) for metric, v in metrics.items()} for m, metrics in table.items()}
    rows = []
    for i, case in enumerate(comparison.cases):
        values = {
            m: {
                metric: {**{k: v[i] for k, v in per_label.items()}, FOREGROUND: fg[m][metric][i]}
                for metric, per_label in metrics.items()
            }
            for m, metrics in table.items()
        }
        rows.append({"case": case, "fold": comparison.case_folds[case], "values": values})
    return rows


def build_results(comparison: Comparison, table: Table, analysis: dict, empty_cases: dict, settings: dict) -> dict:
    """The complete, JSON-ready record of a comparison (``settings``: command, surface, bootstrap...)."""
    from nnunet_selfreg import __version__

    return {
        "tool": "nnunet-selfreg compare",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": settings["command"],
        "setup": {
            "dataset": comparison.dataset,
            "configuration": comparison.configuration,
            "plans": comparison.plans_identifier,
            "folds": comparison.folds,
            "baseline": comparison.baseline.name,
            "models": [
                {
                    "name": m.name,
                    "folder": str(m.folder),
                    "layout": m.layout,
                    "trainer": m.trainer,
                    "plans": m.plans_identifier,
                    "configuration": m.configuration,
                }
                for m in comparison.models
            ],
            "n_cases": len(comparison.cases),
            "n_cases_per_fold": {str(f): sum(v == f for v in comparison.case_folds.values()) for f in comparison.folds},
            "metrics": list(next(iter(table.values()))),
            "surface": settings["surface"],
            "statistics": settings["statistics"],
            "versions": {d: package_version(d) for d in ("nnunetv2", "monai", "scipy", "numpy", "torch")},
        },
        "labels": comparison.label_names,
        **analysis,
        "empty_cases": empty_cases,
        "notes": list(comparison.notes) + list(settings.get("notes", [])),
        "cases": per_case_values(comparison, table),
    }


# --------------------------------------------------------------------------- report.md


def _f(value: float | None, digits: int = 4) -> str:
    return "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "NaN" if value is None or math.isnan(value) else ("<0.0001" if value < 1e-4 else f"{value:.4f}")


def _label(results: dict, key: str) -> str:
    return "foreground mean" if key == FOREGROUND else f"{results['labels'].get(key, key)} ({key})"


def _setup_section(r: dict) -> list[str]:
    s = r["setup"]
    surface = s["surface"]
    stats_ = s["statistics"]
    lines = [
        "## Setup",
        "",
        f"- dataset `{s['dataset']}`, configuration `{s['configuration']}`, plans `{s['plans']}`",
        f"- folds {', '.join(map(str, s['folds']))}: {s['n_cases']} validation cases "
        f"({', '.join(f'fold {f}: {n}' for f, n in s['n_cases_per_fold'].items())}), paired by case identifier",
        f"- baseline (first model): `{s['baseline']}`",
        "- Dice and IoU: nnU-Net's own numbers from each `summary.json`",
    ]
    if surface["computed"]:
        lines.append(
            f"- HD95 (95th-percentile Hausdorff distance, mm) and NSD (normalised surface Dice, tolerance "
            f"{surface['nsd_tolerance_mm']} mm): MONAI's values (MONAI {s['versions']['monai']}), from the prediction "
            f"and reference files, spacing from nnU-Net's reader `{surface['reader']}`"
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
    inst = surface.get("instances")
    if inst:
        lines.append(
            f"- instance metrics of label {inst['label']} ({_label(r, inst['label'])}): objects are its connected "
            f"components ({inst['connectivity']}); PQ, SQ and RQ (= F1 of the objects matched at IoU > 0.5) by "
            "MONAI's `compute_panoptic_quality`, AJI (aggregated Jaccard index) as defined by Kumar et al.; "
            "a case with no object in either map is NaN"
        )
    lines += [
        f"- paired differences (other - baseline) over cases: mean, {stats_['confidence_level']:.0%} bootstrap CI "
        f"(`scipy.stats.bootstrap`, paired resampling of cases, {stats_['method']}, {stats_['n_resamples']} "
        f"resamples, seed {stats_['seed']}) and two-sided Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, "
        f"zero differences dropped); pooled p-values also corrected ({stats_.get('correction', 'none')}) below",
        f"- nnU-Net {s['versions']['nnunetv2']}, scipy {s['versions']['scipy']}; created {r['created']}",
        "",
    ]
    lines += markdown_table(
        ["#", "model", "layout", "folder"],
        [[str(i), f"`{m['name']}`", m["layout"], f"`{m['folder']}`"] for i, m in enumerate(s["models"])],
    )
    lines += ["Command:", "", "```", r["command"], "```", ""]
    return lines


def _pooled_section(r: dict) -> list[str]:
    metrics = r["setup"]["metrics"]
    pooled = r["aggregates"]["pooled"]
    lines = [
        "## Pooled over folds",
        "",
        "nnU-Net's aggregation: per label the mean over cases (NaN cases excluded), then the mean over labels.",
        "",
    ]
    lines += markdown_table(
        ["model", *[f"{m}{UNITS[m]}" for m in metrics]],
        [[f"`{model}`", *[_f(v[m][FOREGROUND]) for m in metrics]] for model, v in pooled.items()],
    )
    for metric in metrics:
        labels = [k for k in next(iter(pooled.values()))[metric] if k != FOREGROUND]
        lines += [f"Per label, {metric}{UNITS[metric]}:", ""]
        lines += markdown_table(
            ["model", *[_label(r, k) for k in labels]],
            [[f"`{model}`", *[_f(v[metric][k]) for k in labels]] for model, v in pooled.items()],
        )
    return lines


def _fold_section(r: dict) -> list[str]:
    lines = ["## Per fold", "", "Foreground mean (nnU-Net's aggregation) per fold.", ""]
    models = [m["name"] for m in r["setup"]["models"]]
    for metric in r["setup"]["metrics"]:
        rows = [
            [str(f), str(r["setup"]["n_cases_per_fold"][f]), *[_f(per[m][metric][FOREGROUND]) for m in models]]
            for f, per in r["aggregates"]["per_fold"].items()
        ]
        header = ["fold", "cases", *[f"`{m}`" for m in models]]
        lines += [f"{metric}{UNITS[metric]}:", ""] + markdown_table(header, rows)
    return lines


def _diff_row(d: dict) -> list[str]:
    ci = "NaN" if d["ci_low"] is None or math.isnan(d["ci_low"]) else f"[{_f(d['ci_low'])}, {_f(d['ci_high'])}]"
    return [
        str(d["n_pairs"]),
        str(d["n_excluded"]),
        _f(d["mean_baseline"]),
        _f(d["mean_other"]),
        _f(d["mean_difference"]),
        ci,
        _p(d["p_value"]) + (" †" if 0 < d["n_nonzero"] < MIN_NONZERO_FOR_005 else ""),
        d["note"],
    ]


_DIFF_HEADER = ["pairs", "excluded", "mean baseline", "mean other", "difference", "95% CI", "Wilcoxon p", "note"]


def _difference_section(r: dict) -> list[str]:
    d = r["differences"]
    lines = [
        f"## Differences against the baseline `{d['baseline']}`",
        "",
        "Per case, the metric is averaged over the labels defined for that case (NaN labels skipped); "
        "cases undefined for either model are excluded from the pair (column *excluded*). "
        "Difference = other - baseline: positive is better for Dice, IoU, NSD and the instance metrics, worse for "
        "HD95. "
        f"†: fewer than {MIN_NONZERO_FOR_005} non-zero differences, so the exact two-sided Wilcoxon p "
        "cannot go below 0.05 whatever the data.",
        "",
        "### Pooled over folds",
        "",
    ]
    rows = [[f"`{m}`", metric, *_diff_row(v)] for m, per in d["pooled"].items() for metric, v in per.items()]
    lines += markdown_table(["model", "metric", *_DIFF_HEADER], rows)
    lines += ["### Per fold", ""]
    rows = [
        [f, f"`{m}`", metric, *_diff_row(v)]
        for f, per_fold in d["per_fold"].items()
        for m, per in per_fold.items()
        for metric, v in per.items()
    ]
    lines += markdown_table(["fold", "model", "metric", *_DIFF_HEADER], rows)
    lines += ["### Per label, pooled over folds", ""]
    rows = [
        [f"`{m}`", metric, _label(r, label), *_diff_row(v)]
        for m, per in d["per_label"].items()
        for metric, per_label in per.items()
        for label, v in per_label.items()
    ]
    return lines + markdown_table(["model", "metric", "label", *_DIFF_HEADER], rows)


def _equivalence_word(e: dict) -> str:
    return "equivalent" if e["equivalent"] else "not shown"


def _p_adj(d: dict) -> str:
    return _p(d.get("p_adjusted"))


def _effects_section(r: dict) -> list[str]:
    d = r["differences"]
    corr = d.get("correction", {"method": "none", "family_size": 0})
    lines = [
        "### Effect sizes and corrected p-values (pooled over folds)",
        "",
        f"p ({corr['method']}): the Wilcoxon p-values corrected for the {corr['family_size']} pooled "
        "comparisons of this report (models x metrics); per-fold and per-label p-values above are not "
        "corrected. HL: Hodges-Lehmann shift (median of the Walsh averages of the paired differences) with "
        "its distribution-free 95% interval; r: matched-pairs rank-biserial correlation (sign of "
        "other - baseline); better / tie / worse: cases where the other model is better, equal, worse.",
        "",
    ]
    rows = []
    for m, per in d["pooled"].items():
        for metric, v in per.items():
            hl = "NaN" if v.get("hl_estimate") is None else _f(v["hl_estimate"])
            ci = "" if v.get("hl_ci_low") is None else f" [{_f(v['hl_ci_low'])}, {_f(v['hl_ci_high'])}]"
            rows.append(
                [
                    f"`{m}`",
                    metric,
                    _f(v["mean_difference"]),
                    _p(v["p_value"]),
                    _p_adj(v),
                    hl + ci,
                    _f(v.get("rank_biserial"), 2),
                    f"{v.get('better', 0)} / {v.get('ties', 0)} / {v.get('worse', 0)}",
                ]
            )
    header = ["model", "metric", "difference", "p", f"p ({corr['method']})", "HL [95% CI]", "r", "better/tie/worse"]
    lines += markdown_table(header, rows)
    eq = [(m, per["Dice"]["equivalence"]) for m, per in d["pooled"].items() if "equivalence" in per.get("Dice", {})]
    if eq:
        margin = eq[0][1]["margin"]
        lines += [
            f"### Equivalence within ±{margin:g} Dice",
            "",
            "Paired two one-sided Wilcoxon signed-rank tests (TOST) of the per-case Dice differences against "
            f"-{margin:g} and +{margin:g}; *equivalent* when both reject at alpha = 0.05, else *not shown* "
            "(which is not evidence of a difference).",
            "",
        ]
        rows = [
            [
                f"`{m}`",
                _p(e["p_lower"]),
                _p(e["p_upper"]),
                _p(e["p_value"]),
                "equivalent" if e["equivalent"] else "not shown",
            ]
            for m, e in eq
        ]
        lines += markdown_table(["model", "p (> -margin)", "p (< +margin)", "TOST p", "result"], rows)
    floor = d.get("noise_floor", {})
    lines += ["### Run-to-run noise floor (A/A)", ""]
    if floor.get("runs"):
        runs = ", ".join(f"`{x}`" for x in floor["runs"])
        lines += [
            f"The baseline was trained more than once ({runs} repeat `{d['baseline']}` with the same command). "
            "nnU-Net training is not deterministic: the difference between two runs of the *same* trainer is "
            "the floor below which a method difference cannot be told apart from training noise.",
            "",
        ]
        rows = []
        for metric, v in floor["per_metric"].items():
            diffs = ", ".join(_f(x) for x in v["mean_differences"])
            ps = ", ".join(_p(x) for x in v["p_values"])
            rows.append([metric, diffs, ps, _f(v["floor"])])
        lines += markdown_table(["metric", "A/A difference(s)", "A/A Wilcoxon p", "floor (max |A/A|)"], rows)
    else:
        lines += [
            "Not measured: the baseline was trained once. Train it again under another name (e.g. "
            "`nnUNetTrainer_Rep2`, or `nnunet-selfreg demo --repeats 2`) and add it to `-tr`; until then, "
            "a single run per model cannot separate a method effect from run-to-run noise.",
            "",
        ]
    return lines


def _stability_section(r: dict) -> list[str]:
    st = r.get("rank_stability") or {}
    if not st.get("rank_counts"):
        return []
    k = len(st["models"])
    rows = [[f"`{m}`", _f(st["full_ranks"][m], 1), *[str(c) for c in st["rank_counts"][m]]] for m in st["models"]]
    tau = st["tau"]
    return [
        "### Ranking stability",
        "",
        f"The {st['n_cases']} cases were resampled with replacement {st['n_boot']} times (seed {st['seed']}) and "
        "the models ranked by mean foreground Dice on each resample. Columns: how often each model took each "
        "rank. Kendall's tau between the full-data ranking and the bootstrap rankings: median "
        f"{_f(tau['median'], 3)} (2.5-97.5%: {_f(tau['p2.5'], 3)} to {_f(tau['p97.5'], 3)}); 1 means the ranking "
        "never changes.",
        "",
        *markdown_table(["model", "rank (all cases)", *[f"rank {i}" for i in range(1, k + 1)]], rows),
    ]


def _ranking_section(r: dict) -> list[str]:
    rows = [
        [str(x["position"]), f"`{x['model']}`", _f(x["pooled_Dice"]), _f(x["mean_case_rank"], 2)] for x in r["ranking"]
    ]
    n = r["ranking"][0]["n_cases_ranked"] if r["ranking"] else 0
    return [
        "## Ranking",
        "",
        "By pooled foreground Dice (nnU-Net's aggregation); second view: the mean rank over the "
        f"{n} cases whose foreground Dice is defined for every model (1 = best, ties share ranks).",
        "",
        *markdown_table(["position", "model", "pooled Dice", "mean case rank"], rows),
    ]


def _exclusion_section(r: dict) -> list[str]:
    lines = [
        "## Excluded (NaN) values",
        "",
        "As in nnU-Net, a label whose reference and prediction are both empty in a case has Dice, IoU, HD95 and "
        "NSD NaN and is left out of every mean. If only one of them is empty, Dice, IoU and NSD are 0 and HD95 "
        "is the image diagonal (a worst-case penalty; see Setup), all counted. Counts per model and label:",
        "",
    ]
    surface = r["setup"]["surface"]["computed"]
    rows = []
    for model, per_label in r["empty_cases"].items():
        for label, c in per_label.items():
            row = [
                f"`{model}`",
                _label(r, label),
                str(c["both_empty"]),
                str(c["reference_empty_only"]),
                str(c["prediction_empty_only"]),
            ]
            rows.append(row + ([str(r["nan_counts"][model]["HD95"][label])] if surface else []))
    header = ["model", "label", "both empty (all NaN)", "reference empty only", "prediction empty only"]
    lines += markdown_table(header + (["HD95 NaN"] if surface else []), rows)
    rows = [
        [f"`{model}`", metric, str(counts[FOREGROUND])]
        for model, per_metric in r["nan_counts"].items()
        for metric, counts in per_metric.items()
        if counts[FOREGROUND]
    ]
    if not rows:
        return lines + ["Every case has a defined per-case foreground mean for every model and metric.", ""]
    lines += ["Cases whose per-case foreground mean is undefined (no label defined), left out of the pairs:", ""]
    return lines + markdown_table(["model", "metric", "cases"], rows)


def render_markdown(r: dict) -> str:
    """``report.md`` from the results record."""
    models = [m["name"] for m in r["setup"]["models"]]
    lines = [f"# nnU-Net comparison: {' vs '.join(models)}", ""]
    lines += _setup_section(r) + _pooled_section(r) + _fold_section(r) + _difference_section(r)
    lines += _effects_section(r) + _ranking_section(r) + _stability_section(r) + _exclusion_section(r)
    if r["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    if r.get("figures"):
        lines += ["## Figures", "", *[f"![{Path(f).stem}]({f})" for f in r["figures"]], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _case_matrix(r: dict, model: str, metric: str, label: str = FOREGROUND) -> np.ndarray:
    values = [c["values"][model][metric][label] for c in r["cases"]]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _paired_figure(r: dict, plt, path: Path) -> None:
    models = [m["name"] for m in r["setup"]["models"]]
    base, others = models[0], models[1:]
    folds = np.array([c["fold"] for c in r["cases"]])
    fig, axes = plt.subplots(len(others), 2, figsize=(10, 4.5 * len(others)), squeeze=False)
    b = _case_matrix(r, base, "Dice")
    for row, other in zip(axes, others, strict=True):
        o = _case_matrix(r, other, "Dice")
        ok = ~(np.isnan(b) | np.isnan(o))
        for bi, oi in zip(b[ok], o[ok], strict=True):
            row[0].plot([0, 1], [bi, oi], color="tab:green" if oi >= bi else "tab:red", alpha=0.5, lw=1)
        row[0].set_xticks([0, 1], [base, other], fontsize=8)
        row[0].set_ylabel("foreground Dice per case")
        row[0].set_title(f"{other} vs {base}: {int(ok.sum())} paired cases", fontsize=9)
        for f in np.unique(folds[ok]):
            sel = ok & (folds == f)
            row[1].scatter(b[sel], o[sel], s=14, label=f"fold {f}")
        lims = [np.nanmin([b[ok].min(initial=1), o[ok].min(initial=1)]), 1.0]
        row[1].plot(lims, lims, color="grey", lw=1, ls="--")
        row[1].set_xlabel(f"{base} (baseline)")
        row[1].set_ylabel(other)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _box_figure(r: dict, plt, metric: str, path: Path) -> None:
    models = [m["name"] for m in r["setup"]["models"]]
    labels = [k for k in r["labels"] if k in r["cases"][0]["values"][models[0]][metric]]  # instance metrics: one
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels) * len(models)), 4.5))
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        data = [_case_matrix(r, model, metric, label) for label in labels]
        data = [d[~np.isnan(d)] for d in data]
        positions = [i + (j - (len(models) - 1) / 2) * width for i in range(len(labels))]
        bp = ax.boxplot(
            data,
            positions=positions,
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
            medianprops={"color": "black"},
        )
        for box in bp["boxes"]:
            box.set_facecolor(f"C{j}")
            box.set_alpha(0.6)
        ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=model)
    ax.set_xticks(range(len(labels)), [_label(r, k) for k in labels], fontsize=8)
    ax.set_ylabel(f"{metric}{UNITS[metric]} per case (NaN excluded)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fold_figure(r: dict, plt, path: Path) -> None:
    models = [m["name"] for m in r["setup"]["models"]]
    metrics = r["setup"]["metrics"]
    groups = [*r["aggregates"]["per_fold"], "pooled"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(models)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for j, model in enumerate(models):
            values = [r["aggregates"]["per_fold"][f][model][metric][FOREGROUND] for f in groups[:-1]]
            values.append(r["aggregates"]["pooled"][model][metric][FOREGROUND])
            x = np.arange(len(groups)) + (j - (len(models) - 1) / 2) * width
            ax.bar(x, np.array(values, dtype=float), width, label=model if ax is axes[0][0] else None, color=f"C{j}")
        ax.set_xticks(range(len(groups)), [f"fold {g}" if g != "pooled" else g for g in groups], fontsize=8)
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_title(f"{metric}{UNITS[metric]}, foreground mean ({better} is better)", fontsize=9)
    fig.legend(loc="lower center", ncol=len(models), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _blob_figure(r: dict, plt, path: Path) -> None:
    """challengeR-style blob plot: each model's bootstrap rank distribution (area = frequency)."""
    st = r["rank_stability"]
    models, k = st["models"], len(st["models"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * k, 3.6))
    for x, m in enumerate(models):
        counts = np.array(st["rank_counts"][m], dtype=float)
        share = counts / max(counts.sum(), 1)
        ax.scatter([x] * k, np.arange(1, k + 1), s=share * 900, alpha=0.6, color="C0")
        ax.scatter([x], [st["full_ranks"][m]], marker="x", color="k", zorder=3)
    ax.set_xticks(range(k), [m.replace("nnUNetTrainer", "") or "nnUNetTrainer" for m in models], rotation=20)
    ax.set_yticks(range(1, k + 1))
    ax.invert_yaxis()
    ax.set_ylabel("rank (1 = best)")
    ax.set_title(f"Rank stability: {st['n_boot']} bootstrap samples of the cases (x: all cases)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_figures(r: dict, folder: Path) -> list[str]:
    """PNG figures in ``folder``; returns their file names."""
    plt = pyplot()
    names = ["paired_dice.png"]
    _paired_figure(r, plt, folder / names[0])
    for metric in r["setup"]["metrics"]:
        names.append(f"box_{metric.lower()}.png")
        _box_figure(r, plt, metric, folder / names[-1])
    names.append("folds.png")
    _fold_figure(r, plt, folder / names[-1])
    if (r.get("rank_stability") or {}).get("rank_counts"):
        names.append("rank_stability.png")
        _blob_figure(r, plt, folder / names[-1])
    return names


# --------------------------------------------------------------------------- output folder


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty output folder unless ``overwrite``."""
    outputs.check_output_folder(folder, overwrite, CompareInputError)


def write_outputs(results: dict, folder: Path, overwrite: bool = False) -> list[Path]:
    """Write figures, ``results.json`` and ``report.md`` into ``folder`` (atomically replaced)."""
    check_output_folder(folder, overwrite)
    return write_report_folder(folder, results, lambda tmp: make_figures(results, tmp), render_markdown)
