"""``nnunet-selfreg compare`` on hand-made nnU-Net result folders whose numbers are worked out by hand.

Layout built here (dataset 42, configuration 2d, folds 0 and 1 with three cases each):

* ``nnUNetTrainer`` (baseline, "A") and ``nnUNetTrainerSelfReg`` ("B"): ``fold_f/validation`` with a
  hand-written summary.json and predictions; B's foreground Dice is A's plus ``DIFFS`` in every case.
* ``ensembles/ensemble___toy`` ("C", a merged folder): B's numbers, except case_0 where C predicts
  label 2 although the reference has none (Dice 0, NSD 0, HD95 the image diagonal: 42.72 mm).

Images are 20 x 30 label maps with spacing 0.5 mm (x, columns) by 2 mm (y, rows). The reference has a
10 x 10 pixel square per label; A's label-1 square is shifted by 3 columns (1.5 mm), B's is exact.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import norm

from nnunet_selfreg.evaluation.stats import mean_ranks, nnunet_means, paired_difference
from nnunet_selfreg.tools.main import main

DATASET = "Dataset042_Toy"
SPACING_XY = (0.5, 2.0)
CASES = [f"case_{i}" for i in range(6)]
FOLDS = {0: CASES[:3], 1: CASES[3:]}
A = "nnUNetTrainer"
B = "nnUNetTrainerSelfReg"
C = "ensembles/ensemble___toy"
DIFFS = [0.1, 0.2, 0.3, -0.05, 0.4, 0.25]
DICE_A = {"1": [0.5, 0.6, 0.5, 0.5, 0.3, 0.6], "2": [math.nan, 0.7, 0.7, 0.6, 0.5, 0.6]}
PLANS = {
    "dataset_name": DATASET,
    "plans_name": "nnUNetPlans",
    "image_reader_writer": "SimpleITKIO",
    "label_manager": "LabelManager",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "original_median_spacing_after_transp": [999.0, 2.0, 0.5],
    "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [16, 32], "spacing": [2.0, 0.5]}},
}
DATASET_JSON = {
    "channel_names": {"0": "toy"},
    "labels": {"background": 0, "left": 1, "right": 2},
    "numTraining": 6,
    "file_ending": ".nii.gz",
}


# --------------------------------------------------------------------------- builders


def square(shift: int = 0, label: int = 1, seg: np.ndarray | None = None) -> np.ndarray:
    """Rows 3-12 x columns 3-12 (label 1) or 18-27 (label 2), shifted ``shift`` columns."""
    seg = np.zeros((20, 30), np.uint8) if seg is None else seg
    c0 = (3 if label == 1 else 18) + shift
    seg[3:13, c0 : c0 + 10] = label
    return seg


def write_seg(path: Path, seg: np.ndarray, spacing: tuple[float, ...] = SPACING_XY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def write_summary(
    folder: Path, gt: Path, per_case: dict[str, dict[str, tuple[float, int, int]]], ending: str = ".nii.gz"
) -> None:
    """summary.json as nnU-Net writes it; per case: label -> (Dice, n_ref, n_pred)."""
    rows = []
    for case, labels in per_case.items():
        metrics = {}
        for label, (dice, n_ref, n_pred) in labels.items():
            metrics[label] = {
                "Dice": dice,
                "IoU": dice / (2 - dice),
                "n_ref": n_ref,
                "n_pred": n_pred,
                "TP": 0,
                "FP": 0,
                "FN": 0,
                "TN": 0,
            }
        rows.append(
            {
                "prediction_file": str(folder / f"{case}{ending}"),
                "reference_file": str(gt / f"{case}{ending}"),
                "metrics": metrics,
            }
        )
    labels = list(next(iter(per_case.values())))
    mean = {
        label: {m: float(np.nanmean([r["metrics"][label][m] for r in rows])) for m in ("Dice", "IoU")}
        for label in labels
    }
    fg = {m: float(np.mean([mean[label][m] for label in labels])) for m in ("Dice", "IoU")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(
        json.dumps({"foreground_mean": fg, "mean": mean, "metric_per_case": rows}, indent=4, sort_keys=True)
    )


def model_numbers(model: str) -> dict[str, dict[str, tuple[float, int, int]]]:
    out = {}
    for i, case in enumerate(CASES):
        d = 0.0 if model == "A" else DIFFS[i]
        label2_empty = case == "case_0"
        out[case] = {
            "1": (DICE_A["1"][i] + d, 100, 100),
            "2": (math.nan, 0, 0) if label2_empty else (DICE_A["2"][i] + d, 100, 100),
        }
        if model == "C" and label2_empty:
            out[case]["2"] = (0.0, 0, 100)
    return out


def prediction(model: str, case: str) -> np.ndarray:
    seg = square(3 if model == "A" else 0, 1)
    if case != "case_0" or model == "C":
        square(0, 2, seg)
    return seg


def build_results_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str = ".nii.gz") -> Path:
    """nnU-Net folders with models A, B and C (files ``ending``); returns the dataset's results folder."""
    roots = {v: tmp_path / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, path in roots.items():
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    pre = roots["nnUNet_preprocessed"] / DATASET
    gt = pre / "gt_segmentations"
    for case in CASES:
        write_seg(gt / f"{case}{ending}", prediction("B", case))
    splits = [{"train": [c for c in CASES if c not in v], "val": v} for v in FOLDS.values()]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    res = roots["nnUNet_results"] / DATASET
    plans = {**PLANS, "image_reader_writer": "SimpleITKIO" if ending == ".nii.gz" else "NaturalImage2DIO"}
    dataset_json = {**DATASET_JSON, "file_ending": ending}
    for key, name in (("A", A), ("B", B)):
        folder = res / f"{name}__nnUNetPlans__2d"
        numbers = model_numbers(key)
        for f, cases in FOLDS.items():
            val = folder / f"fold_{f}" / "validation"
            write_summary(val, gt, {c: numbers[c] for c in cases}, ending)
            for c in cases:
                write_seg(val / f"{c}{ending}", prediction(key, c))
        write_json(folder / "plans.json", plans)
        write_json(folder / "dataset.json", dataset_json)
    ens = res / C
    write_summary(ens, gt, model_numbers("C"), ending)
    for c in CASES:
        write_seg(ens / f"{c}{ending}", prediction("C", c))
    write_json(ens / "plans.json", plans)
    write_json(ens / "dataset.json", dataset_json)
    return res


@pytest.fixture()
def results_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nnU-Net folders with models A, B and C; returns the dataset's results folder."""
    return build_results_env(tmp_path, monkeypatch)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def compare(*extra: str, trainers: tuple[str, ...] = (A, B), surface: bool = False) -> int:
    argv = ["compare", "-d", "42", "-c", "2d", "-tr", *trainers, "-f", "0", "1", "--n-boot", "999", "-np", "1"]
    return main(argv + ([] if surface else ["--no-surface"]) + list(extra))


def error_of(capsys: pytest.CaptureFixture, *extra: str, **kwargs) -> str:
    assert compare(*extra, **kwargs) == 2
    lines = capsys.readouterr().err.splitlines()  # progress lines may come first
    errors = [i for i, line in enumerate(lines) if line.startswith("nnunet-selfreg compare: error: ")]
    assert errors == [len(lines) - 1], lines  # one line, the last
    return lines[-1]


# --------------------------------------------------------------------------- statistics by hand


def test_paired_difference_small_n_by_hand() -> None:
    base = np.array([0.5, 0.5, 0.5])
    d = paired_difference(base, base + [0.1, 0.2, 0.3], n_boot=999, seed=1)
    assert d.n_pairs == 3 and d.mean_difference == pytest.approx(0.2)
    # exact two-sided Wilcoxon: all 3 differences positive -> 2 * (1/2**3)
    assert d.p_value == pytest.approx(0.25)
    assert 0.1 - 1e-9 <= d.ci_low <= 0.2 <= d.ci_high <= 0.3 + 1e-9
    assert d.n_nonzero == 3 and d.note == ""
    again = paired_difference(base, base + [0.1, 0.2, 0.3], n_boot=999, seed=1)
    assert (again.ci_low, again.ci_high) == (d.ci_low, d.ci_high)


@pytest.mark.parametrize(
    ("diffs", "p"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], 2 / 32),  # W = 0, n = 5
        ([0.1, -0.2, 0.3, 0.4, 0.5], 2 * 3 / 32),  # W = 2: subsets {}, {1}, {2}
        (DIFFS, 2 * 2 / 64),  # W = 1 (the -0.05 has rank 1), n = 6
    ],
)
def test_wilcoxon_exact_p_by_hand(diffs: list[float], p: float) -> None:
    d = paired_difference(np.zeros(len(diffs)), np.array(diffs), n_boot=200)
    assert d.p_value == pytest.approx(p)
    assert d.mean_difference == pytest.approx(np.mean(diffs))


