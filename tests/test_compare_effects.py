"""``compare``'s effect sizes, corrected p-values, equivalence, A/A differences and rank stability,
on the hand-made result folders of ``tests/test_compare.py`` (numbers worked out by hand there)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.evaluation.effects import adjust_pvalues
from tests.test_compare import (
    DIFFS,
    FOLDS,
    A,
    B,
    compare,
    error_of,
    model_numbers,
    write_summary,
)
from tests.test_compare import results_env as results_env  # noqa: F401  (the fixture)

REP = "nnUNetTrainer_Rep2"
AA_SHIFT = [0.01, -0.02, 0.0, 0.03, -0.01, 0.02]  # the repeated baseline's label-1 Dice minus the baseline's


def add_repeat(res: Path) -> None:
    """A second run of the baseline: A's predictions, label-1 Dice shifted by ``AA_SHIFT``."""
    src, dst = res / f"{A}__nnUNetPlans__2d", res / f"{REP}__nnUNetPlans__2d"
    shutil.copytree(src, dst)
    numbers = model_numbers("A")
    cases = list(numbers)
    for i, case in enumerate(cases):
        dice, n_ref, n_pred = numbers[case]["1"]
        numbers[case]["1"] = (dice + AA_SHIFT[i], n_ref, n_pred)
    gt = res.parent.parent / "nnUNet_preprocessed" / res.name / "gt_segmentations"
    for f, fold_cases in FOLDS.items():
        write_summary(dst / f"fold_{f}" / "validation", gt, {c: numbers[c] for c in fold_cases})


