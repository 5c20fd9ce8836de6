"""nnUNetTrainerSSNet in-process on a real preprocessed semi-supervised dataset."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_selfreg.data.mixed_batches import MixedBatchDataLoader, stock_forced_foreground
from nnunet_selfreg.data.semisupervised import SemiSupervisedDataError
from nnunet_selfreg.losses.vat import VAT_DISTANCES, virtual_adversarial_loss
from nnunet_selfreg.sweep.preemption import StopControl, install_trainer_hooks
from nnunet_selfreg.taps import finest_decoder_stage
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
    install_trainer_hooks(b, StopControl(), None)  # sweep's hooks: every checkpoint is written atomically
    b.save_checkpoint(str(tmp_path / "hooked.pth"))
    entry = torch.load(tmp_path / "hooked.pth", map_location="cpu", weights_only=False)["ssnet"]
    assert all(torch.equal(v, resumed[f"heads.{k}"].cpu()) for k, v in entry["heads"].items())
    assert entry["iteration"] == b.ssnet_iteration() and not list(tmp_path.glob(".*partial*"))
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
    for name, value in (
        ("ssnet_vat_distance", "l2"),
        ("ssnet_vat_init", "normal"),
        ("ssnet_memory_keep", "best"),
        ("ssnet_memory_weights", "uniform"),
        ("ssnet_memory_scoring", "train"),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be one of \(.*\), got '{value}'"):
            make_trainer(in_process, semisup2d, **{name: value})._check_hyperparameters()


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
    assert t.ssnet_vat_distance == "binary_dice"  # the reference's 3D VAT distance
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


# ----------------------------------------------------------------------------- foreground oversampling
def _fake_loader(cls, batch_size: int, percent: float = 0.33, probabilistic: bool = False, **kwargs):
    """A loader whose oversampling rule can be queried without data (nnU-Net's constructor only stores them)."""
    data = SimpleNamespace(identifiers=[f"c{i}" for i in range(8)])
    labels = SimpleNamespace(all_labels=[0, 1, 2], has_ignore_label=True)
    return cls(data, batch_size, (8, 8), (8, 8), labels, percent, None, None, probabilistic, None, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 12])
def test_stock_forced_foreground_is_nnunets_rule(batch_size):
    stock = _fake_loader(nnUNetDataLoader, batch_size)
    assert stock_forced_foreground(batch_size, 0.33) == sum(stock.get_do_oversample(j) for j in range(batch_size))


@pytest.mark.parametrize(
    ("num_labeled", "batch_size", "reference", "share"),
    [
        (1, 2, 2, 1 / 2),  # SS-Net at nnU-Net's batch 2: 1 labelled patch, forced half of the time
        (2, 4, 2, 1 / 2),  # ssnet_batch_size_factor 2: 2 labelled patches, one always forced
        (3, 4, 2, 1 / 2),  # 1.5 per batch: one always, a second one half of the time
        (2, 4, 3, 1 / 3),  # stock batch 3 forces 1 of 3
        (5, 12, 12, 1 / 3),  # stock batch 12 forces 4 of 12: 5 * 4 / 12 = 1.67 per batch
        (6, 12, 12, 1 / 3),
        (1, 2, 1, 0.0),  # stock batch 1 forces nothing (round(0.67) = 1)
    ],
)
def test_labeled_patches_get_stock_nnunets_share_of_forced_foreground(num_labeled, batch_size, reference, share):
    """Over many batches the share of forced labelled patches is stock nnU-Net's (fixed seed)."""
    loader = _fake_loader(
        MixedBatchDataLoader,
        batch_size,
        labeled=["c0", "c1"],
        unlabeled=["c2"],
        num_labeled=num_labeled,
        reference_batch_size=reference,
    )
    assert loader.expected_forced_share() == pytest.approx(share)
    np.random.seed(0)
    draws = 20000
    forced = np.array([[loader.get_do_oversample(j) for j in range(batch_size)] for _ in range(draws)])
    assert not forced[:, num_labeled:].any(), "unlabelled patches are never forced"
    per_batch = forced[:, :num_labeled].sum(1)
    expected = num_labeled * share
    assert set(per_batch.tolist()) <= {math.floor(expected), math.ceil(expected)}
    assert per_batch.mean() / num_labeled == pytest.approx(share, abs=0.01)  # sd <= 0.0036 here


