"""nnUNetTrainerSSNet in-process on a real preprocessed semi-supervised dataset."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nnunet_selfreg.data.semisupervised import SemiSupervisedDataError
from nnunet_selfreg.trainers import nnUNetTrainer_LabeledOnly, nnUNetTrainerSSNet
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
    assert (target[1:] == ignore).all(), "then unlabelled patches: ignore label everywhere"

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
    with pytest.raises(SemiSupervisedDataError, match="fold 7 is not in"):
        make_trainer(in_process, semisup2d, fold=7).do_split()
