"""nnUNetTrainerSelfReg in-process on a real preprocessed dataset: checkpoints, hooks, early errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.taps import UnsupportedArchitectureError
from nnunet_selfreg.trainers import nnUNetTrainerSelfReg, nnUNetTrainerSelfReg_SCROnly


def make_trainer(env, dataset_id: int, cls=nnUNetTrainerSelfReg, fold: int = 1, **attrs):
    ds = next(env.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((ds / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((ds / "dataset.json").read_text())
    trainer = cls(plans, "2d", fold, dataset_json, torch.device("cpu"))
    trainer.num_iterations_per_epoch = 1
    trainer.num_val_iterations_per_epoch = 1
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


def n_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


@pytest.fixture
def single_process_da(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return nnunet_paths


def test_checkpoint_is_stock_and_hooks_are_gone_after_training(single_process_da, ds2d):
    t = make_trainer(single_process_da, ds2d)
    t.on_train_start()
    stages = t.selfreg_taps.num_encoder_stages + t.selfreg_taps.num_decoder_stages
    assert n_hooks(t.network) == stages
    t.on_epoch_start()
    t.on_train_epoch_start()
    out = t.train_step(next(t.dataloader_train))
    assert math.isfinite(float(out["loss"]))
    assert not t.selfreg_taps._encoder and not t.selfreg_taps._decoder  # released after the step
    t.on_train_epoch_end([out])
    assert len(t.logger.get_value("selfreg_scr", step=None)) == 1
    t.on_train_end()
    assert n_hooks(t.network) == 0

    ckpt = torch.load(f"{t.output_folder}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    stock = nnUNetTrainer.build_network_architecture(
        t.plans_manager, t.configuration_manager, t.num_input_channels, t.label_manager.num_segmentation_heads, False
    )
    stock.load_state_dict(ckpt["network_weights"], strict=True)
    t.set_deep_supervision_enabled(False)
    t.network.eval()
    stock.eval()
    x = torch.randn(2, t.num_input_channels, *t.configuration_manager.patch_size)
    with torch.no_grad():
        assert torch.equal(stock(x), t.network(x))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-0.1, ValueError, ">= 0"),
        (float("nan"), ValueError, "finite"),
        ("0.1", TypeError, "number"),
        (True, TypeError, "number"),
    ],
)
def test_bad_lambda_fails_before_any_data_is_loaded(single_process_da, ds2d, value, error, match):
    t = make_trainer(single_process_da, ds2d, selfreg_lambda=value)
    with pytest.raises(error, match=match):
        t.on_train_start()
    assert t.dataloader_train is None


class _CustomNetTrainer(nnUNetTrainerSelfReg):
    @staticmethod
    def build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision=True
    ):
        return torch.nn.Sequential(torch.nn.Conv2d(num_input_channels, num_output_channels, 3, padding=1))


def test_custom_network_gets_a_clear_error_before_data(single_process_da, ds2d):
    t = make_trainer(single_process_da, ds2d, cls=_CustomNetTrainer)
    with pytest.raises(UnsupportedArchitectureError, match="PlainConvUNet"):
        t.on_train_start()
    assert t.dataloader_train is None


def test_scr_only_logs_its_own_curves(single_process_da, ds2d):
    t = make_trainer(single_process_da, ds2d, cls=nnUNetTrainerSelfReg_SCROnly, fold=2)
    t.initialize()
    keys = t.logger.local_logger.extra_keys
    assert "selfreg_scr" in keys and "selfreg_ifd_enc" not in keys