def test_probabilistic_oversampling_keeps_its_rate_on_labeled_patches():
    loader = _fake_loader(MixedBatchDataLoader, 4, probabilistic=True, labeled=["c0"], unlabeled=["c1"], num_labeled=2)
    assert loader.expected_forced_share() == pytest.approx(0.33)
    np.random.seed(1)
    forced = np.array([[loader.get_do_oversample(j) for j in range(4)] for _ in range(20000)])
    assert not forced[:, 2:].any() and forced[:, :2].mean() == pytest.approx(0.33, abs=0.01)
    with pytest.raises(ValueError, match=r"num_labeled must be in \[1, batch size - 1 = 3\], got 4"):
        _fake_loader(MixedBatchDataLoader, 4, labeled=["c0"], unlabeled=["c1"], num_labeled=4)
    with pytest.raises(ValueError, match="reference_batch_size must be >= 1, got 0"):
        _fake_loader(MixedBatchDataLoader, 4, labeled=["c0"], unlabeled=["c1"], num_labeled=2, reference_batch_size=0)


def _forced_flags(trainer, batches: int) -> np.ndarray:
    """force_fg as nnU-Net's cropping receives it, per batch position, from the trainer's training loader."""
    trainer.initialize()
    loader = trainer.get_dataloaders()[0].data_loader  # single-process loading (nnUNet_n_proc_DA=0)
    flags: list[bool] = []
    crop = loader.get_bbox

    def spy(data_shape, force_fg, *args, **kwargs):
        flags.append(bool(force_fg))
        return crop(data_shape, force_fg, *args, **kwargs)

    loader.get_bbox = spy
    np.random.seed(3)
    for _ in range(batches):
        loader.generate_train_batch()
    return np.array(flags).reshape(batches, trainer.batch_size)


def test_ssnet_labeled_patches_are_forced_as_often_as_labeled_only(in_process, semisup2d):
    stock = _forced_flags(make_trainer(in_process, semisup2d, cls=nnUNetTrainer_LabeledOnly), 100)
    assert stock.shape[1] == 2 and stock.mean() == 0.5  # stock nnU-Net, batch 2: the second patch
    ssnet = _forced_flags(make_trainer(in_process, semisup2d), 300)
    assert ssnet.shape[1] == 2 and not ssnet[:, 1].any(), "the unlabelled patch is never forced"
    assert ssnet[:, 0].mean() == pytest.approx(0.5, abs=0.1)  # binomial sd 0.029 over 300 batches
    doubled = _forced_flags(make_trainer(in_process, semisup2d, ssnet_batch_size_factor=2.0), 20)
    assert (doubled[:, :2].sum(1) == 1).all() and not doubled[:, 2:].any()


# ----------------------------------------------------------------------------- one step, in isolation
def _ready(env, dataset_id: int, **attrs) -> nnUNetTrainerSSNet:
    torch.manual_seed(0)  # the network's initial weights
    t = make_trainer(env, dataset_id, cls=nnUNetTrainerSSNet, **attrs)
    t.initialize()
    t.ssnet_tap.attach(finest_decoder_stage(t.network)[0])  # what on_train_start does
    return t


def _batch(t: nnUNetTrainerSSNet, seed: int = 0) -> dict:
    patch = [int(p) for p in t.configuration_manager.patch_size]
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 3, (t.batch_size, 1, *[p // 8 for p in patch]), generator=g).float()
    seg = F.interpolate(seg, size=patch, mode="nearest")
    target = [
        F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc, strict=True)])
        for sc in t._get_deep_supervision_scales()
    ]
    return {"data": torch.randn(t.batch_size, 1, *patch, generator=g) + seg, "target": target}


def test_lds_moves_the_network_gradients(in_process, semisup2d):
    """Same weights, same batch, L_cs off: the network's gradients differ only if w(t) > 0 lets L_lds in."""
    grads, lds = {}, {}
    for w in (0.0, 1.0):
        t = _ready(in_process, semisup2d, ssnet_consistency=w, ssnet_rampup_length=0, ssnet_cs_weight=0.0)
        out = t.train_step(_batch(t))
        grads[w] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in t.network.parameters()]
        lds[w] = out["ssnet"][1]
        t.ssnet_tap.detach()
    assert lds[0.0] > 0 and lds[1.0] > 0
    diff = max(float((a - b).abs().max()) for a, b in zip(grads[0.0], grads[1.0], strict=True))
    assert diff > 1e-4, f"L_lds did not change any gradient (max difference {diff})"


