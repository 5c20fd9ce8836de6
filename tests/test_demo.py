"""The README's first command, in a reduced form: real DSB2018 data -> nnU-Net -> two trainers -> report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import BIN

CLI = str(BIN / "nnunet-selfreg")


def _demo(workdir: Path, *extra: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(NNUNET_SELFREG_CACHE=str(cache), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        [CLI, "demo", "--workdir", str(workdir), *extra], env=env, capture_output=True, text=True, timeout=1200
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return Path(os.environ.get("NNUNET_SELFREG_CACHE") or tmp_path_factory.mktemp("cache"))


def test_demo_reduced_budget_end_to_end(tmp_path, cache):
    work = tmp_path / "demo"
    proc = _demo(work, "--folds", "0", "1", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[4/4] nnUNetTrainerSelfReg_Budget fold 1" in out and "SelfReg epoch means" in out
    raw = next((work / "nnUNet_raw").glob("Dataset950_*"))
    source = "real" if raw.name.endswith("DSB2018Nuclei") else "synthetic fallback"
    report = work / "report"
    results = json.loads((report / "results.json").read_text())
    assert len(list(report.glob("*.png"))) >= 3
    text = (report / "report.md").read_text()
    assert "nnUNetTrainer_Budget" in text and "nnUNetTrainerSelfReg_Budget" in text and "Wilcoxon" in text
    assert json.dumps(results)  # strict JSON
    print(f"demo ran on {source} data")

    # a second run reuses the dataset and the trained folds, and never overwrites the first report
    again = _demo(work, "--folds", "0", "1", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", cache=cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the demo dataset" in again.stdout and "already trained with this budget" in again.stdout
    assert (work / "report_2" / "report.md").is_file() and (report / "report.md").read_text() == text

    # another budget on the same results is refused, not overwritten
    other = _demo(work, "--folds", "0", "--epochs", "2", "--iterations", "2", cache=cache)
    assert other.returncode == 2 and "never overwritten" in other.stderr


def test_demo_refuses_a_taken_dataset_id(tmp_path, cache):
    (tmp_path / "demo" / "nnUNet_raw" / "Dataset960_Mine").mkdir(parents=True)
    proc = _demo(tmp_path / "demo", "--dataset-id", "960", cache=cache)
    assert proc.returncode == 2
    assert "dataset id 960 is already taken" in proc.stderr and "--dataset-id 950" in proc.stderr


def test_demo_unwritable_workdir_is_a_clear_error(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _demo(blocker / "demo", cache=cache)
    assert proc.returncode == 2
    assert "cannot write to" in proc.stderr and "--workdir" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_refuses_fixed_budget_trainers(tmp_path, cache):
    proc = _demo(tmp_path / "d", "--trainers", "nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_5epochs", cache=cache)
    assert proc.returncode == 2 and "fixed budget" in proc.stderr


def test_cli_help_lists_every_tool():
    out = subprocess.run([sys.executable, "-m", "nnunet_selfreg.tools.main", "--help"], capture_output=True, text=True)
    for tool in ("demo", "compare", "doctor"):
        assert tool in out.stdout
