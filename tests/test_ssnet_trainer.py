"""nnUNetTrainerSSNet in-process on a real preprocessed semi-supervised dataset."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from nnunet_selfreg.data.semisupervised import SemiSupervisedDataError
from nnunet_selfreg.trainers import nnUNetTrainer_LabeledOnly, nnUNetTrainerSSNet, nnUNetTrainerSSNet_FullRampup
from tests.harness import small_2d_plans


class _SeededSSNet(nnUNetTrainerSSNet):
    """SS-Net whose data and augmentation draw from per-epoch seeds (nnU-Net itself does not seed)."""

    def on_epoch_start(self):
        seed = 4242 + self.current_epoch
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().on_epoch_start()


def make_trainer(env, dataset_id: int, cls=_SeededSSNet, fold: int = 0, **attrs):
    """In-process trainer on 32x32 patches with a narrow 4-stage network (fast on a CPU)."""
    plans, dataset_json = small_2d_plans(next(env.preprocessed.glob(f"Dataset{dataset_id:03d}_*")))
    trainer = cls(plans, "2d", fold, dataset_json, torch.device("cpu"))
    trainer.num_iterations_per_epoch = 2
    trainer.num_val_iterations_per_epoch = 1
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


@pytest.fixture
def in_process(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # data drawn in this process: seedable
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order
    yield nnunet_paths
    torch.set_num_threads(threads)


def _epoch(t: nnUNetTrainerSSNet) -> list[dict]:
    t.on_epoch_start()
    t.on_train_epoch_start()
    outputs = [t.train_step(next(t.dataloader_train)) for _ in range(t.num_iterations_per_epoch)]
    t.on_train_epoch_end(outputs)
    return outputs


def _state(t: nnUNetTrainerSSNet) -> dict[str, torch.Tensor]:
    state = {f"net.{k}": v for k, v in t.network.state_dict().items()}
    state |= {f"heads.{k}": v for k, v in t.ssnet_heads.state_dict().items()}
    state |= {f"memory.{i}": b for i, b in enumerate(t.ssnet_memory.bank) if b is not None}
    for i, s in t.optimizer.state_dict()["state"].items():
        state |= {f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return state


def test_mixed_batches_terms_and_exact_resume(in_process, semisup2d, tmp_path):
    a = make_trainer(in_process, semisup2d, ssnet_rampup_length=0)  # full weight at once
    a.on_train_start()
    assert a.ssnet_num_labeled == 1 and a.batch_size == 2
    batch = next(a.dataloader_train)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    ignore = a.label_manager.ignore_label
    assert (target[:1] != ignore).all(), "labelled patches come first, without ignore pixels"
    # then the unlabelled patches: ignore label, except where the patch reaches past the image border
    # (nnU-Net pads segmentations as background there)
    assert (target[1:] == ignore).any() and set(target[1:].unique().tolist()) <= {0.0, float(ignore)}

    outputs = _epoch(a)
    terms = np.stack([o["ssnet"] for o in outputs])
    assert np.isfinite(terms).all() and (terms[:, 1] > 0).all(), "L_lds must be positive"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.ssnet_heads.projection.parameters())
    ckpt = tmp_path / "epoch0.pth"
    a.save_checkpoint(str(ckpt))
    a.current_epoch += 1
    _epoch(a)
    after_two = {k: v.clone() for k, v in _state(a).items()}
    a.on_train_end()

    b = make_trainer(in_process, semisup2d, ssnet_rampup_length=0)
    b.load_checkpoint(str(ckpt))
    b.on_train_start()
    assert b.current_epoch == 1 and b.ssnet_iteration() == 2
    _epoch(b)
    resumed = _state(b)
    b.on_train_end()
    assert resumed.keys() == after_two.keys()
    differing = [k for k, v in after_two.items() if not torch.equal(v, resumed[k])]
    assert not differing, f"resumed run differs in {differing[:5]}"


def test_labeled_only_splits_and_refusals(in_process, semisup2d, ds2d):
    base = make_trainer(in_process, semisup2d, cls=nnUNetTrainer_LabeledOnly, fold=1)
    tr, val = base.do_split()
    assert len(tr) == 8 and len(val) == 2 and not any(k.startswith("scan") for k in tr + val)

    ssnet = make_trainer(in_process, semisup2d, fold=1)
    tr, val = ssnet.do_split()
    assert len(tr) == 14 and sum(k.startswith("scan") for k in tr) == 6 and set(val) == set(base.do_split()[1])

    with pytest.raises(SemiSupervisedDataError, match="needs unlabelled cases.*add-unlabeled"):
        make_trainer(in_process, ds2d).do_split()
    with pytest.raises(ValueError, match="ssnet_labeled_fraction"):
        make_trainer(in_process, semisup2d, ssnet_labeled_fraction=1.0).initialize()
    with pytest.raises(ValueError, match="ssnet_batch_size_factor"):
        make_trainer(in_process, semisup2d, ssnet_batch_size_factor=0.5).initialize()
    doubled = make_trainer(in_process, semisup2d, ssnet_batch_size_factor=2.0)
    doubled.initialize()  # nnU-Net's batch of 2 labelled patches plus 2 unlabelled ones
    assert doubled.batch_size == 4 and doubled.ssnet_num_labeled == 2
    with pytest.raises(SemiSupervisedDataError, match="fold 7 is not in"):
        make_trainer(in_process, semisup2d, fold=7).do_split()


def test_rampup_over_the_reference_unit_or_the_whole_run(in_process, semisup2d):
    t = make_trainer(in_process, semisup2d, num_epochs=10, num_iterations_per_epoch=40)
    t.current_epoch, t._ssnet_step = 9, 39  # the last of 400 iterations
    assert t.ssnet_rampup_step_iterations() == 150
    assert t.ssnet_weight() == pytest.approx(0.1 * math.exp(-5 * (1 - 2 / 200) ** 2))  # t = 399 // 150 = 2
    full = make_trainer(in_process, semisup2d, cls=nnUNetTrainerSSNet_FullRampup, num_epochs=10)
    full.num_iterations_per_epoch = 40
    full.current_epoch, full._ssnet_step = 9, 39
    assert full.ssnet_rampup_step_iterations() == 2  # 400 iterations / 200 units
    assert full.ssnet_weight() == pytest.approx(0.1 * math.exp(-5 * (1 - 199 / 200) ** 2))
    with pytest.raises(ValueError, match="ssnet_rampup_fraction"):
        make_trainer(in_process, semisup2d, ssnet_rampup_fraction=1.5)._check_hyperparameters()


def test_3d_train_step_on_anisotropic_plans(in_process, ds3d):
    """One SS-Net step on nnU-Net's anisotropic 3d_fullres plans (labelled + unlabelled patch)."""
    import json

    import torch.nn.functional as F

    from nnunet_selfreg.taps import finest_decoder_stage

    pre = next(in_process.preprocessed.glob(f"Dataset{ds3d:03d}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    dataset_json = json.loads((pre / "dataset.json").read_text())
    t = nnUNetTrainerSSNet(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert t.ssnet_vat_eps == 10.0 and t.ssnet_consistency == 1.0 and t.ssnet_rampup_length == 40
    t.initialize()
    t.ssnet_tap.attach(finest_decoder_stage(t.network)[0])  # what on_train_start does
    patch = [int(p) for p in t.configuration_manager.patch_size]
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 3, (t.batch_size, 1, *[max(1, p // 4) for p in patch]), generator=g).float()
    seg = F.interpolate(seg, size=patch, mode="nearest")
    target = [
        F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc, strict=True)])
        for sc in t._get_deep_supervision_scales()
    ]
    out = t.train_step({"data": torch.randn(t.batch_size, 1, *patch, generator=g), "target": target})
    assert np.isfinite(out["loss"]) and np.isfinite(out["ssnet"]).all() and out["ssnet"][1] > 0
    t.ssnet_tap.detach()