def test_head_gradients_are_clipped_only_when_asked(in_process, semisup2d):
    """Default: the heads' gradients are not clipped (the reference clips nothing); ssnet_head_grad_clip clips them."""
    norms, net_grads = {}, {}
    for clip in (None, "half"):
        # L_cs weighted up so that the heads' gradient norm exceeds 12, nnU-Net's clipping threshold for the network
        t = _ready(in_process, semisup2d, ssnet_rampup_length=0, ssnet_cs_weight=1e4)
        g = torch.Generator().manual_seed(3)  # memory of every foreground class: L_cs > 0 whatever is predicted
        dim = int(t.ssnet_head_dim)
        t.ssnet_memory.bank = [None] + [torch.randn(8, dim, generator=g) for _ in range(1, len(t.ssnet_memory.bank))]
        if clip == "half":
            t.ssnet_head_grad_clip = norms[None] / 2
        t.train_step(_batch(t))
        norms[clip] = torch.nn.utils.get_total_norm([p.grad for p in t.ssnet_heads.parameters() if p.grad is not None])
        net_grads[clip] = [p.grad.clone() for p in t.network.parameters() if p.grad is not None]
        t.ssnet_tap.detach()
    assert norms[None] > 12, norms
    assert norms["half"].item() == pytest.approx(norms[None].item() / 2, rel=1e-4)
    for a, b in zip(net_grads[None], net_grads["half"], strict=True):
        assert torch.equal(a, b)  # the network's own clipping (nnU-Net's, at 12) is not affected


@pytest.mark.parametrize(("distance", "init"), [("soft_dice", "uniform"), ("binary_dice", "gaussian")])
def test_step_lds_is_the_configured_vat(in_process, semisup2d, distance, init):
    """The step's L_lds is virtual_adversarial_loss with the trainer's ξ, ε, distance, start and seeded generator."""
    t = _ready(in_process, semisup2d, ssnet_vat_distance=distance, ssnet_vat_init=init)
    batch = _batch(t)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return t.network(x)[0]

    with torch.no_grad():
        p = torch.softmax(logits(batch["data"]), 1)
    gen = torch.Generator().manual_seed(int(t.ssnet_seed))  # the trainer's generator, not yet used this step
    expected, _ = virtual_adversarial_loss(
        logits, logits, batch["data"], p, t.ssnet_vat_xi, t.ssnet_vat_eps, gen, VAT_DISTANCES[distance], init
    )
    t.ssnet_tap.pop()
    out = t.train_step(batch)
    assert out["ssnet"][1] == pytest.approx(expected.item(), rel=1e-5)
    t.ssnet_tap.detach()


def test_memory_holds_correctly_predicted_labeled_foreground_only(in_process, semisup2d):
    t = _ready(in_process, semisup2d)
    batch = _batch(t)
    target = batch["target"][0].long()
    n_l = t.ssnet_num_labeled
    g = torch.Generator().manual_seed(1)
    features = torch.randn(t.batch_size, 4, *target.shape[2:], generator=g)  # 4 channels: the small plans
    predicted = target[:, 0].clone()
    wrong = torch.rand(predicted.shape, generator=g) < 0.3
    predicted[wrong] = (predicted[wrong] + 1) % 3
    logits = 10.0 * F.one_hot(predicted, 3).movedim(-1, 1).float()
    pixels = features[:n_l].movedim(1, -1)
    labels = target[:n_l, 0]
    correct = (predicted[:n_l] == labels) & (labels > 0)
    # expected candidates and scores, before the step's training-mode passes update the heads' statistics
    z, scores = t.ssnet_heads.memory_candidates(pixels[correct], labels[correct])
    others = torch.cat([pixels[~correct & (labels > 0)], features[n_l:].movedim(1, -1).reshape(-1, 4)])
    z_other, _ = t.ssnet_heads.memory_candidates(others, torch.ones(len(others), dtype=torch.long))
    t.class_separation(features, logits, batch["target"][0], n_l)

    bank = t.ssnet_memory.bank
    assert bank[0] is None, "background is never stored"
    for c in (1, 2):
        of_class = labels[correct] == c
        assert int(of_class.sum()) > 32 and bank[c].shape == (32, t.ssnet_heads.dim)
        best = torch.argsort(scores[of_class], descending=True)[:32]
        expected = z[of_class][best]
        assert torch.allclose(torch.sort(bank[c], 0).values, torch.sort(expected, 0).values, atol=1e-5)
    # nothing from wrongly predicted labelled pixels or from the unlabelled patch
    for c in (1, 2):
        assert torch.cdist(bank[c], z_other).min() > 1e-4
    # a batch without a correct foreground prediction keeps the memory
    before = [b.clone() for b in bank[1:]]
    t.class_separation(
        features, 10.0 * F.one_hot((target[:, 0] + 1) % 3, 3).movedim(-1, 1).float(), batch["target"][0], n_l
    )
    assert all(torch.equal(a, b) for a, b in zip(before, t.ssnet_memory.bank[1:], strict=True))
    t.ssnet_tap.detach()
