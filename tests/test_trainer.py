"""nnUNetTrainerSelfReg in-process on a real preprocessed dataset: checkpoints, hooks, early errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.taps import UnsupportedArchitectureError
from nnunet_selfreg.trainers import (
    nnUNetTrainerSelfReg,
    nnUNetTrainerSelfReg_IFDOnly,
    nnUNetTrainerSelfReg_RelativeLambda,
    nnUNetTrainerSelfReg_SCROnly,
)


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


def _one_step_inputs(t):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t.num_input_channels, *t.configuration_manager.patch_size, generator=g)
    t.network.train()
    with torch.no_grad():
        shapes = [o.shape for o in t.network(x)]
    t.selfreg_taps.clear()
    n = t.label_manager.num_segmentation_heads
    target = [torch.randint(0, n, (s[0], 1, *s[2:]), generator=g).float() for s in shapes]
    return x, target


@pytest.mark.parametrize(
    ("cls", "attrs", "use", "lam"),
    [
        (nnUNetTrainerSelfReg, {}, (True, True), (0.015, 0.015)),
        (nnUNetTrainerSelfReg_SCROnly, {}, (True, False), (0.015, 0.0)),
        (nnUNetTrainerSelfReg_IFDOnly, {}, (False, True), (0.0, 0.015)),
        (nnUNetTrainerSelfReg_RelativeLambda, {}, (True, True), (0.03, 0.03)),
        (nnUNetTrainerSelfReg, {"selfreg_lambda_scr": 0.02, "selfreg_lambda_ifd": 0.004}, (True, True), (0.02, 0.004)),
        (nnUNetTrainerSelfReg, {"selfreg_ifd_detach_first_half": True}, (True, True), (0.015, 0.015)),
        (nnUNetTrainerSelfReg, {"selfreg_tap_first_encoder": True}, (True, True), (0.015, 0.015)),
    ],
)
def test_variants_and_options_reach_the_loss(single_process_da, ds2d, cls, attrs, use, lam):
    t = make_trainer(single_process_da, ds2d, cls=cls, fold=3, **attrs)
    t.initialize()
    t.selfreg_taps.attach(t.network)
    reg = t.loss.regularizer
    assert (reg.use_scr, reg.use_ifd) == use
    assert reg.detach_first_half == attrs.get("selfreg_ifd_detach_first_half", False)
    assert reg.include_first_encoder == attrs.get("selfreg_tap_first_encoder", False)
    x, target = _one_step_inputs(t)
    state = t.loss.generator.get_state()
    loss = t.loss(t.network(x), target)
    # the same step computed independently: nnU-Net's loss + λ_SCR·SCR + λ_IFD·(IFD_enc + IFD_dec)
    from nnunet_selfreg.losses import SelfRegRegularizer

    out = t.network(x)
    enc, dec = t.selfreg_taps.pop()
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    terms = SelfRegRegularizer(*use, include_first_encoder=attrs.get("selfreg_tap_first_encoder", False))(
        enc, dec, generator=g
    )
    expected = t.loss.seg_loss(out, target) + lam[0] * terms["scr"] + lam[1] * (terms["ifd_enc"] + terms["ifd_dec"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    t.selfreg_taps.detach()


class _FrozenStageTrainer(nnUNetTrainerSelfReg):
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network.encoder.stages[1].eval()  # a common way to "freeze" a stage; it would silence the taps


def test_stage_in_eval_mode_stops_training_with_a_clear_error(single_process_da, ds2d):
    from nnunet_selfreg.taps import IncompleteFeaturesError

    t = make_trainer(single_process_da, ds2d, cls=_FrozenStageTrainer, fold=4)
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    with pytest.raises(IncompleteFeaturesError, match="requires_grad_"):
        t.train_step(next(t.dataloader_train))
    t.on_train_end()
