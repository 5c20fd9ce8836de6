"""End to end through nnU-Net's own CLIs: plan/preprocess, train, continue, validate, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

TRAINER = "nnUNetTrainerSelfRegTiny"  # tests/ext_trainers: nnUNetTrainerSelfReg with a tiny budget


def _checkpoint(folder):
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def test_2d_train_continue_validate_predict(nnenv, ds2d, tmp_path):
    nnenv.train(ds2d, "2d", 0, TRAINER)
    model = nnenv.model_folder(ds2d, TRAINER, "2d")
    fold = model / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    line = next(ln for ln in log.splitlines() if "SelfReg: lambda=" in ln)
    assert "SelfReg: lambda=0.015 -> effective weights {'scr': 0.015, 'ifd_enc': 0.015, 'ifd_dec': 0.015}" in line
    assert "SCR=on, IFD=on (detach first half: False)" in line
    assert "network PlainConvUNet: students e_2..e_" in line and "teacher F_final = d_" in line
    assert log.count("SelfReg epoch means: scr") == 2
    ckpt = _checkpoint(fold)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 2
    for key in ("selfreg_scr", "selfreg_ifd_enc", "selfreg_ifd_dec", "selfreg_weighted"):
        values = ckpt["logging"][key]
        assert len(values) == 2 and all(np.isfinite(values)) and all(v > 0 for v in values), key
    assert Image.open(fold / "progress.png").size[1] > 5400  # nnU-Net's 3 panels plus ours
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    first_two = list(ckpt["logging"]["selfreg_scr"])

    # continue for one more epoch: the epoch counter and our curves go on where they stopped
    nnenv.train(ds2d, "2d", 0, TRAINER, "--c", SELFREG_TEST_EPOCHS="3")
    ckpt = _checkpoint(fold)
    assert ckpt["current_epoch"] == 3
    assert len(ckpt["logging"]["selfreg_scr"]) == 3 == len(ckpt["logging"]["train_losses"])
    assert ckpt["logging"]["selfreg_scr"][:2] == first_two and np.isfinite(ckpt["logging"]["selfreg_scr"][2])

    # validation only
    (fold / "validation" / "summary.json").unlink()
    nnenv.train(ds2d, "2d", 0, TRAINER, "--val", SELFREG_TEST_EPOCHS="3")
    assert (fold / "validation" / "summary.json").is_file()

    # prediction through the stock nnUNetv2_predict
    inp = tmp_path / "in"
    inp.mkdir()
    for case in ("case_000", "case_001"):
        (inp / f"{case}_0000.png").symlink_to(
            nnenv.raw / "Dataset901_SelfRegSynthetic" / "imagesTr" / f"{case}_0000.png"
        )
    out = tmp_path / "out"
    nnenv.predict(inp, out, ds2d, "2d", TRAINER, 0)
    for case in ("case_000", "case_001"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.png")))
        assert seg.shape == (64, 64)
        assert set(np.unique(seg)) <= {0, 1, 2}


@pytest.mark.cli_e2e
def test_3d_anisotropic_train_and_predict(nnenv, ds3d, tmp_path):
    nnenv.train(ds3d, "3d_fullres", 0, TRAINER, SELFREG_TEST_EPOCHS="1", SELFREG_TEST_ITERS="2")
    fold = nnenv.model_folder(ds3d, TRAINER, "3d_fullres") / "fold_0"
    ckpt = _checkpoint(fold)
    assert len(ckpt["logging"]["selfreg_scr"]) == 1 and np.isfinite(ckpt["logging"]["selfreg_scr"][0])
    plans = json.loads((fold.parent / "plans.json").read_text())
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    assert any(len(set(s)) > 1 for s in strides), "expected anisotropic pooling in the 3D plans"
    inp = tmp_path / "in"
    inp.mkdir()
    src = nnenv.raw / "Dataset902_SelfRegSynthetic" / "imagesTr" / "case_000_0000.nii.gz"
    (inp / src.name).symlink_to(src)
    out = tmp_path / "out"
    nnenv.predict(inp, out, ds3d, "3d_fullres", TRAINER, 0)
    pred = sitk.ReadImage(str(out / "case_000.nii.gz"))
    assert pred.GetSize() == (40, 40, 16)
    assert np.allclose(pred.GetSpacing(), (1.0, 1.0, 2.5))


def test_discovery_with_and_without_a_users_own_folder(nnenv):
    probe = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    a = f('nnUNetTrainerSelfReg_1epoch'); b = f('nnUNetTrainerSelfRegTiny')\n"
        "from nnunet_selfreg.trainers import nnUNetTrainerSelfReg_1epoch, nnUNetTrainerSelfReg\n"
        "assert a is nnUNetTrainerSelfReg_1epoch and issubclass(b, nnUNetTrainerSelfReg)\n"
        "print('OK', a.__module__)\n"
    )
    out = nnenv.run("python", "-c", probe)  # user's folder listed: ours is appended beside it
    assert "OK nnunet_selfreg.trainers" in out.stdout
    env_without = nnenv.env()
    del env_without["nnUNet_extTrainer"]
    import subprocess
    import sys

    probe_ours = probe.replace("; b = f('nnUNetTrainerSelfRegTiny')", "").replace(
        " and issubclass(b, nnUNetTrainerSelfReg)", ""
    )
    proc = subprocess.run([sys.executable, "-c", probe_ours], env=env_without, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_doctor_reports_working_discovery(nnenv):
    out = nnenv.run("nnunet-selfreg", "doctor")
    assert "nnU-Net finds nnUNetTrainerSelfReg: yes" in out.stdout
    assert "everything looks fine" in out.stdout
