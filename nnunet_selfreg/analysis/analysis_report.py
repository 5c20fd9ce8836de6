"""Writing an analysis: ``results.json`` (every number), ``report.md`` and PNG figures, into a new folder.

The folder is assembled beside its destination and renamed into place when complete; an existing
folder is replaced only when asked to.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from nnunet_selfreg import outputs
from nnunet_selfreg.report_folder import markdown_table, pyplot, write_report_folder

#: (key in a stage's record, title, y label, file name)
METRICS = (
    ("cka", "Linear CKA with F_final", "linear CKA (dotted: positions shuffled)", "cka.png"),
    ("scr", "SCR distance to F_final", "SCR (MSE of random channel pairs)", "scr.png"),
    ("mean_abs_correlation", "Channel redundancy: mean |correlation|", "mean |Pearson r| between channels",
     "channel_correlation.png"),
    ("effective_rank", "Effective rank of the channel covariance", "effective rank (dotted: channels)",
     "effective_rank.png"),
)  # fmt: skip
GRADCAM_FIGURE = "gradcam.png"


# --------------------------------------------------------------------------- output folder


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless ``overwrite`` (raises ``FileExistsError``)."""
    outputs.check_output_folder(folder, overwrite, FileExistsError)


def write_outputs(results: dict, displays: dict[str, dict], folder: Path, overwrite: bool = False) -> list[Path]:
    """Write the figures, ``results.json`` and ``report.md`` into ``folder`` (replaced as a whole)."""
    check_output_folder(folder, overwrite)
    return write_report_folder(folder, results, lambda tmp: make_figures(results, displays, tmp), render_markdown)


# --------------------------------------------------------------------------- figures


def _positions(model: dict, max_encoder: int) -> tuple[list[float], list[float]]:
    """x of each encoder stage (by resolution from the finest) and decoder stage (``F_final`` aligned)."""
    n_enc = model["n_encoder_stages"]
    n_dec = len(model["stages"]) - n_enc
    return list(range(n_enc)), [j + (max_encoder - 1 - n_dec) for j in range(n_dec)]


