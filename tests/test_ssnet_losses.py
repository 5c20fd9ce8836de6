"""SS-Net's loss pieces on tiny tensors: hand-worked values, the VAT direction, the memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_selfreg.losses.class_separation import ClassSeparationHeads, PrototypeMemory, class_separation_loss
from nnunet_selfreg.losses.schedule import sigmoid_rampup_weight
from nnunet_selfreg.losses.vat import (
    VAT_DISTANCES,
    adversarial_direction,
    binary_dice_distance,
    frozen_batchnorm_stats,
    l2_normalize_per_sample,
    random_unit_direction,
    soft_dice_distance,
    virtual_adversarial_loss,
)
from nnunet_selfreg.trainers.ssnet import REFERENCE_SETTINGS
from tests.nets import batch, build


# ----------------------------------------------------------------------------- soft Dice distance
def _two_pixel_maps() -> tuple[torch.Tensor, torch.Tensor]:
    # q: class 0 = [0.5, 1.0], class 1 = [0.5, 0.0]; p: class 0 = [1, 1], class 1 = [0, 0]
    q = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    p = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    return q, p


@pytest.mark.parametrize("spatial", [(2,), (1, 2), (2, 1, 1)])
def test_soft_dice_distance_by_hand(spatial):
    # class 0: 2*1.5 / (1.25 + 2) = 12/13; class 1: 0 / 0.25 = 0  ->  D = 1 - 6/13 = 7/13
    q, p = _two_pixel_maps()
    q, p = q.reshape(1, 2, *spatial), p.reshape(1, 2, *spatial)
    assert soft_dice_distance(q, p, smooth=0.0).item() == pytest.approx(7 / 13, abs=1e-7)
    # the reference's smooth 1e-10 by default: class 1 gives 1e-10 / 0.25, not 1e-5 / 0.25
    assert soft_dice_distance(q, p).item() == pytest.approx(1 - (3 / 3.25 + 4e-10) / 2, abs=1e-7)
    assert soft_dice_distance(q, p, smooth=1e-5).item() == pytest.approx(
        1 - (3.00001 / 3.25001 + 1e-5 / 0.25001) / 2, abs=1e-7
    )


@pytest.mark.parametrize("spatial", [(2,), (1, 2), (2, 1, 1)])
def test_binary_dice_distance_by_hand(spatial):
    # whole tensor: 2 * (0.5 + 1 + 0 + 0) / (2 + 2) = 0.75  ->  D = 0.25 (= 1 - mean over pixels of <q, p>)
    q, p = _two_pixel_maps()
    q, p = q.reshape(1, 2, *spatial), p.reshape(1, 2, *spatial)
    assert binary_dice_distance(q, p, smooth=0.0).item() == pytest.approx(0.25, abs=1e-7)
    assert binary_dice_distance(q, p).item() == pytest.approx(1 - (3 + 1e-8) / (4 + 1e-8), abs=1e-7)
    with pytest.raises(ValueError, match=r"equal shapes, got \(1, 2, .*\) and \(1, 1, .*\)"):
        binary_dice_distance(q, p[:, :1])


def test_soft_dice_distance_zero_for_identical_one_hot_and_checks_shapes():
    p = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 1]]), 3).permute(0, 2, 1).float()
    assert soft_dice_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        soft_dice_distance(p, p[:, :2])
    with pytest.raises(ValueError, match="B, K"):
        soft_dice_distance(p[0], p[0])


def test_l2_normalize_per_sample():
    d = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]], [[3e-8, 4e-8]], [[0.0, 0.0]]])
    n = l2_normalize_per_sample(d)
    assert torch.allclose(n[0, 0], torch.tensor([0.6, 0.8])) and torch.allclose(n[1, 0], torch.tensor([0.0, 1.0]))
    # the reference's additive 1e-8: a norm of 5e-8 becomes 5/6, an all-zero sample stays zero
    assert torch.allclose(n[2, 0], torch.tensor([0.5, 4 / 6])) and torch.equal(n[3], torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"expected a batch \(B, \.\.\.\), got shape \(2,\)"):
        l2_normalize_per_sample(torch.ones(2))


def test_random_unit_direction_is_the_references_uniform_draw():
    shape = (2, 1, 5, 7)
    d = random_unit_direction(shape, torch.Generator().manual_seed(3))
    u = torch.rand(shape, generator=torch.Generator().manual_seed(3)) - 0.5  # the reference: torch.rand(...) - 0.5
    assert torch.allclose(d, u / u.flatten(1).norm(dim=1).view(2, 1, 1, 1), atol=1e-7)
    g = random_unit_direction(shape, torch.Generator().manual_seed(3), init="gaussian")
    assert torch.allclose(g.flatten(1).norm(dim=1), torch.ones(2), atol=1e-6) and not torch.allclose(g, d, atol=0.1)
    with pytest.raises(ValueError, match="unknown VAT start direction 'normal': use one of"):
        random_unit_direction(shape, init="normal")


# ----------------------------------------------------------------------------- VAT
def test_frozen_batchnorm_keeps_running_statistics():
    bn = nn.BatchNorm2d(2)
    x = torch.randn(4, 2, 3, 3) + 5
    with frozen_batchnorm_stats(bn):
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(2)) and int(bn.num_batches_tracked) == 0
    assert bn.track_running_stats
    bn(x)
    assert bn.running_mean.abs().sum() > 0


def _tiny_net(dim: int) -> nn.Module:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 6, 3, padding=1), norm(6), nn.Tanh(), conv(6, 3, 3, padding=1))


@pytest.mark.parametrize(("dim", "arch"), [(2, "plain2d"), (3, "plain3d_aniso")])
def test_vat_with_its_defaults_on_nnunets_network(dim, arch):
    """ξ = 10, ε = 6 (2D) / 10 (3D), the distance of the reference's 2D / 3D code, nnU-Net's InstanceNorm U-Net."""
    settings = REFERENCE_SETTINGS[dim]
    assert (settings["vat_xi"], settings["vat_eps"]) == (10.0, 6.0 if dim == 2 else 10.0)
    distance = VAT_DISTANCES[settings["vat_distance"]]
    net = build(arch).train()
    x = batch(arch, seed=1)

    def logits(t: torch.Tensor) -> torch.Tensor:
        return net(t)[0]

    with torch.no_grad():
        p = torch.softmax(logits(x), 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    lds, r = virtual_adversarial_loss(logits, logits, x, p, settings["vat_xi"], settings["vat_eps"], gen, distance)
    assert r.shape == x.shape and not r.requires_grad and lds.requires_grad
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)
    assert all(prm.grad is None for prm in net.parameters()), "the direction search must not touch parameters"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    lds.backward()
    assert sum(float(prm.grad.abs().sum()) for prm in net.parameters() if prm.grad is not None) > 0

    # the adversarial direction hurts more than random directions of the same size; measured from
    # D(p, p), which is not 0 for the binary Dice (1 - mean <p, p>)
    eps = settings["vat_eps"]
    with torch.no_grad():
        base = distance(p, p).item()
        adv = distance(torch.softmax(logits(x + eps * r), 1), p).item() - base
        assert adv + base == pytest.approx(lds.item(), rel=1e-5)
        gen = torch.Generator().manual_seed(3)
        rand = [
            distance(torch.softmax(logits(x + eps * random_unit_direction(x.shape, gen)), 1), p).item() - base
            for _ in range(20)
        ]
    assert adv > max(rand), (adv, max(rand))
    assert adv > 1.5 * sum(rand) / len(rand), (adv, sum(rand) / len(rand))


def test_adversarial_direction_keeps_batchnorm_statistics_and_parameters():
    net = _tiny_net(2).train()
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_batchnorm_stats(net):
        adversarial_direction(net, x, p, xi=10.0, generator=torch.Generator().manual_seed(2))
    assert all(prm.grad is None for prm in net.parameters()), "the direction search must not touch parameters"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "batch-norm statistics changed"


def test_adversarial_direction_is_the_references_normalised_gradient_also_when_tiny():
    """r = g / (‖g‖ + 1e-8) with the plain gradient g, whatever internal scaling is used."""
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    k = 1e-4  # logits [k·x, 0]: a gradient of norm about 1.6e-8

    def forward(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([k * t, torch.zeros_like(t)], dim=1)

    p = torch.softmax(forward(x), 1).detach()
    r = adversarial_direction(forward, x, p, xi=10.0, generator=torch.Generator().manual_seed(5))
    d = random_unit_direction(x.shape, torch.Generator().manual_seed(5)).requires_grad_(True)
    (g,) = torch.autograd.grad(soft_dice_distance(torch.softmax(forward(x + 10.0 * d), 1), p), d)
    norm = g.norm()
    assert 1e-8 < norm < 1e-7, norm
    assert torch.allclose(r, g / (norm + 1e-8), rtol=1e-4, atol=1e-9)
    assert 0.5 < r.norm() < 0.7  # shorter than 1, as in the reference


def test_adversarial_direction_refuses_a_target_with_gradient():
    net = _tiny_net(2)
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="p must be detached"):
        adversarial_direction(net, x, torch.softmax(net(x), 1), xi=1.0)
    with pytest.raises(ValueError, match=r"network output \(1, 3, 6, 6\) does not match p \(1, 2, 6, 6\)"):
        adversarial_direction(net, x, torch.zeros(1, 2, 6, 6), xi=1.0)


# ----------------------------------------------------------------------------- class separation
def _ln3_of_second_coordinate(t: torch.Tensor) -> torch.Tensor:
    return math.log(3.0) * t[:, 1:2]


def test_class_separation_by_hand():
    # class 1 memory m1 = [1, 0], m2 = [0, 1]; class-1 features z1 = [1, 0], z2 = [1, 1]
    # distances [[0, 1], [1 - 1/sqrt2, 1 - 1/sqrt2]]; selector logits 0 and ln 3 on both sides:
    # sigmoid 0.5 and 0.75, rescaled to mean 1: a = b = [0.8, 1.2]
    # L_1 = (1*0.8*1.2 + d*1.2*0.8 + d*1.2*1.2) / 4 with d = 1 - 1/sqrt2; L_cs = L_1 / K (K = 2)
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, -1.0], [2.0, 2.0]], requires_grad=True)
    labels = torch.tensor([1, 1, 0, 2])  # 0: background (no memory), 2: ignore label (no class)
    # the memory-side selector sees unit vectors: [3, 0] and [0, 7] score like [1, 0] and [0, 1]
    memory = [None, torch.tensor([[3.0, 0.0], [0.0, 7.0]])]
    sel = [_ln3_of_second_coordinate] * 2
    loss = class_separation_loss(z, labels, memory, sel, sel)
    d = 1 - 1 / math.sqrt(2)
    expected = (0.96 + d * 0.96 + d * 1.44) / 4 / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert z.grad[:2].abs().sum() > 0 and z.grad[2:].abs().sum() == 0

    # memory_weights="ones" (what the reference computes): b = [1, 1], a = [0.8, 1.2]
    # L_1 = (0*0.8 + 1*0.8 + d*1.2 + d*1.2) / 4
    ones = class_separation_loss(z, labels, memory, sel, [None, None], memory_weights="ones")
    assert ones.item() == pytest.approx((0.8 + 2.4 * d) / 4 / 2, abs=1e-6)
    with pytest.raises(ValueError, match=r"memory_weights must be one of \('learned', 'ones'\), got 'one'"):
        class_separation_loss(z, labels, memory, sel, sel, memory_weights="one")


def test_class_separation_skips_classes_with_fewer_than_two_vectors():
    z = torch.randn(5, 4)
    labels = torch.tensor([1, 1, 1, 2, 0])
    sel = [lambda t: torch.zeros(t.shape[0], 1)] * 3
    memory = [None, torch.randn(1, 4), torch.randn(4, 4)]  # class 1: one memory vector; class 2: one feature
    assert class_separation_loss(z, labels, memory, sel, sel).item() == 0.0
    with pytest.raises(ValueError, match="need one selector per class: 3 memory slots, 2 selectors"):
        class_separation_loss(z, labels, memory, sel[:2], sel)
    with pytest.raises(ValueError, match="memory of class 1 has dimension 5, features have 4"):
        class_separation_loss(z, labels, [None, torch.randn(3, 5), None], sel, sel)


def test_heads_shapes_and_evaluation_mode_scores():
    heads = ClassSeparationHeads(in_channels=5, num_classes=3, dim=8).train()
    h = torch.randn(40, 5)
    assert heads(h).shape == (40, 8)
    labels = torch.tensor([1] * 20 + [2] * 20)
    stats = heads.projection[1].running_mean.clone()
    z, scores = heads.memory_candidates(h, labels)
    assert z.shape == (40, 8) and scores.shape == (40,) and heads.training
    assert torch.equal(heads.projection[1].running_mean, stats), "scoring must not update batch-norm statistics"
    # evaluation mode: a vector's score does not depend on the others
    z1, s1 = heads.memory_candidates(h[:3], labels[:3])
    assert torch.allclose(s1, scores[:3], atol=1e-6) and torch.allclose(z1, z[:3], atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(N, 5\) pixel features, got \(4, 6\)"):
        heads(torch.randn(4, 6))


def test_batch_scoring_is_the_selector_in_training_mode_per_class():
    """scoring="batch": each class's candidates normalised by their own statistics, running statistics untouched."""
    heads = ClassSeparationHeads(in_channels=5, num_classes=3, dim=8).train()
    h = torch.randn(41, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1] * 20 + [2] * 20 + [2])
    labels[40] = 1
    labels[19] = 2  # mixed order
    buffers = {k: v.clone() for k, v in heads.state_dict().items()}
    z, scores = heads.memory_candidates(h, labels, scoring="batch")
    assert all(torch.equal(buffers[k], v) for k, v in heads.state_dict().items()), "scoring changed a buffer"
    with torch.no_grad():
        heads.eval()
        z_expected = heads.projection(h)
        heads.train()
        for c in (1, 2):
            sel = labels == c
            expected = heads.selectors[c](z_expected[sel]).squeeze(1)  # training mode: batch statistics
            assert torch.allclose(scores[sel], expected, atol=1e-6)
    assert torch.allclose(z, z_expected, atol=1e-6)
    # per class: the scores of class 1 do not change when class 2's candidates are dropped
    _, only1 = heads.memory_candidates(h[labels == 1], labels[labels == 1], scoring="batch")
    assert torch.allclose(only1, scores[labels == 1], atol=1e-6)
    _, single = heads.memory_candidates(h[:1], labels[:1], scoring="batch")
    assert single.tolist() == [0.0]  # one candidate: no batch statistics, kept anyway
    with pytest.raises(ValueError, match=r"scoring must be one of \('eval', 'batch'\), got 'train'"):
        heads.memory_candidates(h, labels, scoring="train")


