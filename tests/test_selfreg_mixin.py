"""SelfReg as a mixin on other nnU-Net trainers and architectures: a stock variant and Primus, in-process."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)

from nnunet_selfreg import SelfRegMixin
from nnunet_selfreg.trainers import nnUNet_Primus_S_TrainerSelfReg
from tests.test_trainer import n_hooks


class _NoMirroringSelfReg(SelfRegMixin, nnUNetTrainerNoMirroring):
    """All a user writes to get SelfReg on an nnU-Net trainer variant."""


@pytest.fixture
def single_process_da(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return nnunet_paths


def _trainer(env, dataset_id: int, cls, configuration: str, patch_size=None):
    ds = next(env.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((ds / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    if patch_size is not None:
        plans["configurations"][configuration]["patch_size"] = list(patch_size)
    dataset_json = json.loads((ds / "dataset.json").read_text())
    trainer = cls(plans, configuration, 0, dataset_json, torch.device("cpu"))
    trainer.num_iterations_per_epoch = 1
    trainer.num_val_iterations_per_epoch = 1
    return trainer


def _one_epoch(t) -> dict:
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    out = t.train_step(next(t.dataloader_train))
    t.on_train_epoch_end([out])
    return {k: t.logger.get_value(k, step=None)[-1] for k in ("selfreg_scr", "selfreg_ifd_enc", "selfreg_weighted")}


def test_mixin_on_a_stock_variant_keeps_the_variant_and_adds_selfreg(single_process_da, ds2d):
    t = _trainer(single_process_da, ds2d, _NoMirroringSelfReg, "2d")
    assert [c.__name__ for c in type(t).__mro__[1:3]] == ["SelfRegMixin", "nnUNetTrainerNoMirroring"]
    logged = _one_epoch(t)
    assert all(math.isfinite(v) and v > 0 for v in logged.values())
    ifd_dec = t.logger.get_value("selfreg_ifd_dec", step=None)[-1]
    expected = 0.015 * (logged["selfreg_scr"] + logged["selfreg_ifd_enc"] + ifd_dec)
    assert logged["selfreg_weighted"] == pytest.approx(expected, rel=1e-5)
    assert t.inference_allowed_mirroring_axes is None  # the variant's own behaviour is kept
    hooks = n_hooks(t.network)
    assert hooks == len(t.selfreg_taps.points.encoder) + len(t.selfreg_taps.points.decoder)
    t.on_train_end()
    assert n_hooks(t.network) == 0


def test_primus_selfreg_trains_on_token_maps(single_process_da, ds3d):
    t = _trainer(single_process_da, ds3d, nnUNet_Primus_S_TrainerSelfReg, "3d_fullres", patch_size=(16, 32, 32))
    assert t.selfreg_lambda == 0.010
    logged = _one_epoch(t)
    assert all(math.isfinite(v) and v > 0 for v in logged.values())
    assert t.logger.get_value("selfreg_ifd_dec", step=None)[-1] == 0  # no decoder student: the teacher only
    t.on_train_end()
    assert n_hooks(t.network) == 0
