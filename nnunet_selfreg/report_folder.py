"""What the report folders of ``compare`` and ``analyze`` share: strict ``results.json``, markdown tables,
matplotlib without a display, package versions (also for ``doctor`` and the sweep manifest), and the folder written
as a whole.

Each tool keeps what its report says (:mod:`nnunet_selfreg.evaluation.comparison_report`,
:mod:`nnunet_selfreg.analysis.analysis_report`); how a report folder is written is the same for both and lives here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from nnunet_selfreg import outputs


def _jsonable(obj: object) -> object:
    """NaN -> null, numpy scalars -> Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    return obj


def to_json(results: dict) -> str:
    """Strict JSON (undefined values are ``null``)."""
    return json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table, followed by an empty line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def package_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"not installed"``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (figures are files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report_folder(
    folder: Path,
    results: dict,
    make_figures: Callable[[Path], list[str]],
    render_markdown: Callable[[dict], str],
) -> list[Path]:
    """Figures (``make_figures(tmp)`` returns their names, stored in ``results["figures"]``), ``results.json``
    and ``report.md`` written into a temporary folder that then replaces ``folder`` as a whole."""

    def fill(tmp: Path) -> None:
        results["figures"] = make_figures(tmp)
        (tmp / "results.json").write_text(to_json(results))
        (tmp / "report.md").write_text(render_markdown(results))

    outputs.write_folder_atomically(folder, fill)
    return [folder / "report.md", folder / "results.json", *(folder / f for f in results["figures"])]
