"""The README's first command, in a reduced form: real DSB2018 data -> nnU-Net -> two trainers -> report.

The demo may fall back to synthetic data only when the stardist wheel cannot be downloaded: a fallback
while pip can fetch that wheel fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_selfreg.data import dsb2018
from tests.harness import BIN

CLI = str(BIN / "nnunet-selfreg")


def _demo(workdir: Path, *extra: str, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(NNUNET_SELFREG_CACHE=str(cache), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        [CLI, "demo", "--workdir", str(workdir), *extra], env=env, capture_output=True, text=True, timeout=1200
    )


def wheel_downloadable(tmp_path: Path) -> tuple[bool, str]:
    """Whether pip can fetch the stardist 0.9.2 wheel (cp311, manylinux_2_28_x86_64) now, and pip's output."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "stardist==0.9.2",
           "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
           "-d", str(tmp_path / "probe"), "--timeout", "15", "--retries", "1"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "pip download timed out"
    got = list((tmp_path / "probe").glob("stardist-0.9.2-*.whl"))
    return proc.returncode == 0 and bool(got), (proc.stdout + proc.stderr)[-1500:]


def check_demo_results(r: dict, folds: list[int]) -> None:
    """results.json of the demo's compare report: what was compared, on which cases, numbers in range."""
    setup = r["setup"]
    runs = ["nnUNetTrainer_Budget", "nnUNetTrainer_Budget_Rep2", "nnUNetTrainerSelfReg_Budget",
            "nnUNetTrainerSelfReg_Budget_Rep2"]  # fmt: skip
    assert [m["name"] for m in setup["models"]] == runs  # two runs of every arm: the demo's default
    assert [m["arm"] for m in setup["models"]] == [runs[0], runs[0], runs[2], runs[2]]
    assert {m["layout"] for m in setup["models"]} == {"folds"} and setup["baseline"] == "nnUNetTrainer_Budget"
    assert setup["configuration"] == "2d" and setup["folds"] == folds
    assert setup["n_cases"] == 5 * len(folds) and setup["n_cases_per_fold"] == {str(f): 5 for f in folds}  # 25 tiles
    assert {"Dice", "IoU", "HD95", "NSD"} <= set(setup["metrics"]) and setup["surface"]["computed"] is True
    assert r["labels"] == {"1": "nucleus_interior", "2": "nucleus_boundary"}
    assert len(r["cases"]) == setup["n_cases"] and sorted({c["fold"] for c in r["cases"]}) == folds
    assert len({c["case"] for c in r["cases"]}) == setup["n_cases"]
    for name in runs:
        for metric in (m for m in setup["metrics"] if m != "HD95"):  # Dice, IoU, NSD and instance metrics: 0..1
            for key, value in r["aggregates"]["pooled"][name][metric].items():
                assert value is None or 0.0 <= value <= 1.0, (name, metric, key, value)
        assert r["aggregates"]["pooled"][name]["Dice"]["foreground_mean"] is not None
        hd95 = r["aggregates"]["pooled"][name]["HD95"]["foreground_mean"]
        assert hd95 is None or hd95 >= 0.0
    d = r["differences"]["pooled"]["nnUNetTrainerSelfReg_Budget"]["Dice"]
    assert d["n_pairs"] + d["n_excluded"] == setup["n_cases"]
    assert -1.0 <= d["mean_difference"] <= 1.0
    if d["ci_method"] != "none":
        assert d["ci_low"] <= d["mean_difference"] <= d["ci_high"]
    assert d["p_value"] is None or 0.0 < d["p_value"] <= 1.0
    assert sorted(x["arm"] for x in r["ranking"]) == ["nnUNetTrainerSelfReg_Budget", "nnUNetTrainer_Budget"]
    # runs as replicates: a run-level result and a verdict in plain words for the method comparison
    run = r["differences"]["run_level"]["nnUNetTrainerSelfReg_Budget"]["Dice"]
    assert len(run["run_means_baseline"]) == len(run["run_means_other"]) == 2 and run["detectable_difference"] > 0
    verdict = r["differences"]["verdicts"]["nnUNetTrainerSelfReg_Budget"]["Dice"]
    assert verdict["kind"] in ("difference", "equivalent", "not resolvable") and verdict["text"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return Path(os.environ.get("NNUNET_SELFREG_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.mark.cli_e2e  # the README's main job, reduced: 431 s in a full run at load 4-7 (2026-12-03)
def test_demo_reduced_budget_end_to_end(tmp_path, cache):
    work = tmp_path / "demo"
    proc = _demo(work, "--folds", "0", "1", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", cache=cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "writing to nnU-Net folders under" in out.split("building")[0]  # said before anything is written
    assert "nnUNetTrainerSelfReg_Budget_Rep2 fold 1" in out and "SelfReg epoch means" in out
    assert "verdict:" in out and "run-aware" in out
    report = work / "report"
    results = json.loads((report / "results.json").read_text())
    dataset = results["setup"]["dataset"]
    if dataset.endswith(dsb2018.FALLBACK_NAME):
        reachable, pip_log = wheel_downloadable(tmp_path)
        assert not reachable, (
            f"the demo fell back to synthetic data ({dataset}) although pip can download the stardist wheel:\n"
            f"{out[-3000:]}"
        )
        assert "WARNING: the package registry could not be reached; the demo runs on SYNTHETIC data" in out
        pytest.skip(f"no package registry: the demo ran on its synthetic fallback ({pip_log[-300:]})")
    assert dataset == "Dataset950_DSB2018Nuclei"
    assert dsb2018.STARDIST_WHEEL_SHA256 in (work / "nnUNet_raw" / dataset / "PROVENANCE.md").read_text()
    check_demo_results(results, [0, 1])
    assert len(list(report.glob("*.png"))) >= 3
    text = (report / "report.md").read_text()
    assert "nnUNetTrainer_Budget" in text and "nnUNetTrainerSelfReg_Budget" in text and "Wilcoxon" in text

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
    out = subprocess.run([CLI, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("COMMAND", 2)[-1]  # the sub-command list, after the usage line
    for tool in ("demo", "compare", "doctor", "export-stock", "add-unlabeled", "analyze"):
        assert re.search(rf"\n    {tool}\s", listed), (tool, out.stdout)  # a long name wraps its help
