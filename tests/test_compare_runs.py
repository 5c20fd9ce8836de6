"""``compare`` with training runs as replicates, on the hand-made result folders of ``tests/test_compare.py``:
arms of several runs, the run-level numbers worked out by hand, verdicts, and the input it refuses.

Runs are copies of A or B whose label-1 Dice is shifted case by case (label 2 unchanged), so each case's
foreground Dice moves by half the shift (by the whole shift in case_0, where label 2 is absent).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nnunet_selfreg.evaluation.effects import adjust_pvalues
from nnunet_selfreg.evaluation.replicates import detectable_difference
from nnunet_selfreg.tools.main import main
from tests.test_compare import (
    CASES,
    DATASET,
    FOLDS,
    A,
    B,
    build_results_env,
    compare,
    error_of,
    model_numbers,
    write_summary,
)
from tests.test_compare import results_env as results_env  # noqa: F401  (the fixture)

A2, B2 = f"{A}_Rep2", f"{B}_Budget_Rep2"  # both ways of naming a repeat: X_Rep2 and X_Budget_Rep2
A3, A4 = f"{A}_Rep3", f"{A}_Rep4"
SHIFTS = {A2: [0.02, -0.01, 0.0, 0.01, 0.02, -0.02], B2: [-0.01, 0.01, 0.02, -0.02, 0.0, 0.01],
          A3: [0.01, 0.0, -0.01, 0.02, 0.0, 0.01], A4: [-0.02, 0.01, 0.0, 0.0, 0.01, -0.01]}  # fmt: skip


def add_run(res: Path, source: str, name: str) -> None:
    """A run ``name``: ``source``'s folder, label-1 Dice shifted by ``SHIFTS[name]``."""
    key = "A" if source == A else "B"
    shutil.copytree(res / f"{source}__nnUNetPlans__2d", res / f"{name}__nnUNetPlans__2d")
    numbers = model_numbers(key)
    for i, case in enumerate(CASES):
        dice, n_ref, n_pred = numbers[case]["1"]
        numbers[case]["1"] = (dice + SHIFTS[name][i], n_ref, n_pred)
    gt = res.parent.parent / "nnUNet_preprocessed" / res.name / "gt_segmentations"
    for f, cases in FOLDS.items():
        write_summary(res / f"{name}__nnUNetPlans__2d" / f"fold_{f}" / "validation", gt, {c: numbers[c] for c in cases})


def foreground(key: str, shift: list[float] | None = None) -> np.ndarray:
    """Per-case foreground Dice of A or B, with a label-1 shift."""
    numbers = model_numbers(key)
    shift = shift or [0.0] * len(CASES)
    return np.array([np.nanmean([numbers[c]["1"][0] + shift[i], numbers[c]["2"][0]]) for i, c in enumerate(CASES)])