def test_effect_sizes_correction_and_equivalence(results_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert compare("-o", str(out), "--margin", "0.5", trainers=(A, B)) == 0
    r = json.loads((out / "results.json").read_text())
    d = r["differences"]
    dice = d["pooled"][B]["Dice"]
    # per-case foreground Dice differences are DIFFS: |d| ranks 2 3 5 1 6 4, T- = 1, T+ = 20
    assert dice["rank_biserial"] == pytest.approx(19 / 21)
    assert (dice["better"], dice["ties"], dice["worse"]) == (5, 0, 1)
    walsh = [(x + y) / 2 for i, x in enumerate(DIFFS) for y in DIFFS[i:]]
    assert dice["hl_estimate"] == pytest.approx(float(np.median(walsh)))
    assert (dice["hl_ci_low"], dice["hl_ci_high"]) == pytest.approx((min(walsh), max(walsh)))  # n = 6: no cut
    # every p of the family (arms x metrics, pooled; one run per arm: the case-level tests) is Holm-corrected together
    family = [(m, metric) for m, per in d["pooled"].items() for metric in per]
    assert d["correction"]["method"] == "holm" and d["correction"]["family_size"] == len(family) == 2
    expected = adjust_pvalues([d["pooled"][m][metric]["p_value"] for m, metric in family], "holm")
    assert [d["pooled"][m][metric]["p_adjusted"] for m, metric in family] == pytest.approx(expected, nan_ok=True)
    assert dice["p_adjusted"] >= dice["p_value"]
    # TOST at ±0.5: all 6 differences inside -> each one-sided exact p = 1/64
    eq = dice["equivalence"]
    assert eq["p_lower"] == pytest.approx(1 / 64) and eq["p_upper"] == pytest.approx(1 / 64) and eq["equivalent"]
    assert "equivalence" not in d["pooled"][B]["IoU"]
    # one run per arm: no verdict about the method, whatever the p-values
    assert d["verdicts"][B]["Dice"]["kind"] == "one run" and d["run_level"] == {}
    # rank stability over the 6 cases
    st = r["rank_stability"]
    assert st["arms"] == [A, B] and st["full_ranks"][B] == 1
    assert all(sum(c) == st["n_boot"] for c in st["rank_counts"].values())
    report = (out / "report.md").read_text()
    for text in ("p (holm)", "Equivalence within ±0.5 Dice", "equivalent", "rank 2"):
        assert text in report, text
    assert (out / "rank_stability.png").read_bytes().startswith(b"\x89PNG")


def test_a_repeat_joins_its_arm_and_stays_out_of_the_method_family(results_env: Path, tmp_path: Path) -> None:
    """``nnUNetTrainer_Rep2`` is a second run of the baseline arm: its difference to the first run is shown with
    its interval (never a bare floor) and is not corrected with the method comparisons; B, trained once, gets
    the case-level fallback that the report states."""
    add_repeat(results_env)
    out = tmp_path / "cmp"
    assert compare("-o", str(out), trainers=(A, B, REP)) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["arms"] == [{"name": A, "runs": [A, REP]}, {"name": B, "runs": [B]}]
    d = r["differences"]
    # A/A: the repeat differs from the baseline by AA_SHIFT on label 1 (label 2 unchanged -> halved,
    # except case_0 where label 2 is absent)
    aa = np.array([AA_SHIFT[0]] + [s / 2 for s in AA_SHIFT[1:]])
    (aa_dice,) = [x for x in d["aa"] if x["metric"] == "Dice"]
    assert (aa_dice["arm"], aa_dice["run"], aa_dice["reference_run"]) == (A, REP, A)
    assert aa_dice["mean_difference"] == pytest.approx(aa.mean())
    assert aa_dice["ci_low"] <= aa.mean() <= aa_dice["ci_high"] and aa_dice["p_value"] is not None
    # the method family holds B x (Dice, IoU) only; B is compared with the arm's per-case mean of both runs
    assert d["correction"]["family_size"] == 2 and "A/A comparisons are not part of it" in d["correction"]["family"]
    dice = d["pooled"][B]["Dice"]
    assert dice["mean_difference"] == pytest.approx(np.mean(np.array(DIFFS) - aa / 2))
    assert dice["p_adjusted"] == pytest.approx(
        adjust_pvalues([d["pooled"][B][m]["p_value"] for m in ("Dice", "IoU")], "holm")[0]
    )
    assert d["verdicts"][B]["Dice"]["kind"] == "one run" and d["run_level"] == {}
    assert r["rank_stability"]["arms"] == [A, B]
    report = (out / "report.md").read_text()
    for text in ("Not every arm was trained twice", "Run-to-run (A/A) differences", f"`{REP}`"):
        assert text in report, text
    assert "floor" not in report
    assert report.index("cannot support a claim about a method") < report.index("Wilcoxon p")


def test_narrow_margin_is_not_shown_and_a_single_run_is_flagged(results_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert compare("-o", str(out), "--margin", "0.1", "--correction", "bh") == 0
    r = json.loads((out / "results.json").read_text())
    dice = r["differences"]["pooled"][B]["Dice"]
    assert not dice["equivalence"]["equivalent"]
    assert r["differences"]["correction"]["method"] == "bh"
    assert r["differences"]["aa"] == []
    assert "Not measured: every arm was trained once" in (out / "report.md").read_text()
    assert not math.isnan(dice["p_adjusted"])


@pytest.mark.parametrize("margin", ["0", "-0.1", "nan", "1.5"])
def test_bad_margin_is_refused_with_the_fix(results_env: Path, capsys: pytest.CaptureFixture, margin: str) -> None:
    assert "--margin must be a Dice difference between 0 and 1" in error_of(capsys, "--margin", margin)


def test_models_by_identifier_and_by_absolute_folder(results_env: Path, tmp_path: Path) -> None:
    """Other configurations / plans / folders elsewhere: ``TRAINER__PLANS__CONFIG`` and absolute paths."""
    other_config = f"{B}__nnUNetPlans__3d_fullres"
    shutil.copytree(results_env / f"{B}__nnUNetPlans__2d", results_env / other_config)
    elsewhere = tmp_path / "elsewhere" / f"{REP}__nnUNetPlans__2d"
    shutil.copytree(results_env / f"{A}__nnUNetPlans__2d", elsewhere)
    out = tmp_path / "cmp"
    assert compare("-o", str(out), trainers=(A, other_config, str(elsewhere))) == 0
    r = json.loads((out / "results.json").read_text())
    models = {m["name"]: m for m in r["setup"]["models"]}
    assert models[other_config]["configuration"] == "3d_fullres" and models[other_config]["trainer"] == B
    assert models[str(elsewhere)]["folder"] == str(elsewhere)
    assert r["differences"]["pooled"][other_config]["Dice"]["mean_difference"] == pytest.approx(0.2)
    assert any("3d_fullres" in n for n in r["notes"])
