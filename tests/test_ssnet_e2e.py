"""SS-Net end to end through nnU-Net's own CLIs on a small semi-supervised dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

TRAINER = "nnUNetTrainerSSNetTiny"  # tests/ext_trainers: nnUNetTrainerSSNet with a tiny budget
ITERS = "10"  # iterations per epoch: 2 + 1 epochs, enough to beat an untrained network clearly


def _checkpoint(folder):
    return torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)


def _mean_foreground_dice(nnenv, dataset_id: int, cases: list[str], weights: dict | None) -> float:
    """Mean Dice over classes 1, 2 and ``cases`` of nnU-Net's sliding-window prediction with ``weights``.

    ``weights=None``: the network as nnU-Net initialises it (seeded), i.e. untrained.
    """
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = next(nnenv.preprocessed.glob(f"Dataset{dataset_id}_*"))
    plans = PlansManager(str(pre / "nnUNetPlans.json"))
    config = plans.get_configuration("2d")
    dataset_json = json.loads((pre / "dataset.json").read_text())
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(plans, config, 1, heads, enable_deep_supervision=False)
    if weights is not None:
        net.load_state_dict(weights)
    predictor = nnUNetPredictor(
        use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(net, plans, config, [net.state_dict()], dataset_json, "nnUNetTrainer", None)
    raw, io = nnenv.raw / pre.name, NaturalImage2DIO()
    dice = []
    for case in cases:
        image, props = io.read_images([str(raw / "imagesTr" / f"{case}_0000.png")])
        pred = np.asarray(predictor.predict_single_npy_array(image, props)).squeeze()
        ref = io.read_seg(str(raw / "labelsTr" / f"{case}.png"))[0].squeeze()
        for c in (1, 2):
            p, r = pred == c, ref == c
            if p.any() or r.any():
                dice.append(2 * (p & r).sum() / (p.sum() + r.sum()))
    return float(np.mean(dice))


@pytest.mark.cli_e2e
def test_ssnet_train_continue_validate_predict(nnenv, semisup2d, tmp_path):
    nnenv.train(semisup2d, "2d", 0, TRAINER, SELFREG_TEST_ITERS=ITERS)
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
    assert state["iteration"] == 20 and any(k.startswith("projection.") for k in state["heads"])
    # the memory was filled from correctly predicted labelled foreground (background never)
    bank = state["memory"]["bank"]
    assert bank[0] is None
    filled = [b for b in bank[1:] if b is not None]
    assert filled and all(2 <= b.shape[0] <= 32 and b.shape[1] == 32 and torch.isfinite(b).all() for b in filled)
    for key in ("ssnet_sup", "ssnet_lds", "ssnet_cs_labeled", "ssnet_cs_unlabeled", "ssnet_weight"):
        values = ckpt["logging"][key]
        assert len(values) == 2 and np.all(np.isfinite(values)), key
    assert all(v > 0 for v in ckpt["logging"]["ssnet_lds"])
    # nnU-Net's loss is CE + (-soft Dice) with deep-supervision weights summing to 1: it is >= -1, and it is
    # negative once the soft Dice exceeds the CE (a clean run on 2026-12-03 logged 0.774 then -0.034)
    assert all(-1.0 <= v < 5.0 for v in ckpt["logging"]["ssnet_sup"])
    assert ckpt["logging"]["ssnet_weight"][1] > ckpt["logging"]["ssnet_weight"][0]
    assert not any(k.startswith(("projection", "selectors")) for k in ckpt["network_weights"]), "heads leaked"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    validated = {c["prediction_file"].split("/")[-1] for c in summary["metric_per_case"]}
    assert validated and validated <= {f"case_{i:03d}.png" for i in range(10)}

    # continue: heads, memory and the ramp-up go on where they stopped
    heads_before = state["heads"]
    nnenv.train(semisup2d, "2d", 0, TRAINER, "--c", SELFREG_TEST_EPOCHS="3", SELFREG_TEST_ITERS=ITERS)
    ckpt = _checkpoint(fold)
    assert ckpt["current_epoch"] == 3 and ckpt["ssnet"]["iteration"] == 30
    assert len(ckpt["logging"]["ssnet_lds"]) == 3
    assert any(not torch.equal(heads_before[k], v) for k, v in ckpt["ssnet"]["heads"].items()), "heads not trained"

    # the trained network segments the fold's validation cases better than the same network untrained
    val = splits[0]["val"]
    trained = _mean_foreground_dice(nnenv, semisup2d, val, ckpt["network_weights"])
    untrained = _mean_foreground_dice(nnenv, semisup2d, val, None)
    assert trained > untrained + 0.2, (trained, untrained)  # 0.52-0.74 vs 0.119 in three runs (2026-12-03)

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
