"""SS-Net's loss pieces on tiny tensors: hand-worked values, the VAT direction, the memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_selfreg.losses.class_separation import ClassSeparationHeads, PrototypeMemory, class_separation_loss
from nnunet_selfreg.losses.schedule import sigmoid_rampup_weight
from nnunet_selfreg.losses.vat import (
    adversarial_direction,
    frozen_batchnorm_stats,
    l2_normalize_per_sample,
    soft_dice_distance,
)


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
    assert soft_dice_distance(q, p, smooth=0.0).item() == pytest.approx(7 / 13, abs=1e-6)
    assert soft_dice_distance(q, p).item() == pytest.approx(1 - (3.00001 / 3.25001 + 1e-5 / 0.25001) / 2, abs=1e-6)


def test_soft_dice_distance_zero_for_identical_one_hot_and_checks_shapes():
    p = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 1]]), 3).permute(0, 2, 1).float()
    assert soft_dice_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        soft_dice_distance(p, p[:, :2])
    with pytest.raises(ValueError, match="B, K"):
        soft_dice_distance(p[0], p[0])


def test_l2_normalize_per_sample():
    d = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])
    n = l2_normalize_per_sample(d)
    assert torch.allclose(n.flatten(1).norm(dim=1), torch.ones(2), atol=1e-6)
    assert torch.allclose(n[0, 0], torch.tensor([0.6, 0.8]))


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


@pytest.mark.parametrize("dim", [2, 3])
def test_adversarial_direction_beats_random_directions(dim):
    net = _tiny_net(dim).train()
    shape = (2, 1, 12, 12) if dim == 2 else (2, 1, 6, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_batchnorm_stats(net):
        r = adversarial_direction(net, x, p, xi=1.0, generator=torch.Generator().manual_seed(2))
    assert r.shape == x.shape and not r.requires_grad
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)
    assert all(prm.grad is None for prm in net.parameters()), "the direction search must not touch parameters"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "batch-norm statistics changed"

    eps = 0.5
    with torch.no_grad(), frozen_batchnorm_stats(net):
        adv = soft_dice_distance(torch.softmax(net(x + eps * r), 1), p).item()
        gen = torch.Generator().manual_seed(3)
        rand = [
            soft_dice_distance(
                torch.softmax(net(x + eps * l2_normalize_per_sample(torch.randn(shape, generator=gen))), 1), p
            ).item()
            for _ in range(20)
        ]
    assert adv > max(rand), (adv, max(rand))
    assert adv > 2 * sum(rand) / len(rand)


def test_adversarial_direction_refuses_a_target_with_gradient():
    net = _tiny_net(2)
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match="detached"):
        adversarial_direction(net, x, torch.softmax(net(x), 1), xi=1.0)


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
    memory = [None, torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    sel = [_ln3_of_second_coordinate] * 2
    loss = class_separation_loss(z, labels, memory, sel, sel)
    d = 1 - 1 / math.sqrt(2)
    expected = (0.96 + d * 0.96 + d * 1.44) / 4 / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert z.grad[:2].abs().sum() > 0 and z.grad[2:].abs().sum() == 0


def test_class_separation_skips_classes_with_fewer_than_two_vectors():
    z = torch.randn(5, 4)
    labels = torch.tensor([1, 1, 1, 2, 0])
    sel = [lambda t: torch.zeros(t.shape[0], 1)] * 3
    memory = [None, torch.randn(1, 4), torch.randn(4, 4)]  # class 1: one memory vector; class 2: one feature
    assert class_separation_loss(z, labels, memory, sel, sel).item() == 0.0
    with pytest.raises(ValueError, match="one selector per class"):
        class_separation_loss(z, labels, memory, sel[:2], sel)
    with pytest.raises(ValueError, match="dimension"):
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
    with pytest.raises(ValueError, match="pixel features"):
        heads(torch.randn(4, 6))


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
    with pytest.raises(ValueError, match="does not fit"):
        PrototypeMemory(4, 2).load_state_dict(state)


# ----------------------------------------------------------------------------- ramp-up
def test_sigmoid_rampup_weight():
    assert sigmoid_rampup_weight(0, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))
    assert sigmoid_rampup_weight(149, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))  # t = 149 // 150 = 0
    assert sigmoid_rampup_weight(100 * 150, 0.1, 200) == pytest.approx(0.1 * math.exp(-1.25))
    assert sigmoid_rampup_weight(10**7, 1.0, 40) == 1.0
    assert sigmoid_rampup_weight(0, 0.5, 0) == 0.5
    with pytest.raises(ValueError):
        sigmoid_rampup_weight(-1, 0.1, 200)