def test_degenerate_differences_give_nan_with_note() -> None:
    zero = paired_difference(np.array([0.5, 0.6, 0.7]), np.array([0.5, 0.6, 0.7]), n_boot=200)
    assert math.isnan(zero.p_value) and "all differences are zero" in zero.note
    assert zero.mean_difference == 0 and zero.ci_low == zero.ci_high == 0
    one = paired_difference(np.array([0.5, math.nan]), np.array([0.7, 0.4]), n_boot=200)
    assert (one.n_pairs, one.n_excluded) == (1, 1)
    assert math.isnan(one.ci_low) and "fewer than 2" in one.note
    none = paired_difference(np.array([math.nan]), np.array([0.4]), n_boot=200)
    assert none.n_pairs == 0 and math.isnan(none.mean_difference) and math.isnan(none.p_value)


def test_nnunet_means_and_mean_ranks() -> None:
    means = nnunet_means({"1": np.array([0.5, math.nan, 0.7]), "2": np.array([0.2, 0.4, 0.6])})
    assert means == pytest.approx({"1": 0.6, "2": 0.4, "foreground_mean": 0.5})
    ranks, n = mean_ranks({"a": np.array([0.9, 0.5, 0.3, math.nan]), "b": np.array([0.8, 0.6, 0.3, 0.1])})
    assert n == 3 and ranks == pytest.approx({"a": (1 + 2 + 1.5) / 3, "b": (2 + 1 + 1.5) / 3})
    hd_ranks, _ = mean_ranks({"a": np.array([1.0, 2.0]), "b": np.array([2.0, 3.0])}, higher_is_better=False)
    assert hd_ranks == {"a": 1.0, "b": 2.0}


