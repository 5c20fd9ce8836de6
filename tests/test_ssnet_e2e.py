"""SS-Net end to end through nnU-Net's own CLIs on a small semi-supervised dataset."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import torch

TRAINER = "nnUNetTrainerSSNetTiny"  # tests/ext_trainers: nnUNetTrainerSSNet with a tiny budget


def _checkpoint(folder):
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def test_ssnet_train_continue_validate_predict(nnenv, semisup2d, tmp_path):
    nnenv.train(semisup2d, "2d", 0, TRAINER)
    ds_name = next(nnenv.preprocessed.glob(f"Dataset{semisup2d}_*")).name
    splits = json.loads((nnenv.preprocessed / ds_name / "splits_final.json").read_text())
    unlabeled = {f"scan{i:02d}" for i in range(6)}
    assert len(splits) == 5
    assert all(unlabeled <= set(s["train"]) and not unlabeled & set(s["val"]) for s in splits)
    assert sorted(k for s in splits for k in s["val"]) == [f"case_{i:03d}" for i in range(10)]

    fold = nnenv.model_folder(semisup2d, TRAINER, "2d") / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Fold 0: 8 labelled + 6 unlabelled training cases, 2 labelled validation cases" in log
    assert "SS-Net: batch " in log and log.count("SS-Net epoch means: sup") == 2
    ckpt = _checkpoint(fold)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 2
    state = ckpt["ssnet"]
    assert state["iteration"] == 6 and any(k.startswith("projection.") for k in state["heads"])
    assert len(state["memory"]["bank"]) == 3
    for key in ("ssnet_sup", "ssnet_lds", "ssnet_cs_labeled", "ssnet_cs_unlabeled", "ssnet_weight"):
        values = ckpt["logging"][key]
        assert len(values) == 2 and np.all(np.isfinite(values)), key
    assert all(v > 0 for v in ckpt["logging"]["ssnet_lds"]) and all(v > 0 for v in ckpt["logging"]["ssnet_sup"])
    assert ckpt["logging"]["ssnet_weight"][1] > ckpt["logging"]["ssnet_weight"][0]
    assert not any(k.startswith(("projection", "selectors")) for k in ckpt["network_weights"]), "heads leaked"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    validated = {c["prediction_file"].split("/")[-1] for c in summary["metric_per_case"]}
    assert validated and validated <= {f"case_{i:03d}.png" for i in range(10)}

    # continue: heads, memory and the ramp-up go on where they stopped
    heads_before = state["heads"]
    nnenv.train(semisup2d, "2d", 0, TRAINER, "--c", SELFREG_TEST_EPOCHS="3")
    ckpt = _checkpoint(fold)
    assert ckpt["current_epoch"] == 3 and ckpt["ssnet"]["iteration"] == 9
    assert len(ckpt["logging"]["ssnet_lds"]) == 3
    assert any(not torch.equal(heads_before[k], v) for k, v in ckpt["ssnet"]["heads"].items()), "heads not trained"

    # stock nnUNetv2_predict (loads the network weights strictly)
    inp = tmp_path / "in"
    inp.mkdir()
    src = nnenv.raw / ds_name / "imagesTr"
    for case in ("case_000", "scan00"):
        (inp / f"{case}_0000.png").symlink_to(src / f"{case}_0000.png")
    out = tmp_path / "out"
    nnenv.predict(inp, out, semisup2d, "2d", TRAINER, 0)
    for case in ("case_000", "scan00"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.png")))
        assert seg.shape == (64, 64) and set(np.unique(seg)) <= {0, 1, 2}
