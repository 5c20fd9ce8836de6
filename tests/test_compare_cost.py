"""benchmarks/compare_cost.py in its tiny mode: nnU-Net-style trees, the real command, the cached reruns.

Marked ``cli_e2e`` (about a minute of CPU: six ``compare`` processes and nnU-Net's evaluation of the tree).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.cli_e2e
def test_tiny_benchmark_measures_and_the_added_model_is_all_that_is_computed(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("compare_cost", REPO / "benchmarks" / "compare_cost.py")
    compare_cost = sys.modules["compare_cost"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_cost)
    out = tmp_path / "cost.json"
    result = compare_cost.main(["--sections", "tiny", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text())["tiny"] == json.loads(json.dumps(result["tiny"]))
    tree = tmp_path / "work" / "trees" / "c3_v16x16x16_k2_m3"
    summary = json.loads(next(tree.rglob("fold_0/validation/summary.json")).read_text())
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)  # written by nnU-Net
    point = result["tiny"]["point"]["after"]
    assert point["cpu_s"] > 0 and point["peak_rss_mib"] > 0 and point["cache"]["used"] is False
    seq = result["tiny"]["incremental"]
    counts = {name: (r["cache"]["from_cache"], r["cache"]["computed"]) for name, r in seq.items()}
    assert counts == {"cold": (0, 9), "again": (9, 0), "without_last_model": (0, 6), "one_model_added": (6, 3)}