# --------------------------------------------------------------------------- bootstrap against an independent BCa


def bca_reference(baseline: np.ndarray, other: np.ndarray, n_boot: int = 200_000, seed: int = 12345) -> np.ndarray:
    """Efron's BCa 95 % interval of the mean paired difference, written out with numpy (Efron & Tibshirani,
    "An Introduction to the Bootstrap", ch. 14.3): cases resampled with replacement; bias correction
    ``z0 = Φ⁻¹(share of resampled means below the observed one, ties counted half)``; acceleration from
    the jackknife, ``a = Σ(θ̄ − θ_(i))³ / (6 (Σ(θ̄ − θ_(i))²)^1.5)``; endpoints at the percentiles
    ``Φ(z0 + (z0 + z_α) / (1 − a (z0 + z_α)))`` of the resampled means, ``z_α = ±1.96``.
    """
    d = np.asarray(other, float) - np.asarray(baseline, float)
    n, theta = len(d), d.mean()
    boot = d[np.random.default_rng(seed).integers(0, n, (n_boot, n))].mean(axis=1)
    z0 = norm.ppf(((boot < theta).mean() + (boot <= theta).mean()) / 2)
    jack = (d.sum() - d) / (n - 1)
    dev = jack.mean() - jack
    a = (dev**3).sum() / (6 * (dev**2).sum() ** 1.5)
    z = norm.ppf([0.025, 0.975])
    return np.percentile(boot, 100 * norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))


