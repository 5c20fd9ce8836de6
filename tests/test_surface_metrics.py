"""HD95 and NSD: one pass of edges and distances per label, on its box, with MONAI's values.

The reference implementation is the MONAI path ``compare`` used before: ``compute_hausdorff_distance``
(percentile 95) and ``compute_surface_dice`` on the whole image, one label at a time. Cases: holes,
masks touching the image border, anisotropic spacing, thin and scattered structures, empty masks, in 2D
and 3D. NSD (a ratio of counts) must be identical; HD95 equal up to the float32 rounding of the 95th
percentile (MONAI's ``torch.quantile`` and numpy's ``quantile`` round the interpolation differently).

A label present in only one of the masks scores HD95 = the image diagonal: the test at the end shows the
bias this removes from the per-case foreground mean.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_selfreg.evaluation.metrics import (
    SurfaceJob,
    evaluate_case,
    image_diagonal_mm,
    label_surface_metrics,
    surface_metrics,
)
from nnunet_selfreg.evaluation.stats import case_foreground_mean

HD95_REL = 1e-6


def monai_reference(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    """What compare computed before: MONAI's two calls on the whole image (NaN where undefined)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return {"HD95": math.nan, "NSD": math.nan}
    y_pred = torch.from_numpy(pred.astype(np.float32)[None, None])
    y = torch.from_numpy(ref.astype(np.float32)[None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nsd = compute_surface_dice(y_pred, y, [tolerance], include_background=True, spacing=list(spacing))
        hd = math.nan
        if not (pred_empty or ref_empty):
            hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
            hd = float(hd.item())
    return {"HD95": hd, "NSD": float(nsd.item())}


def assert_same_as_monai(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    ours = surface_metrics(pred, ref, spacing, tolerance)
    theirs = monai_reference(pred, ref, spacing, tolerance)
    if pred.any() and ref.any():
        assert ours["NSD"] == theirs["NSD"], (ours, theirs)
        assert ours["HD95"] == pytest.approx(theirs["HD95"], rel=HD95_REL, abs=1e-12), (ours, theirs)
    return ours


def blob(shape, rng: np.random.Generator, holes: bool = True) -> np.ndarray:
    """A random ellipsoid (possibly cut by the image border), with holes punched into it."""
    grid = np.indices(shape, dtype=float)
    centre = [rng.uniform(-0.1, 1.1) * n for n in shape]
    radii = [rng.uniform(0.15, 0.5) * n for n in shape]
    mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
    if holes:
        mask &= rng.random(shape) > 0.05
    return mask


@pytest.mark.parametrize("dim", [2, 3])
def test_random_masks_match_monai(dim: int) -> None:
    rng = np.random.default_rng(dim)
    shape = (37, 41) if dim == 2 else (13, 21, 17)
    for trial in range(25):
        spacing = tuple(float(s) for s in rng.choice([0.1, 0.3, 0.5, 1.0, 2.5, 3.0], size=dim))
        ref = blob(shape, rng, holes=trial % 2 == 0)
        pred = blob(shape, rng, holes=trial % 3 == 0) | (ref & (rng.random(shape) > 0.3))
        tolerance = float(rng.choice([0.3, 1.0, 2.0]))
        if ref.any() and pred.any():
            assert_same_as_monai(pred, ref, spacing, tolerance)


def test_border_holes_thin_and_scattered_structures_match_monai() -> None:
    spacing = (0.3, 0.1, 2.0)  # 0.1 * 3 = 0.30000000000000004: a distance on the float32 tolerance edge
    ref = np.zeros((6, 30, 40), bool)
    ref[:, :12, :] = True  # touches four borders
    ref[2:4, 3:6, 5:9] = False  # a hole
    pred = np.zeros_like(ref)
    pred[:, 3:15, 2:] = True
    pred[0, 20, 30] = True  # an isolated voxel far away
    pred[5, 29, 39] = True  # one in the image's corner
    for tolerance in (0.3, 0.5, 2.0):
        assert_same_as_monai(pred, ref, spacing, tolerance)
    line = np.zeros((30, 40), bool)
    line[10, 5:35] = True  # one-voxel-thick: every voxel is an edge
    assert_same_as_monai(np.roll(line, 2, axis=0), line, (0.7, 0.4), 1.0)
    assert_same_as_monai(line, line, (0.7, 0.4), 0.0)


def test_shifted_squares_by_hand() -> None:
    # shift 3 columns at 0.5 mm: per edge point the distance is 0, 0.5, 1.0 or 1.5 mm; 18 of 36 are 1.5 mm
    ref = np.zeros((20, 30), bool)
    ref[3:13, 3:13] = True
    pred = np.roll(ref, 3, axis=1)
    assert surface_metrics(pred, ref, (2.0, 0.5), 1.0) == pytest.approx({"HD95": 1.5, "NSD": 18 / 36})
    assert surface_metrics(pred, ref, (2.0, 0.5), 1.5) == pytest.approx({"HD95": 1.5, "NSD": 1.0})
    assert surface_metrics(pred, ref, (1.0, 1.0), 3.0)["HD95"] == pytest.approx(3.0)


@pytest.mark.parametrize("shape, spacing", [((20, 30), (2.0, 0.5)), ((4, 20, 30), (3.0, 2.0, 0.5))])
def test_empty_masks(shape, spacing) -> None:
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[(slice(1, 3),) * len(shape)] = True
    both = surface_metrics(empty, empty, spacing, 1.0)
    assert math.isnan(both["HD95"]) and math.isnan(both["NSD"])  # as MONAI and nnU-Net: undefined, left out
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    for pred, ref in ((empty, full), (full, empty)):
        one = surface_metrics(pred, ref, spacing, 1.0)
        assert one == {"HD95": pytest.approx(diagonal), "NSD": 0.0}
        assert monai_reference(pred, ref, spacing, 1.0)["NSD"] == 0.0  # NSD as MONAI; HD95 MONAI leaves undefined
    # the penalty exceeds the worst HD95 two non-empty masks can have: opposite corners
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[(0,) * len(shape)] = True
    b[tuple(n - 1 for n in shape)] = True
    assert assert_same_as_monai(a, b, spacing, 1.0)["HD95"] < diagonal


def test_label_maps_and_regions_each_on_their_own_box() -> None:
    rng = np.random.default_rng(5)
    shape, spacing = (12, 25, 30), (2.0, 0.8, 0.8)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for label in (1, 2, 3):
        ref[blob(shape, rng)] = label
        pred[blob(shape, rng) | (ref == label) & (rng.random(shape) > 0.4)] = label
    pred[pred == 3] = 0  # label 3 missed
    ref[ref == 4] = 0
    pred[0, 0, 0] = 4  # label 4 predicted where the reference has none
    regions = {"1": (1,), "2": (2,), "3": (3,), "4": (4,), "(1, 2)": (1, 2), "5": (5,)}
    values = label_surface_metrics(pred, ref, regions, spacing, 1.0)
    diagonal = image_diagonal_mm(shape, spacing)
    for key, region in regions.items():
        p, r = np.isin(pred, region), np.isin(ref, region)
        expected = monai_reference(p, r, spacing, 1.0)
        got = {m: values[m][key] for m in ("HD95", "NSD")}
        if p.any() and r.any():
            assert got["NSD"] == expected["NSD"] and got["HD95"] == pytest.approx(expected["HD95"], rel=HD95_REL)
        elif p.any() or r.any():
            assert key in ("3", "4") and got == {"HD95": diagonal, "NSD": 0.0}
        else:
            assert key == "5" and math.isnan(got["HD95"]) and math.isnan(got["NSD"])


def write_seg(path: Path, seg: np.ndarray, spacing) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_evaluate_case_reads_spacing_with_nnunet_reader(tmp_path: Path) -> None:
    ref = np.zeros((20, 30), np.uint8)
    ref[3:13, 3:13] = 1
    ref[3:13, 18:28] = 2
    pred = ref.copy()
    pred[3:13, 3:16] = np.where(pred[3:13, 3:16] == 2, 2, 0)
    pred[3:13, 6:16] = 1  # label 1 shifted by 3 columns
    write_seg(tmp_path / "ref.nii.gz", ref, (0.5, 2.0))  # SimpleITK: x (columns) first
    write_seg(tmp_path / "pred.nii.gz", pred, (0.5, 2.0))
    job = SurfaceJob(
        "x", str(tmp_path / "ref.nii.gz"), (("m", str(tmp_path / "pred.nii.gz")),), ("1", "2"), "SimpleITKIO", 1.0
    )
    case, values = evaluate_case(job)
    assert case == "x"
    assert values["m"]["HD95"] == pytest.approx({"1": 1.5, "2": 0.0})
    assert values["m"]["NSD"] == pytest.approx({"1": 0.5, "2": 1.0})
    # 3D: two slices at 3 mm; a prediction without label 2 gets the diagonal of the 3D image
    write_seg(tmp_path / "ref3d.nii.gz", np.stack([ref] * 2), (0.5, 2.0, 3.0))
    write_seg(tmp_path / "pred3d.nii.gz", np.stack([np.where(pred == 2, 0, pred)] * 2), (0.5, 2.0, 3.0))
    job3d = SurfaceJob(
        "y", str(tmp_path / "ref3d.nii.gz"), (("m", str(tmp_path / "pred3d.nii.gz")),), ("1", "2"), "SimpleITKIO", 1.0
    )
    hd = evaluate_case(job3d)[1]["m"]["HD95"]
    assert hd == pytest.approx({"1": 1.5, "2": math.sqrt(6.0**2 + 40.0**2 + 15.0**2)})


def test_a_missed_class_no_longer_favours_the_model_that_misses() -> None:
    """Reference with labels 1 and 2. Model A finds both (label 2 poorly); model B is slightly worse on
    label 1 and predicts no label 2 at all. Left undefined, B's missing label drops out of its per-case mean."""
    shape, spacing = (40, 60), (1.0, 1.0)
    ref = np.zeros(shape, np.uint8)
    ref[5:15, 5:15] = 1
    ref[25:35, 30:50] = 2
    a = np.zeros_like(ref)
    a[5:15, 6:16] = 1  # label 1 shifted by 1 mm
    a[20:35, 30:50] = 2  # label 2 five rows too tall
    b = np.zeros_like(ref)
    b[5:15, 7:17] = 1  # label 1 shifted by 2 mm, no label 2
    regions = {"1": (1,), "2": (2,)}
    va = label_surface_metrics(a, ref, regions, spacing, 1.0)["HD95"]
    vb = label_surface_metrics(b, ref, regions, spacing, 1.0)["HD95"]
    assert vb["1"] > va["1"]  # B is worse on the label both predicted ...
    assert vb["2"] == image_diagonal_mm(shape, spacing)  # ... and misses label 2

    def per_case_mean(values: dict[str, float]) -> float:
        return float(case_foreground_mean({k: np.array([v]) for k, v in values.items()})[0])

    # the old rule (HD95 undefined for a missed label): B's mean over label 1 alone beats A's over both labels
    old_b = {**vb, "2": math.nan}
    assert per_case_mean(old_b) - per_case_mean(va) < 0
    assert per_case_mean(old_b) - per_case_mean(va) == pytest.approx(vb["1"] - (va["1"] + va["2"]) / 2)
    # with the penalty B is worse, as it should be on both labels
    assert per_case_mean(vb) - per_case_mean(va) > 0


def test_workers_import_neither_torch_nor_monai(tmp_path: Path) -> None:
    """A case evaluated in a fresh interpreter (as a spawned worker does it) loads no torch, MONAI, nnU-Net
    evaluation code or readers other than the one asked for."""
    seg = np.zeros((2, 20, 30), np.uint8)
    seg[:, 3:13, 3:13] = 1
    write_seg(tmp_path / "ref.nii.gz", seg, (0.5, 2.0, 3.0))
    write_seg(tmp_path / "pred.nii.gz", np.roll(seg, 2, axis=2), (0.5, 2.0, 3.0))
    code = (
        "import json, sys\n"
        "from nnunet_selfreg.evaluation.metrics import SurfaceJob, evaluate_case, _init_worker\n"
        "_init_worker()\n"
        "job = SurfaceJob('c', sys.argv[1], (('m', sys.argv[2]),), ('1',), 'SimpleITKIO', 1.0, regions=((1,),),\n"
        "                 reader_class='nnunetv2.imageio.simpleitk_reader_writer:SimpleITKIO')\n"
        "values = evaluate_case(job)[1]\n"
        "heavy = ['torch', 'monai', 'nnunetv2.evaluation.evaluate_predictions', 'skimage', 'imageio']\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps({'values': values, 'heavy': heavy}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz")],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["values"]["m"]["HD95"]["1"] == pytest.approx(1.0)