def t_test_by_hand(base: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """Student's two-sample t from the textbook formula: t, pooled SD, two-sided p."""
    ka, kb = len(base), len(other)
    sp = math.sqrt(((ka - 1) * base.var(ddof=1) + (kb - 1) * other.var(ddof=1)) / (ka + kb - 2))
    t = (other.mean() - base.mean()) / (sp * math.sqrt(1 / ka + 1 / kb))
    return t, sp, 2 * stats.t.sf(abs(t), ka + kb - 2)


@pytest.fixture()
def runs_env(results_env: Path) -> Path:  # noqa: F811
    for name, source in ((A2, A), (B2, B), (A3, A), (A4, A)):
        add_run(results_env, source, name)
    return results_env


def test_two_runs_per_arm_by_hand(runs_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert compare("-o", str(out), "--margin", "0.5", trainers=(A, B, A2, B2)) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["arms"] == [{"name": A, "runs": [A, A2]}, {"name": B, "runs": [B]}, {"name": f"{B}_Budget", "runs": [B2]}]
    # X_Budget_Rep2 repeats X_Budget, not X: B2 is an arm of its own here; group it explicitly instead
    assert compare("-o", str(out), "--margin", "0.5", "--overwrite", trainers=(A, A2, f"SelfReg={B},{B2}")) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["arms"] == [{"name": A, "runs": [A, A2]}, {"name": "SelfReg", "runs": [B, B2]}]
    run = r["differences"]["run_level"]["SelfReg"]["Dice"]
    base = np.array([foreground("A").mean(), foreground("A", SHIFTS[A2]).mean()])
    other = np.array([foreground("B").mean(), foreground("B", SHIFTS[B2]).mean()])
    assert run["run_means_baseline"] == pytest.approx(base) and run["run_means_other"] == pytest.approx(other)
    t, sp, p = t_test_by_hand(base, other)
    assert run["difference"] == pytest.approx(other.mean() - base.mean())
    assert (run["t_statistic"], run["df"], run["p_value"]) == pytest.approx((t, 2, p))
    assert run["sd_baseline"] == pytest.approx(base.std(ddof=1)) and run["sd_pooled"] == pytest.approx(sp)
    assert run["detectable_difference"] == pytest.approx(detectable_difference(sp, 2, 2))
    assert run["ci_low"] < run["difference"] < run["ci_high"] and run["n_cases"] == 6
    # Holm over the family of run-level tests (SelfReg x Dice, IoU); the case-level p is no longer corrected
    corr = r["differences"]["correction"]
    assert corr["family_size"] == 2 and "p_adjusted" not in r["differences"]["pooled"]["SelfReg"]["Dice"]
    iou_p = r["differences"]["run_level"]["SelfReg"]["IoU"]["p_value"]
    assert run["p_adjusted"] == pytest.approx(adjust_pvalues([p, iou_p], "holm")[0])
    verdict = r["differences"]["verdicts"]["SelfReg"]["Dice"]
    assert verdict["kind"] == ("difference" if run["p_adjusted"] < 0.05 else "not resolvable")
    # run-level equivalence at ±0.5 Dice: two one-sided t-tests on the run means, by hand
    se = sp * math.sqrt(1 / 2 + 1 / 2)
    diff = other.mean() - base.mean()
    eq = run["equivalence"]
    assert eq["p_lower"] == pytest.approx(stats.t.sf((diff + 0.5) / se, 2))
    assert eq["p_upper"] == pytest.approx(stats.t.cdf((diff - 0.5) / se, 2))
    # A/A inside each arm, with intervals; not in the family
    aa = {(x["arm"], x["metric"]): x for x in r["differences"]["aa"]}
    assert aa[(A, "Dice")]["mean_difference"] == pytest.approx((foreground("A", SHIFTS[A2]) - foreground("A")).mean())
    assert aa[("SelfReg", "Dice")]["run"] == B2 and aa[("SelfReg", "Dice")]["ci_low"] is not None
    report = (out / "report.md").read_text()
    for text in ("Training runs as replicates", "## Run level", "detectable", "Per-run mean foreground Dice"):
        assert text in report, text
    assert "no claim about a method" not in report
    assert (out / "runs.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "run-level p =" in printed and "verdict:" in printed and "detects >=" in printed


def test_a_small_difference_is_not_resolvable_and_says_what_the_design_detects(runs_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert compare("-o", str(out), trainers=(A, A2, f"again={A3},{A4}")) == 0
    r = json.loads((out / "results.json").read_text())
    run = r["differences"]["run_level"]["again"]["Dice"]
    verdict = r["differences"]["verdicts"]["again"]["Dice"]
    assert run["p_value"] > 0.05 and verdict["kind"] == "not resolvable"
    assert f"detects only differences >= {run['detectable_difference']:.4f}" in verdict["text"]
    assert "2 + 2 runs, 6 cases" in verdict["text"]
    assert "not resolvable here" in (out / "report.md").read_text().split("## Setup")[0]


def test_training_lengths_from_debug_json(runs_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def length(run: str, fold: int, epochs: int) -> None:
        path = runs_env / f"{run}__nnUNetPlans__2d" / f"fold_{fold}" / "debug.json"
        path.write_text(json.dumps({"num_epochs": str(epochs), "num_iterations_per_epoch": "40", "other": "x"}))

    for run in (A, A2, B, B2):
        for fold in FOLDS:
            length(run, fold, 10)
    arms = (A, A2, f"SelfReg={B},{B2}")
    assert compare("-o", str(tmp_path / "ok"), trainers=arms) == 0
    length(B, 1, 20)  # one fold of a run trained longer
    err = error_of(capsys, trainers=arms)
    assert f"{B} holds folds trained for different lengths" in err and "fold 1: 20 epochs x 40" in err
    length(B, 0, 20)  # a whole run of an arm trained longer
    err = error_of(capsys, trainers=arms)
    assert "the runs of arm SelfReg were trained for different lengths" in err and f"{B}: 20 epochs" in err
    length(B2, 0, 20)
    length(B2, 1, 20)  # one arm trained longer than the other
    err = error_of(capsys, trainers=arms)
    assert "the arms were trained for different lengths" in err and "--allow-unequal-training" in err
    out = tmp_path / "allowed"
    assert compare("-o", str(out), "--allow-unequal-training", trainers=arms) == 0
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert any("trained for different lengths" in n for n in notes)
    assert "--allow-unequal-training" in json.loads((out / "results.json").read_text())["command"]


def test_runs_of_one_arm_with_other_splits_are_refused(runs_env: Path, capsys: pytest.CaptureFixture) -> None:
    path = runs_env / f"{A2}__nnUNetPlans__2d" / "fold_0" / "validation" / "summary.json"
    summary = json.loads(path.read_text())
    for row in summary["metric_per_case"]:
        row["prediction_file"] = row["prediction_file"].replace("case_2", "case_9")
    path.write_text(json.dumps(summary))
    err = error_of(capsys, trainers=(A, A2, B))
    assert "different splits" in err and f"fold 0: {A2} has case_9 which {A} lacks and lacks case_2" in err


@pytest.mark.parametrize(
    ("trainers", "message"),
    [
        ((A, A2), "is one arm: nnUNetTrainer"),
        ((A, f"x={B}", f"x={B2}"), "arm 'x' is given twice"),
        ((A, f"x={B},{A}"), f"'{A}' is given twice in -tr"),
        ((A, "x=,"), "an arm is NAME=RUN,RUN"),
    ],
)
def test_bad_arms(results_env: Path, capsys: pytest.CaptureFixture, trainers, message: str) -> None:  # noqa: F811
    assert message in error_of(capsys, trainers=trainers)


def test_missing_folds_error_is_short_and_suggests_the_folds_present(
    results_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["compare", "-d", "42", "-c", "2d", "-tr", A, B, "--no-surface"]) == 2  # default folds 0-4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and len(err) < 400, err
    assert f"{A} lacks folds 2, 3, 4" in err and "FOLD -tr nnUNetTrainer" in err
    assert "folds every model has: 0, 1 (compare them with -f 0 1)" in err


def test_missing_prediction_advice_follows_the_options(results_env: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    (results_env / f"{B}__nnUNetPlans__2d" / "fold_1" / "validation" / "case_4.nii.gz").unlink()
    err = error_of(capsys, "--instances", "1")  # with --no-surface
    assert "prediction of case case_4 is missing" in err and "drop --instances" in err
    assert "--no-surface" not in err
    err = error_of(capsys, surface=True)
    assert "add --no-surface" in err and "--instances" not in err


def test_matched_only_sq_beside_the_mean(results_env: Path, tmp_path: Path) -> None:  # noqa: F811
    """C predicts a label-2 object where the reference has none (case_0): no match there, SQ = 0."""
    out = tmp_path / "cmp"
    assert compare("-o", str(out), "--instances", "2", trainers=(A, B, "ensembles/ensemble___toy")) == 0
    r = json.loads((out / "results.json").read_text())
    sq = r["aggregates"]["sq_matched_only"]
    values = [c["values"]["ensembles/ensemble___toy"]["SQ"]["2"] for c in r["cases"]]
    assert values[0] == 0 and sq["ensembles/ensemble___toy"]["n_cases"] == 5
    assert sq["ensembles/ensemble___toy"]["mean"] == pytest.approx(np.mean(values[1:]))
    assert "SQ (matched cases only)" in (out / "report.md").read_text()


def test_hd95_in_pixels_for_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net reads PNG with spacing 1 (NaturalImage2DIO): A's square, 3 columns off, is 3 px away."""
    build_results_env(tmp_path, monkeypatch, ".png")
    out = tmp_path / "cmp"
    assert compare("-o", str(out), surface=True) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["setup"]["spatial_unit"] == "px" and r["setup"]["surface"]["reader"] == "NaturalImage2DIO"
    assert r["aggregates"]["pooled"][A]["HD95"]["1"] == pytest.approx(3.0)
    report = (out / "report.md").read_text()
    assert "HD95 (px)" in report and "tolerance 1.0 px" in report and "(mm)" not in report
    assert r["setup"]["dataset"] == DATASET
