"""The GPU check script's CPU dry run: every section runs, and summary.json has a finite row per method.

``benchmarks/device_check.sh`` does all GPU checks in one command on a GPU machine, which is not
always available. Its ``--dry-run`` runs the same sections on the CPU with tiny sizes (no AMP or
compile, one step per trainer, one epoch of two iterations), so that the script, step_cost.py's
``--variants all`` / ``--max-seconds`` paths, the training-log parsing (the hooks check) and the
summary stay working between GPU runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
#: the trainers `--variants all` times: the stock one and those registered with timed="default" or "all"
METHODS = {
    "nnUNetTrainer",
    "nnUNetTrainerSelfReg",
    "nnUNetTrainerSelfReg_SCROnly",
    "nnUNetTrainerSelfReg_IFDOnly",
    "nnUNetTrainerSSNet",
    "nnUNetTrainerM2SNet_RandomLossNet",  # M2SNet's cost without a weights file
    "nnUNetTrainerM2SNet_NoLossNet",
}
SECTIONS = ("install", "env", "dataset", "step_cost_3d_fullres", "step_cost_2d", "train", "predict")

pytestmark = pytest.mark.cli_e2e  # 63-78 s idle (docs/performance.md): run by .ci/run after the default run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("device_check")
    env = dict(os.environ, PYTHON=sys.executable, OMP_WAIT_POLICY="PASSIVE")
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], env=env, capture_output=True, text=True, timeout=1600
    )
    summary_file = out / "summary.json"
    assert summary_file.is_file(), f"no summary.json; output:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return proc, json.loads(summary_file.read_text())


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _progress_lines(stdout: str) -> str:
    """The script's section lines and step_cost's progress: where a slow or stuck section spent its time."""
    keep = ("=== [", "planning ", "building ", "[step ", "stopped by signal", "PROBLEM")
    return "\n".join(line for line in stdout.splitlines() if any(k in line for k in keep))


def test_dry_run_has_no_problems(dry_run):
    proc, summary = dry_run
    assert summary["mode"] == "dry-run"
    assert summary["ok"] and not summary["problems"], f"{summary['problems']}\n{_progress_lines(proc.stdout)}"
    assert proc.returncode == 0
    assert set(summary["sections"]) == set(SECTIONS)
    assert summary["sections"]["install"]["status"] == "skipped"  # the dry run uses this interpreter's packages
    for name in SECTIONS[1:]:
        assert summary["sections"][name]["status"] == "ok", (name, summary["sections"][name])


def test_step_cost_has_a_finite_row_per_method_in_both_configurations(dry_run):
    _, summary = dry_run
    for config in ("3d_fullres", "2d"):
        result = summary["step_cost"][config]
        assert result["amp"] is False and result["compile"] is False and result["rounds"] == 1
        rows = result["rows"]
        assert set(rows) == METHODS, config
        for method, row in rows.items():
            assert "error" not in row, (config, method, row)
            for key in ("median_step_s", "paired_ratio", "ratio_of_medians"):
                assert _finite_positive(row[key]), (config, method, key, row)
            assert row["steps"] == 1
        assert rows["nnUNetTrainer"]["paired_ratio"] == 1.0
        assert rows["nnUNetTrainerM2SNet_RandomLossNet"]["trainer"] == "nnUNetTrainerM2SNet_RandomLossNet"
        assert "nnUNetTrainerM2SNet" not in rows  # it needs the VGG-16 weights file: timed as _RandomLossNet


def test_training_log_shows_the_selfreg_terms_of_every_step_and_prediction_ran(dry_run):
    _, summary = dry_run
    train = summary["train"]
    assert train["hooks_fired"] and train["checkpoint_final"]
    assert train["compiled"] is False  # nnU-Net does not compile on the CPU
    (epoch,) = train["selfreg_epoch_means"]  # 1 epoch of 2 iterations in the dry run
    assert epoch["steps"] == 2 and epoch["warning"] is None
    assert {"scr", "ifd_enc", "ifd_dec", "weighted"} <= set(epoch["values"])
    assert all(math.isfinite(v) for v in epoch["values"].values())
    assert epoch["values"]["scr"] > 0 and epoch["values"]["weighted"] > 0
    assert len(train["epoch_times_s"]) == 1
    assert summary["predict"] == {"cases": 1, "predicted": 1, "seconds": summary["sections"]["predict"]["seconds"]}