def assert_ci_matches_reference(low: float, high: float, baseline: np.ndarray, other: np.ndarray) -> None:
    """Within 0.3 bootstrap standard errors of :func:`bca_reference` (9,999 against 200,000 resamples).

    Measured for the data of both tests: ``paired_difference`` with seeds 0..4 lay within 0.16 standard
    errors of the reference. On ``SKEWED_*`` the percentile method, a 90 % level and an unpaired bootstrap
    move an endpoint by 0.98, 0.62 and 2.1 standard errors.
    """
    d = np.asarray(other, float) - np.asarray(baseline, float)
    tolerance = 0.3 * d.std(ddof=1) / np.sqrt(len(d))
    ref = bca_reference(baseline, other)
    assert abs(low - ref[0]) < tolerance and abs(high - ref[1]) < tolerance, ((low, high), ref, tolerance)


#: 12 paired cases whose differences are right-skewed (BCa and percentile intervals differ) and whose baseline
#: varies more than the differences (a bootstrap that ignores the pairing is far wider)
SKEWED_BASELINE = np.array(
    [0.8047, 0.5463, 0.7853, 0.7485, 0.4634, 0.6927, 0.8231, 0.6021, 0.4404, 0.5517, 0.8793, 0.7196]
)
SKEWED_DIFFS = np.array(
    [0.0246, 0.0412, 0.1355, -0.0233, 0.3269, 0.0104, -0.0168, 0.0232, -0.0287, -0.0291, 0.0566, 0.0135]
)


def test_bootstrap_ci_matches_an_independent_bca() -> None:
    d = paired_difference(SKEWED_BASELINE, SKEWED_BASELINE + SKEWED_DIFFS, n_boot=9999, seed=0)
    assert d.ci_method == "BCa" and d.mean_difference == pytest.approx(SKEWED_DIFFS.mean())
    assert_ci_matches_reference(d.ci_low, d.ci_high, SKEWED_BASELINE, SKEWED_BASELINE + SKEWED_DIFFS)


# --------------------------------------------------------------------------- the command