# ----------------------------------------------------------------------------- memory
def test_memory_keeps_the_best_per_class_and_old_vectors_without_candidates():
    mem = PrototypeMemory(num_classes=3, capacity=2)
    z = torch.arange(10.0).reshape(5, 2)
    labels = torch.tensor([1, 1, 1, 2, 0])
    scores = torch.tensor([0.1, 0.9, 0.5, -1.0, 9.0])
    mem.update(z, labels, scores, distributed=False)
    assert mem.bank[0] is None  # background is never stored
    assert torch.equal(mem.bank[1], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))  # scores 0.9, 0.5
    assert torch.equal(mem.bank[2], torch.tensor([[6.0, 7.0]]))
    mem.update(torch.tensor([[1.0, 1.0]]), torch.tensor([2]), torch.tensor([0.0]), distributed=False)
    assert torch.equal(mem.bank[1], torch.tensor([[2.0, 3.0], [4.0, 5.0]])), "class 1 had no candidate: kept"
    assert torch.equal(mem.bank[2], torch.tensor([[1.0, 1.0]])), "class 2 refilled"
    state = mem.state_dict()
    other = PrototypeMemory(3, 2)
    other.load_state_dict(state)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(mem.bank, other.bank, strict=True))
    with pytest.raises(ValueError, match="memory state for 3 classes / capacity 2 does not fit 4 classes / capacity 2"):
        PrototypeMemory(4, 2).load_state_dict(state)


