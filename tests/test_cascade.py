"""nnU-Net's cascade with SelfReg through the real CLIs: 3d_lowres on every fold, then 3d_cascade_fullres.

nnU-Net plans ``3d_lowres`` (and with it ``3d_cascade_fullres``) only when the ``3d_fullres`` patch
covers less than a quarter of the median image (``lowres_creation_threshold`` in
``nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py``). The cheapest way
there: four generated 48^3 volumes planned with nnU-Net's own ``-gpu_memory_target 0.03`` (GB), which
shrinks the fullres patch to 24x20x20 (9 % of 48^3), so the planner adds a lowres stage of 34^3 (spacing
1.43). With the default 8 GB target the volumes would have to be several times a 128^3-sized patch, far
too big for a CPU test. Each fold's final validation is a sliding-window prediction with nnU-Net's 8
mirrorings, so the volume size sets most of the cost: a 48^3 fullres case takes 48 windows x 8 = 384
patch evaluations; 64^3 volumes (patch 28x24x24) took 800, and their cascade validation did not finish
within 15 minutes on the loaded 2-core test machine.
The plans get their own name (``-overwrite_plans_name``), as nnU-Net advises for a changed memory target.

The cascade trains on the lowres stage's predictions of its training cases, which nnU-Net writes in each
lowres fold's final validation (``predicted_next_stage/3d_cascade_fullres``). A two-fold split (written
as ``splits_final.json``, nnU-Net's way of custom folds) lets two lowres trainings cover all cases.

Cost: marked ``slow`` (plan/preprocess, three trainings and two predictions: see docs/testing.md).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_selfreg.data.synthetic import make_synthetic_dataset
from tests.harness import NNUNetEnv

pytestmark = pytest.mark.slow

DS = 990
PLANS = "nnUNetPlansCascadeTest"
TRAINER = "nnUNetTrainerSelfReg_Budget"
BUDGET = {
    "NNUNET_SELFREG_BUDGET_EPOCHS": "1",
    "NNUNET_SELFREG_BUDGET_ITERATIONS": "2",
    "NNUNET_SELFREG_BUDGET_VAL_ITERATIONS": "1",
}
CASES = [f"case_{i:03d}" for i in range(4)]
SPLITS = [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2], "val": CASES[2:]}]


def _train(env: NNUNetEnv, configuration: str, fold: int):
    cmd = ("nnUNetv2_train", str(DS), configuration, str(fold), "-tr", TRAINER, "-device", "cpu", "-p", PLANS)
    return env.run(*cmd, timeout=3600, **BUDGET)  # a loaded machine can take long for the validation


def _predict(env: NNUNetEnv, inp, out, configuration: str, folds: tuple[int, ...], *extra: str) -> None:
    env.run(
        "nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(DS), "-c", configuration, "-p", PLANS,
        "-f", *map(str, folds), "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", *extra,
    )  # fmt: skip


def test_lowres_then_cascade_fullres_with_selfreg(tmp_path_factory):
    env = NNUNetEnv(tmp_path_factory.mktemp("cascade"))
    make_synthetic_dataset(env.raw, DS, dim=3, num_cases=len(CASES), shape=(48, 48, 48), seed=3)
    env.plan_and_preprocess(
        DS, ("3d_lowres", "3d_fullres"), "-gpu_memory_target", "0.03", "-overwrite_plans_name", PLANS
    )
    pre = next(env.preprocessed.glob(f"Dataset{DS}_*"))
    plans = json.loads((pre / f"{PLANS}.json").read_text())["configurations"]
    assert plans["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert plans["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    lowres_shape, fullres_shape = plans["3d_lowres"]["median_image_size_in_voxels"], (48, 48, 48)
    assert np.prod(lowres_shape) * 2 <= np.prod(fullres_shape)  # a real lower resolution
    (pre / "splits_final.json").write_text(json.dumps(SPLITS))

    # stage 1: 3d_lowres on both folds; each fold's validation exports its cases for the next stage
    for fold in (0, 1):
        _train(env, "3d_lowres", fold)
    lowres = env.model_folder(DS, TRAINER, "3d_lowres", PLANS)
    for fold in (0, 1):
        log = next((lowres / f"fold_{fold}").glob("training_log_*.txt")).read_text()
        assert "SelfReg epoch means: scr" in log and "1 epochs x 2 iterations" in log
    exported = sorted(p.name.split(".")[0] for p in (lowres / "predicted_next_stage" / "3d_cascade_fullres").iterdir())
    assert exported == CASES  # every case, from the fold that validated it (nnU-Net's preprocessed format)

    # stage 2: 3d_cascade_fullres, input = image + one-hot channels of the lowres segmentation
    _train(env, "3d_cascade_fullres", 0)
    fold0 = env.model_folder(DS, TRAINER, "3d_cascade_fullres", PLANS) / "fold_0"
    log = next(fold0.glob("training_log_*.txt")).read_text()
    assert "SelfReg epoch means: scr" in log
    ckpt = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and np.isfinite(ckpt["logging"]["selfreg_scr"][0])
    first_conv = next(v for k, v in ckpt["network_weights"].items() if k.endswith("weight") and v.ndim == 5)
    assert first_conv.shape[1] == 1 + 2  # one image channel + one-hot of the 2 foreground labels
    summary = json.loads((fold0 / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    # prediction: lowres (both folds), then the cascade on top of the lowres predictions
    test_raw = make_synthetic_dataset(tmp_path_factory.mktemp("test_cases"), 1, dim=3, num_cases=1,
                                      shape=(48, 48, 48), seed=11)  # fmt: skip
    inp = test_raw / "imagesTr"
    pred_low, pred_cascade = env.root / "pred_lowres", env.root / "pred_cascade"
    _predict(env, inp, pred_low, "3d_lowres", (0, 1))
    _predict(env, inp, pred_cascade, "3d_cascade_fullres", (0,), "-prev_stage_predictions", str(pred_low))
    for case in ("case_000",):
        image = sitk.ReadImage(str(inp / f"{case}_0000.nii.gz"))
        for folder in (pred_low, pred_cascade):
            seg = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
            assert seg.GetSize() == image.GetSize() == (48, 48, 48)  # lowres is exported at the input's geometry
            assert np.allclose(seg.GetSpacing(), image.GetSpacing())
            assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1, 2}
    names = {p.name for p in pred_cascade.iterdir() if p.name.endswith(".nii.gz")}
    assert names == {"case_000.nii.gz"}
    assert os.path.isfile(pred_cascade / "plans.json") and os.path.isfile(pred_cascade / "dataset.json")