def _metric_figure(results: dict, key: str, title: str, ylabel: str, path: Path, plt) -> None:
    models = results["models"]
    max_enc = max(m["n_encoder_stages"] for m in models)
    widest = max(models, key=lambda m: m["n_encoder_stages"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, gridspec_kw={"width_ratios": [max_enc, max_enc - 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m_index, model in enumerate(models):
        colour = colours[m_index % len(colours)]
        xe, xd = _positions(model, max_enc)
        enc = model["stages"][: model["n_encoder_stages"]]
        dec = model["stages"][model["n_encoder_stages"] :]
        for ax, xs, stages in ((axes[0], xe, enc), (axes[1], xd, dec)):
            pts = [(x, s[key]) for x, s in zip(xs, stages, strict=True) if _finite(s[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colour, label=model["name"])
            extra = {"cka": "cka_shuffled", "effective_rank": "channels"}.get(key)
            if extra:  # chance level of each model (its colour) / channel count (grey, shared)
                pts = [(x, s[extra]) for x, s in zip(xs, stages, strict=True) if _finite(s[extra])]
                if pts:
                    style = {"color": colour, "alpha": 0.8} if key == "cka" else {"color": "grey", "alpha": 0.6}
                    ax.plot(*zip(*pts, strict=True), ":", **style)
    xe, xd = _positions(widest, max_enc)
    names = [s["stage"] for s in widest["stages"]]
    axes[0].set_xticks(xe, names[: len(xe)])
    axes[1].set_xticks(xd, names[len(xe) :])
    axes[0].set_title("encoder (e_1 finest … e_S bottleneck)")
    axes[1].set_title("decoder (d_1 coarsest … F_final)")
    axes[0].set_ylabel(ylabel)
    if key == "effective_rank":
        axes[0].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap_name(name: str, width: int = 22) -> str:
    """``name`` on lines of about ``width`` characters, broken after ``/`` or ``_`` (model names have no spaces)."""
    parts = re.findall(r"[^/_]*(?:/|_+|$)", name)
    lines, line = [], ""
    for part in filter(None, parts):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join([*lines, line] if line else lines)


#: Grad-CAM grid: inches per map, font sizes in points (readable at the width a report shows the PNG)
_CAM_CELL, _CAM_LABEL_WIDTH, _CAM_FONT, _CAM_TITLE_FONT = 1.9, 2.2, 11, 12


def _gradcam_figure(results: dict, displays: dict[str, dict], path: Path, plt) -> None:
    models = [m for m in results["models"] if m["name"] in displays]
    n_cols = 1 + max(len(m["stages"]) for m in models)
    fig, axes = plt.subplots(
        len(models),
        n_cols,
        figsize=(_CAM_LABEL_WIDTH + _CAM_CELL * n_cols, (_CAM_CELL + 0.35) * len(models) + 0.9),
        squeeze=False,
    )
    for row, model in enumerate(models):
        d = displays[model["name"]]
        image = d["image"]
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
        ax = axes[row, 0]
        ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
        if d["region"].any():
            ax.contour(d["region"].astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_ylabel(_wrap_name(model["name"]), fontsize=_CAM_FONT, rotation=0, ha="right", va="center")
        ax.set_title("input + region", fontsize=_CAM_FONT)
        for col in range(1, n_cols):
            ax = axes[row, col]
            if col - 1 < len(d["maps"]):
                cam = d["maps"][col - 1]
                peak = float(cam.max())
                ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
                ax.imshow(cam / peak if peak > 0 else cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
                ax.set_title(model["stages"][col - 1]["stage"], fontsize=_CAM_FONT)
            else:
                ax.set_visible(False)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    cam = results["setup"]["gradcam"]
    where = "central slice, " if results["setup"]["spatial_dims"] == 3 else ""
    fig.suptitle(
        f"Grad-CAM toward '{cam['class']}' on case {cam['case']} ({where}each map scaled to its maximum)",
        fontsize=_CAM_TITLE_FONT,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_figures(results: dict, displays: dict[str, dict], folder: Path) -> list[str]:
    """One line plot per metric over the stages (models side by side) and the Grad-CAM grid."""
    plt = pyplot()
    written = []
    for key, title, ylabel, name in METRICS:
        _metric_figure(results, key, title, ylabel, folder / name, plt)
        written.append(name)
    if displays:
        _gradcam_figure(results, displays, folder / GRADCAM_FIGURE, plt)
        written.append(GRADCAM_FIGURE)
    return written


# --------------------------------------------------------------------------- report.md


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _f(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "—"


def _stage_rows(results: dict, cell) -> list[list[str]]:
    """One row per stage name (union over models, encoder first), one cell per model."""
    models = results["models"]
    widest = max(models, key=lambda m: len(m["stages"]))
    names = [s["stage"] for s in widest["stages"]]
    rows = []
    for name in names:
        row = [f"`{name}`" + (" (F_final)" if name == names[-1] else "")]
        for m in models:
            stage = next((s for s in m["stages"] if s["stage"] == name), None)
            row.append(cell(stage) if stage is not None else "—")
        rows.append(row)
    return rows


def _setup_section(r: dict) -> list[str]:
    s = r["setup"]
    lines = ["## Setup", ""]
    lines += [
        f"- dataset `{s['dataset']}`, configuration `{s['configuration']}`, fold `{s['fold']}`, "
        f"checkpoint `{s['checkpoint']}`, device `{s['device']}`",
        f"- {len(s['cases'])} case(s) from `{s['cases_folder']}`: {', '.join(f'`{c}`' for c in s['cases'])}",
        f"- input: nnU-Net's preprocessing of each raw case (the configuration's own preprocessor), then {s['crop']}",
        f"- CKA: {s['cka']}",
        f"- SCR: {s['scr']}",
        f"- redundancy: {s['redundancy']}",
    ]
    if s["gradcam"]:
        g = s["gradcam"]
        lines.append(
            f"- Grad-CAM: case `{g['case']}`, class `{g['class']}` (output channel {g['channel']}); score = mean "
            "class logit over the class's predicted region (whole patch where a model predicts none)"
        )
    lines += ["", "| model | trainer | plans | patch | stages (S) | channels per encoder stage | folder |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        ch = [st["channels"] for st in m["stages"][: m["n_encoder_stages"]]]
        lines.append(
            f"| {m['name']} | `{m['trainer']}` | `{m['plans']}` | {'×'.join(map(str, m['patch_size']))} | "
            f"{m['n_encoder_stages']} | {', '.join(map(str, ch))} | `{m['folder']}` |"
        )
    return [*lines, ""]


def _metric_block(r: dict, key: str, caption: str, cell) -> list[str]:
    """A metric's caption, its figure (the file ``METRICS`` names for ``key``) and its stage-by-model table."""
    title, figure = next((title, name) for k, title, _, name in METRICS if k == key)
    names = [m["name"] for m in r["models"]]
    return [caption, "", f"![{title}]({figure})", "", *markdown_table(["stage", *names], _stage_rows(r, cell))]


def _correlation_cell(s: dict) -> str:
    constant = f" ({s['constant_channels']} constant)" if s["constant_channels"] else ""
    return _f(s["mean_abs_correlation"]) + constant


def _metric_sections(r: dict) -> list[str]:
    return [
        "## Semantic consistency with F_final",
        "",
        *_metric_block(
            r,
            "cka",
            "Linear CKA between each stage and `F_final` (in parentheses: the same with `F_final`'s positions "
            "shuffled within each case, the value that no spatial correspondence gives). Higher: the stage's "
            "features are closer to a linear re-encoding of the final features.",
            lambda s: f"{_f(s['cka'])} ({_f(s['cka_shuffled'])}) n={s['cka_samples']}",
        ),
        *_metric_block(
            r,
            "scr",
            "SCR distance to `F_final` (the regulariser's own value: MSE between random channel pairs after "
            "pooling, averaged over draws and cases; `F_final` is the teacher and has none). Lower: closer.",
            lambda s: _f(s["scr"], 4),
        ),
        "## Channel redundancy",
        "",
        *_metric_block(
            r,
            "mean_abs_correlation",
            "Mean absolute Pearson correlation between distinct channels (lower: less redundant).",
            _correlation_cell,
        ),
        *_metric_block(
            r,
            "effective_rank",
            "Effective rank of the channel covariance / number of channels (higher: more directions used).",
            lambda s: f"{_f(s['effective_rank'], 1)} / {s['channels']} ({_f(s['effective_rank_ratio'])})",
        ),
    ]


def _gradcam_section(r: dict) -> list[str]:
    if not r["setup"]["gradcam"]:
        return []
    names = [m["name"] for m in r["models"]]
    out = ["## Grad-CAM", "", f"![Grad-CAM]({GRADCAM_FIGURE})", ""]
    out.append("Share of each stage's map inside the class's predicted region (— : no region predicted):")
    out.append("")

    def cell(stage: dict) -> str:
        return _f(stage.get("cam_fraction_in_region"))

    out += markdown_table(["stage", *names], _stage_rows(r, cell))
    for m in r["models"]:
        g = m["gradcam"]
        out.append(
            f"- {m['name']}: the class covers {100 * g['region_fraction']:.1f} % of the patch"
            + ("" if g["region_found"] else " (not predicted: the score is the mean over the whole patch)")
        )
    return [*out, ""]


HOW_TO_READ = """## How to read this

- **CKA** (0 to 1) asks whether a stage carries the same information as the final decoder features
  `F_final`, up to a rotation and a scale of the channels, position by position (both pooled to the
  smaller of the two sizes). SelfReg-UNet's premise is that encoder stages of a U-Net drift away from the
  final semantics; a model whose encoder stages have higher CKA is more consistent with `F_final`. Compare
  models **at the same stage**: stages differ in resolution and channel count, and with few samples (`n`,
  positions × cases) for many channels linear CKA is above 0 even for unrelated features; the value in
  parentheses (`F_final`'s positions shuffled) is that floor.
- **SCR** is the semantic consistency loss SelfReg minimises (MSE between random channel pairs of the
  stage and `F_final`, averaged over 16 draws per case). It depends on the scale of the features, so
  compare models at one stage, not stages with each other; a SelfReg model was trained to lower it.
- **mean |correlation|** (0 to 1): how much channels duplicate each other. **Effective rank** (1 to the
  number of channels): how many independent directions the channels span. SelfReg's feature
  distillation aims at less redundancy: lower correlation, higher effective rank.
- **Grad-CAM**: where each stage's features raise the class score; bright areas matter. Early encoder
  stages are often diffuse; stages consistent with `F_final` highlight the objects.
- A few cases of one fold are a small sample: differences between models of a few hundredths are not
  evidence. Numbers describe these networks on these cases, not the methods in general.
"""


def render_markdown(r: dict) -> str:
    lines = [f"# What the stages represent: {', '.join(m['name'] for m in r['models'])}", ""]
    lines += [f"Written by `{r['tool']}` {r['version']} on {r['created']}.", "", "```bash", r["command"], "```", ""]
    if r["notes"]:
        lines += ["**Notes**", "", *[f"- {n}" for n in r["notes"]], ""]
    lines += _setup_section(r)
    lines += _metric_sections(r)
    lines += _gradcam_section(r)
    lines += [HOW_TO_READ]
    return "\n".join(lines)