def test_memory_keep_lowest_is_the_reference_codes_choice():
    z = torch.arange(10.0).reshape(5, 2)
    labels = torch.tensor([1, 1, 1, 2, 0])
    scores = torch.tensor([0.1, 0.9, 0.5, -1.0, 9.0])
    low = PrototypeMemory(num_classes=3, capacity=2, keep="lowest")
    low.update(z, labels, scores, distributed=False)
    assert torch.equal(low.bank[1], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))  # scores 0.1, 0.5
    assert torch.equal(low.bank[2], torch.tensor([[6.0, 7.0]])) and low.bank[0] is None
    with pytest.raises(ValueError, match=r"keep must be one of \('highest', 'lowest'\), got 'best'"):
        PrototypeMemory(3, 2, keep="best")


# ----------------------------------------------------------------------------- ramp-up
def test_sigmoid_rampup_weight():
    assert sigmoid_rampup_weight(0, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))
    assert sigmoid_rampup_weight(149, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))  # t = 149 // 150 = 0
    assert sigmoid_rampup_weight(100 * 150, 0.1, 200) == pytest.approx(0.1 * math.exp(-1.25))
    assert sigmoid_rampup_weight(10**7, 1.0, 40) == 1.0
    assert sigmoid_rampup_weight(0, 0.5, 0) == 0.5
    with pytest.raises(ValueError, match="need iteration >= 0, step >= 1, rampup_length >= 0, scale >= 0; got -1"):
        sigmoid_rampup_weight(-1, 0.1, 200)