def test_compare_end_to_end(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare(trainers=(A, B, C), surface=True) == 0
    out = results_env / f"compare_{A}_vs_{B}_vs_ensembles-ensemble___toy_2d"
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.json", "paired_dice.png", "box_dice.png", "box_hd95.png", "folds.png"} <= names
    assert all((out / n).read_bytes().startswith(b"\x89PNG") for n in names if n.endswith(".png"))
    r = json.loads((out / "results.json").read_text())
    assert [m["layout"] for m in r["setup"]["models"]] == ["folds", "folds", "merged"]

    pooled = r["aggregates"]["pooled"]
    assert pooled[A]["Dice"] == pytest.approx({"1": 0.5, "2": 0.62, "foreground_mean": 0.56})
    assert pooled[B]["Dice"] == pytest.approx({"1": 0.7, "2": 0.84, "foreground_mean": 0.77})
    assert pooled[C]["Dice"]["foreground_mean"] == pytest.approx(0.7)
    assert pooled[A]["HD95"]["1"] == pytest.approx(1.5) and pooled[B]["HD95"]["1"] == 0
    assert pooled[A]["NSD"]["1"] == pytest.approx(0.5) and pooled[B]["NSD"]["1"] == 1
    assert r["aggregates"]["per_fold"]["1"][A]["Dice"]["1"] == pytest.approx(1.4 / 3)

    diff = r["differences"]
    assert diff["baseline"] == A
    dice = diff["pooled"][B]["Dice"]
    assert dice["n_pairs"] == 6 and dice["mean_difference"] == pytest.approx(0.2)
    assert dice["p_value"] == pytest.approx(4 / 64)
    assert dice["ci_low"] < 0.2 < dice["ci_high"]
    assert diff["per_fold"]["0"][B]["Dice"]["p_value"] == pytest.approx(0.25)
    assert diff["per_fold"]["1"][B]["Dice"]["p_value"] == pytest.approx(0.5)  # W = 1 of n = 3
    assert diff["per_fold"]["1"][B]["Dice"]["mean_difference"] == pytest.approx(0.2)
    # per case HD95 over labels: A (1.5 + 0) / 2, or 1.5 in case_0 (label 2 absent); B 0
    assert diff["pooled"][B]["HD95"]["mean_difference"] == pytest.approx(-(1.5 + 5 * 0.75) / 6)
    assert diff["per_label"][B]["NSD"]["1"]["mean_difference"] == pytest.approx(0.5)

    assert [x["arm"] for x in r["ranking"]] == [B, C, A]
    ranks = {x["arm"]: x["mean_case_rank"] for x in r["ranking"]}
    # per case (1 = best): case_0 B > A > C (C's label-2 Dice 0); case_3 A > B = C (difference -0.05);
    # elsewhere B = C > A
    assert ranks == pytest.approx({B: (1 + 4 * 1.5 + 2.5) / 6, C: (3 + 4 * 1.5 + 2.5) / 6, A: (2 + 4 * 3 + 1) / 6})

    assert r["empty_cases"][A]["2"] == {"both_empty": 1, "reference_empty_only": 0, "prediction_empty_only": 0}
    assert r["empty_cases"][C]["2"]["reference_empty_only"] == 1
    assert r["nan_counts"][A]["HD95"]["2"] == 1 and r["nan_counts"][C]["HD95"]["2"] == 0
    case0 = r["cases"][0]
    assert case0["case"] == "case_0" and case0["fold"] == 0
    diagonal = math.hypot(20 * 2.0, 30 * 0.5)  # label 2 only in C's prediction: HD95 = the image diagonal
    assert case0["values"][C]["NSD"]["2"] == 0 and case0["values"][C]["HD95"]["2"] == pytest.approx(diagonal)
    assert case0["values"][A]["Dice"]["2"] is None

    report = (out / "report.md").read_text()
    for text in (
        "## Setup",
        "## Per fold",
        "## Pooled over folds",
        "## Case level: differences against the baseline",
        "## Ranking",
        "## Excluded (NaN) values",
        "nnunet-selfreg compare -d 42 -c 2d",
        "0.0625 |",
        "0.2500 † |",
        "only its validation cases were checked",
        "![paired_dice](paired_dice.png)",
    ):
        assert text in report, text
    # one run per arm: the first lines say so, before any p-value (report and console)
    statement = "cannot support a claim about a method"
    assert report.index("## Verdict") < report.index(statement) < report.index("Wilcoxon p")
    captured = capsys.readouterr()
    assert "surface metrics: case 6/6" in captured.err
    assert "report:" in captured.out
    assert captured.out.index(statement.split()[0]) < captured.out.index("p =")


def test_no_overwrite_unless_asked(results_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert compare("-o", str(out)) == 0
    (out / "results.json").write_text("old")
    err = error_of(capsys, "-o", str(out))
    assert "already exists" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == "old"
    assert compare("-o", str(out), "--overwrite", "-np", "2", surface=True) == 0  # worker processes too
    r = json.loads((out / "results.json").read_text())
    assert r["setup"]["surface"]["computed"] is True
    assert r["aggregates"]["pooled"][A]["HD95"]["1"] == pytest.approx(1.5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cmp")) == []


def test_dataset_by_name(results_env: Path, tmp_path: Path) -> None:
    """``-d Dataset042_Toy`` finds the same results as ``-d 42`` (summaries written by nnU-Net itself: below)."""
    out = tmp_path / "by_name"
    argv = f"compare -d {DATASET} -c 2d -tr {A} {B} -f 0 1 -o {out} --no-surface --n-boot 200"
    assert main(argv.split()) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["setup"]["dataset"] == DATASET and r["setup"]["n_cases"] == 6
    assert r["aggregates"]["pooled"][B]["Dice"] == pytest.approx({"1": 0.7, "2": 0.84, "foreground_mean": 0.77})
    assert r["empty_cases"][B]["2"]["both_empty"] == 1


# --------------------------------------------------------------------------- against nnU-Net's own evaluation

EVAL_DATASET = "Dataset043_Eval"
EVAL_FOLDS = {0: [f"ev_{i}" for i in range(3)], 1: [f"ev_{i}" for i in range(3, 8)]}  # unequal folds
EVAL_CROSSVAL = f"{A}__nnUNetPlans__2d/crossval_results_folds_0_1"  # where nnU-Net collects all folds


def nnunet_evaluate(gt: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` writes ``folder/summary.json`` (its worker pool forked, not spawned)."""
    import multiprocessing

    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    get_context = multiprocessing.get_context
    with monkeypatch.context() as m:
        m.setattr(evaluate_predictions.multiprocessing, "get_context", lambda method=None: get_context("fork"))
        evaluate_predictions.compute_metrics_on_folder(
            str(gt), str(folder), str(folder / "summary.json"), SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1
        )
    return json.loads((folder / "summary.json").read_text())


def eval_seg(rng: np.random.Generator, case: int, jitter: int = 0, reference: np.ndarray | None = None) -> np.ndarray:
    """A 24 x 32 label map: a label-1 and (except in cases 1 and 5) a label-2 rectangle; with ``jitter`` the
    reference's rectangles moved and resized by up to ``jitter`` pixels."""
    if reference is None:
        seg = np.zeros((24, 32), np.uint8)
        seg[rng.integers(2, 6) : rng.integers(12, 20), rng.integers(1, 5) : rng.integers(9, 15)] = 1
        if case not in (1, 5):
            seg[rng.integers(2, 8) : rng.integers(14, 22), rng.integers(18, 22) : rng.integers(26, 31)] = 2
        return seg
    seg = np.zeros_like(reference)
    for label in (1, 2):
        rows, cols = np.nonzero(reference == label)
        if len(rows):
            r0, r1, c0, c1 = (
                int(v) + int(rng.integers(-jitter, jitter + 1))
                for v in (rows.min(), rows.max(), cols.min(), cols.max())
            )
            seg[max(r0, 0) : max(r1, r0 + 1), max(c0, 0) : max(c1, c0 + 1)] = label
    return seg


@pytest.fixture()
def nnunet_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Models A (jitter 3) and B (jitter 1) evaluated fold by fold by nnU-Net, and A's folds collected in one
    folder evaluated by nnU-Net as a whole (``crossval_results_folds_0_1``). Label 2 is absent from the
    reference of ev_1 and ev_5: A predicts none there (Dice NaN), B predicts a blob in ev_1 (Dice 0)."""
    roots = {v: tmp_path / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, path in roots.items():
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    rng = np.random.default_rng(43)
    pre = roots["nnUNet_preprocessed"] / EVAL_DATASET
    gt = pre / "gt_segmentations"
    cases = [c for f in EVAL_FOLDS.values() for c in f]
    refs = {c: eval_seg(rng, i) for i, c in enumerate(cases)}
    for c, seg in refs.items():
        write_seg(gt / f"{c}.nii.gz", seg)
    splits = [{"train": [c for c in cases if c not in v], "val": v} for v in EVAL_FOLDS.values()]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    res = roots["nnUNet_results"] / EVAL_DATASET
    plans = {**PLANS, "dataset_name": EVAL_DATASET}
    for name, jitter in ((A, 3), (B, 1)):
        folder = res / f"{name}__nnUNetPlans__2d"
        for f, fold_cases in EVAL_FOLDS.items():
            val = folder / f"fold_{f}" / "validation"
            for c in fold_cases:
                seg = eval_seg(rng, 0, jitter, refs[c])
                if name == B and c == "ev_1":
                    seg[20:23, 28:31] = 2
                write_seg(val / f"{c}.nii.gz", seg)
            nnunet_evaluate(gt, val, monkeypatch)
        write_json(folder / "plans.json", plans)
        write_json(folder / "dataset.json", DATASET_JSON)
    crossval = res / EVAL_CROSSVAL
    crossval.mkdir()
    for f in EVAL_FOLDS:
        for p in (res / f"{A}__nnUNetPlans__2d" / f"fold_{f}" / "validation").glob("*.nii.gz"):
            shutil.copy(p, crossval / p.name)
    nnunet_evaluate(gt, crossval, monkeypatch)
    write_json(crossval / "plans.json", plans)
    write_json(crossval / "dataset.json", DATASET_JSON)
    return res


def test_aggregates_and_ci_against_nnunet_evaluation(nnunet_evaluated: Path, tmp_path: Path) -> None:
    res, out = nnunet_evaluated, tmp_path / "cmp"
    argv = ["compare", "-d", "43", "-c", "2d", "-tr", A, B, EVAL_CROSSVAL, "-f", "0", "1", "-o", str(out),
            "--no-surface", "-np", "1"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    merged = json.loads((res / EVAL_CROSSVAL / "summary.json").read_text())  # nnU-Net over all 8 cases of A
    fold_summaries = {
        (m, f): json.loads((res / f"{m}__nnUNetPlans__2d" / f"fold_{f}" / "validation" / "summary.json").read_text())
        for m in (A, B)
        for f in EVAL_FOLDS
    }
    for metric in ("Dice", "IoU"):
        nnunet_pooled = {
            **{k: merged["mean"][k][metric] for k in ("1", "2")},
            "foreground_mean": merged["foreground_mean"][metric],
        }
        assert r["aggregates"]["pooled"][A][metric] == pytest.approx(nnunet_pooled, rel=1e-12)
        assert r["aggregates"]["pooled"][EVAL_CROSSVAL][metric] == pytest.approx(nnunet_pooled, rel=1e-12)
        for (m, f), summary in fold_summaries.items():
            per_fold = r["aggregates"]["per_fold"][str(f)][m][metric]
            assert per_fold["foreground_mean"] == pytest.approx(summary["foreground_mean"][metric], rel=1e-12)
            assert {k: per_fold[k] for k in ("1", "2")} == pytest.approx(
                {k: summary["mean"][k][metric] for k in ("1", "2")}, rel=1e-12
            )
    # the data tell pooling apart from averaging the fold means, and hold an undefined (NaN) Dice
    fold_means = [fold_summaries[(A, f)]["mean"]["1"]["Dice"] for f in EVAL_FOLDS]
    assert abs(np.mean(fold_means) - merged["mean"]["1"]["Dice"]) > 0.01
    assert r["nan_counts"][A]["Dice"]["2"] == 2 and r["nan_counts"][B]["Dice"]["2"] == 1

    # the pooled paired difference of the per-case foreground Dice, from nnU-Net's per-case numbers
    per_case = {
        m: {
            Path(row["prediction_file"]).name[: -len(".nii.gz")]: np.nanmean(
                [row["metrics"][k]["Dice"] for k in ("1", "2")]
            )
            for f in EVAL_FOLDS
            for row in fold_summaries[(m, f)]["metric_per_case"]
        }
        for m in (A, B)
    }
    cases = sorted(per_case[A])
    base, other = np.array([per_case[A][c] for c in cases]), np.array([per_case[B][c] for c in cases])
    dice = r["differences"]["pooled"][B]["Dice"]
    assert dice["n_pairs"] == 8 and dice["mean_difference"] == pytest.approx((other - base).mean(), rel=1e-12)
    assert dice["ci_method"] == "BCa"
    assert_ci_matches_reference(dice["ci_low"], dice["ci_high"], base, other)


# --------------------------------------------------------------------------- errors


def test_missing_trainer(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    err = error_of(capsys, trainers=(A, "nnUNetTrainerNope"))
    assert "nnUNetTrainerNope__nnUNetPlans__2d does not exist" in err
    assert "nnUNetv2_train" in err and f"{B}__nnUNetPlans__2d" in err
    assert "ensembles/ensemble___toy" in err
    assert "no such folder" in error_of(capsys, trainers=(A, "ensembles/nope"))


def test_missing_fold_names_trainer_fold_and_command(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(results_env / f"{B}__nnUNetPlans__2d" / "fold_1")
    err = error_of(capsys)
    assert f"{B} lacks fold 1" in err and f"nnUNetv2_train {DATASET} 2d 1 -tr {B} -p nnUNetPlans" in err
    fold = results_env / f"{A}__nnUNetPlans__2d" / "fold_0"
    (fold / "checkpoint_final.pth").write_bytes(b"")
    shutil.rmtree(fold / "validation")
    err = error_of(capsys)
    assert f"{A} lacks the validation of fold 0" in err and "--val" in err and f"{B} lacks fold 1" in err


def test_different_splits(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    folder = results_env / f"{B}__nnUNetPlans__2d"
    for f, (drop, add) in {0: ("case_2", "case_3"), 1: ("case_3", "case_2")}.items():
        path = folder / f"fold_{f}" / "validation" / "summary.json"
        s = json.loads(path.read_text())
        for row in s["metric_per_case"]:
            row["prediction_file"] = row["prediction_file"].replace(drop, add)
        path.write_text(json.dumps(s))
    err = error_of(capsys)
    assert "different splits" in err
    assert f"fold 0: {B} has case_3 which {A} lacks and lacks case_2" in err


def test_different_plans(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    plans = json.loads(json.dumps(PLANS))
    plans["configurations"]["2d"]["patch_size"] = [32, 32]
    write_json(results_env / f"{B}__nnUNetPlans__2d" / "plans.json", plans)
    err = error_of(capsys)
    assert "different plans" in err and "patch_size" in err


def test_merged_folder_lacking_cases(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    path = results_env / C / "summary.json"
    s = json.loads(path.read_text())
    s["metric_per_case"] = s["metric_per_case"][:-1]
    labels = ("1", "2")
    for label in labels:
        for m in ("Dice", "IoU"):
            s["mean"][label][m] = float(np.nanmean([r["metrics"][label][m] for r in s["metric_per_case"]]))
    s["foreground_mean"]["Dice"] = float(np.mean([s["mean"][k]["Dice"] for k in labels]))
    path.write_text(json.dumps(s))
    err = error_of(capsys, trainers=(A, C))
    assert "lacks 1 of the compared cases (case_5)" in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[:-20], "invalid JSON"),
        (lambda text: text.replace('"metric_per_case"', '"cases"'), "'metric_per_case' is missing"),
        (lambda text: text.replace('"Dice": 0.6,', '"Dice": "NaN",', 1), "not a number"),
        (lambda text: text.replace('"Dice": 0.6,', '"Dice": 0.9,', 1), "per-case values average"),
        (
            lambda text: text.replace('"n_ref": 100', '"n_ref": 0', 1).replace('"n_pred": 100', '"n_pred": 0', 1),
            "Dice must be NaN exactly when",
        ),
    ],
)
def test_hand_edited_summary(results_env: Path, capsys: pytest.CaptureFixture, edit, message: str) -> None:
    path = results_env / f"{B}__nnUNetPlans__2d" / "fold_0" / "validation" / "summary.json"
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    err = error_of(capsys)
    assert str(path) in err and message in err and "by hand" in err


def test_bad_arguments(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    assert "at least two trainers" in error_of(capsys, trainers=(A,))
    assert "given twice" in error_of(capsys, trainers=(A, A))
    assert "--nsd-tolerance" in error_of(capsys, "--nsd-tolerance", "-1")
    assert "Could not find a dataset" in main_error(capsys, ["compare", "-d", "7", "-c", "2d", "-tr", A, B])


def main_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_merged_folders_only_use_splits_final(results_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.copytree(results_env / C, results_env / "ensembles" / "copy")
    out = tmp_path / "merged"
    assert compare("-o", str(out), "-f", "1", trainers=(C, "ensembles/copy")) == 0
    r = json.loads((out / "results.json").read_text())
    assert [c["case"] for c in r["cases"]] == FOLDS[1]
    assert r["differences"]["pooled"]["ensembles/copy"]["Dice"]["mean_difference"] == 0
    assert any("3 of its cases are not in the compared folds" in n for n in r["notes"])
    (tmp_path / "nnUNet_preprocessed" / DATASET / "splits_final.json").unlink()
    err = error_of(capsys, "-o", str(tmp_path / "x"), trainers=(C, "ensembles/copy"))
    assert "splits_final.json, which cannot be read" in err


def test_surface_input_errors(results_env: Path, capsys: pytest.CaptureFixture) -> None:
    pred = results_env / f"{B}__nnUNetPlans__2d" / "fold_1" / "validation" / "case_4.nii.gz"
    pred.write_bytes(b"not an image")
    err = error_of(capsys, surface=True)
    assert "cannot read" in err and str(pred) in err
    pred.unlink()
    err = error_of(capsys, surface=True)
    assert "prediction of case case_4 is missing" in err and "--no-surface" in err
