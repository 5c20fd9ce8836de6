"""SelfReg and SS-Net trained end to end on the other networks nnU-Net can build, through the real CLIs.

``nnUNetResEncUNetMPlans`` comes from nnU-Net's own ResEnc planner; ``ResidualUNet`` (residual blocks in the
decoder too) has no planner in nnU-Net, so it gets the one thing a user would write: a plans file whose
``network_class_name`` names it, reusing the ResEnc plans' preprocessed data. Primus needs a patch that is a
multiple of its 8x8x8 tokens, so its run uses a copy of the 3D plans with a 16x32x32 patch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

RESENC = "nnUNetResEncUNetMPlans"
RESUNET = "nnUNetResUNetPlansTest"
SELFREG = "nnUNetTrainerSelfRegTiny"
SSNET = "nnUNetTrainerSSNetTiny"
PRIMUS = "nnUNet_Primus_S_TrainerSelfRegTiny"
PRIMUS_PLANS = "nnUNetPlansPrimusTest"
BUDGET = {"SELFREG_TEST_EPOCHS": "1", "SELFREG_TEST_ITERS": "3"}

pytestmark = pytest.mark.cli_e2e


def _resenc_plans(nnenv, dataset_id: int) -> str:
    """Plan and preprocess ``dataset_id`` with nnU-Net's ResEnc M planner and add a ResidualUNet copy."""
    nnenv.plan_and_preprocess(dataset_id, ("2d",), "-pl", "nnUNetPlannerResEncM")
    folder = next(nnenv.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((folder / f"{RESENC}.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith(".ResidualEncoderUNet")
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualUNet"
    plans["plans_name"] = RESUNET
    (folder / f"{RESUNET}.json").write_text(json.dumps(plans, indent=1))
    return RESENC


@pytest.fixture(scope="module")
def resenc2d(nnenv, ds2d) -> int:
    _resenc_plans(nnenv, ds2d)
    return ds2d


@pytest.fixture(scope="module")
def resenc_semisup2d(nnenv, semisup2d) -> int:
    _resenc_plans(nnenv, semisup2d)
    return semisup2d


def _fold(nnenv, dataset_id: int, trainer: str, plans: str):
    fold = nnenv.model_folder(dataset_id, trainer, "2d", plans) / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return fold, log, ckpt


def _stock_keys(fold, configuration: str = "2d", trainer=None) -> set[str]:
    """The parameter and buffer names of the network nnU-Net's own ``trainer`` builds from these plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(fold.parent / "plans.json"))
    net = (trainer or nnUNetTrainer).build_network_architecture(
        manager, manager.get_configuration(configuration), 1, 3, True
    )
    return set(net.state_dict())


def _predict_one(nnenv, dataset_id: int, case: Path, configuration: str, trainer: str, plans: str, out: Path):
    inp = out.parent / f"{out.name}_in"
    inp.mkdir()
    (inp / case.name).symlink_to(case)
    nnenv.run(
        "nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(dataset_id), "-c", configuration, "-f", "0",
        "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
    )  # fmt: skip
    return sitk.ReadImage(str(next(out.glob("case_000.*"))))


@pytest.mark.parametrize(("plans", "arch"), [(RESENC, "ResidualEncoderUNet"), (RESUNET, "ResidualUNet")])
def test_selfreg_trains_and_predicts_on_residual_unets(nnenv, resenc2d, plans, arch, tmp_path):
    nnenv.train(resenc2d, "2d", 0, SELFREG, "-p", plans, **BUDGET)
    fold, log, ckpt = _fold(nnenv, resenc2d, SELFREG, plans)
    line = next(ln for ln in log.splitlines() if "SelfReg: lambda=" in ln)
    assert f"network {arch}: students e_2..e_" in line and "teacher F_final = d_" in line
    for key in ("selfreg_scr", "selfreg_ifd_enc", "selfreg_ifd_dec"):
        values = ckpt["logging"][key]
        assert len(values) == 1 and np.isfinite(values[0]) and values[0] > 0, (key, values)
    # the checkpoint is a plain nnU-Net one for these plans: same names, nothing of ours added
    assert set(ckpt["network_weights"]) == _stock_keys(fold)

    case = next(nnenv.raw.glob(f"Dataset{resenc2d:03d}_*")) / "imagesTr" / "case_000_0000.png"
    seg = sitk.GetArrayFromImage(_predict_one(nnenv, resenc2d, case, "2d", SELFREG, plans, tmp_path / "out"))
    assert seg.shape == (64, 64) and set(np.unique(seg)) <= {0, 1, 2}


def test_ssnet_trains_on_the_resenc_unet(nnenv, resenc_semisup2d):
    nnenv.train(resenc_semisup2d, "2d", 0, SSNET, "-p", RESENC, **BUDGET)
    fold, log, ckpt = _fold(nnenv, resenc_semisup2d, SSNET, RESENC)
    assert "unlabelled training cases" in log and log.count("SS-Net epoch means: sup") == 1
    assert any(k.startswith("projection.") for k in ckpt["ssnet"]["heads"])
    for key in ("ssnet_sup", "ssnet_lds", "ssnet_cs_labeled", "ssnet_cs_unlabeled"):
        values = ckpt["logging"][key]
        assert len(values) == 1 and np.isfinite(values[0]), (key, values)
    assert ckpt["logging"]["ssnet_lds"][0] > 0
    # the heads stay out of the network's weights: a plain ResEnc checkpoint
    assert set(ckpt["network_weights"]) == _stock_keys(fold)


def test_primus_selfreg_trains_and_predicts_through_the_clis(nnenv, ds3d, tmp_path):
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer

    folder = next(nnenv.preprocessed.glob(f"Dataset{ds3d:03d}_*"))
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PRIMUS_PLANS
    plans["configurations"]["3d_fullres"]["patch_size"] = [16, 32, 32]
    (folder / f"{PRIMUS_PLANS}.json").write_text(json.dumps(plans, indent=1))

    nnenv.train(ds3d, "3d_fullres", 0, PRIMUS, "-p", PRIMUS_PLANS, **BUDGET)
    fold = nnenv.model_folder(ds3d, PRIMUS, "3d_fullres", PRIMUS_PLANS) / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    line = next(ln for ln in log.splitlines() if "SelfReg: lambda=" in ln)
    assert "SelfReg: lambda=0.01 " in line and "Primus" in line
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for key in ("selfreg_scr", "selfreg_ifd_enc"):
        values = ckpt["logging"][key]
        assert len(values) == 1 and np.isfinite(values[0]) and values[0] > 0, (key, values)
    assert ckpt["logging"]["selfreg_ifd_dec"] == [0.0]  # Primus has no decoder student
    assert set(ckpt["network_weights"]) == _stock_keys(fold, "3d_fullres", nnUNet_Primus_S_Trainer)

    case = next(nnenv.raw.glob(f"Dataset{ds3d:03d}_*")) / "imagesTr" / "case_000_0000.nii.gz"
    pred = _predict_one(nnenv, ds3d, case, "3d_fullres", PRIMUS, PRIMUS_PLANS, tmp_path / "out")
    assert pred.GetSize() == (40, 40, 16) and np.allclose(pred.GetSpacing(), (1.0, 1.0, 2.5))
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
