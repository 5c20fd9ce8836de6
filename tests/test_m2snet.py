"""M2SNet / MSNet on nnU-Net's plans: fixed filters, subtraction unit, layout, shapes, LossNet and its weights,
structure loss, the trainers in-process, and the real CLIs (trained vs untrained Dice)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_selfreg.losses.lossnet import (
    ENV_VGG16_WEIGHTS,
    EPOCH_TERM,
    VGG16_IMAGENET_SHA256,
    LossNet,
    MissingVGG16WeightsError,
    SegLossWithLossNet,
    draw_indices,
    probability_and_target_maps,
    vgg16_feature_layers,
)
from nnunet_selfreg.losses.structure import StructureLoss, box_mean, one_vs_rest_logits, structure_loss
from nnunet_selfreg.networks.m2snet import FixedFilter, M2SNet, MSNet, PlanOps, SubtractionUnit, build_m2snet
from nnunet_selfreg.sweep.preemption import StopControl, install_trainer_hooks
from nnunet_selfreg.trainers.core import epoch_seed
from tests.nets import _COMMON_2D, _COMMON_3D, _REQ

TRAINER = "nnUNetTrainerM2SNetTiny"  # tests/ext_trainers: nnUNetTrainerM2SNet with a tiny budget
# 80 steps: the trained network reached Dice 0.888-0.941 in four runs (untrained 0.233); 20 steps gave
# 0.379 and 0.069 in the two CI runs it failed (the last one below the untrained network)
E2E_EPOCHS, E2E_ITERS = "4", "20"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP overhead on a shared CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- plans helpers
def _plans(dim: int, n_stages: int, resenc: bool = False) -> tuple[SimpleNamespace, tuple[int, ...]]:
    """A configuration-manager stand-in with nnU-Net-style arch kwargs, and a matching patch size."""
    if dim == 2:  # anisotropic poolings from stage 4 on
        strides = [[1, 1], [2, 2], [2, 2], [2, 1], [2, 2], [1, 2], [2, 2]][:n_stages]
        kernels = [[3, 3]] * n_stages
        common = _COMMON_2D
    else:  # 3d_fullres-like: in-plane pooling first, [1, 3, 3] kernels on the finest stages
        strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 1], [2, 1, 2], [1, 2, 1]][:n_stages]
        kernels = [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * (n_stages - 2)
        common = _COMMON_3D
    bottleneck = [1] * (dim - 1) + [2]
    patch = tuple(int(b * np.prod([s[a] for s in strides])) for a, b in enumerate(bottleneck))
    kwargs = {
        **common,
        "n_stages": n_stages,
        "features_per_stage": [min(4 * 2**s, 16) for s in range(n_stages)],
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
    }
    if resenc:
        cls = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kwargs["n_blocks_per_stage"] = [1] * n_stages
    else:
        cls = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
        kwargs["n_conv_per_stage"] = [1] * n_stages
    cm = SimpleNamespace(
        network_arch_class_name=cls,
        network_arch_init_kwargs=kwargs,
        network_arch_init_kwargs_req_import=list(_REQ),
        pool_op_kernel_sizes=strides,
    )
    return cm, patch


def _ops(dim: int = 2) -> PlanOps:
    cm, _ = _plans(dim, 4)
    unet = get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, _REQ, 1, 2, deep_supervision=False
    )
    return PlanOps(unet.encoder)


def _filters(channels: int, mode: str = "full", identity_post: bool = False, dim: int = 2) -> nn.ModuleList:
    filters = nn.ModuleList([FixedFilter(channels, _ops(dim), k, mode) for k in (3, 5)])
    if identity_post:  # norm + nonlin replaced by identity: the raw window sums
        for f in filters:
            f.post = nn.Identity()
    return filters


# ----------------------------------------------------------------------------- fixed filters and the unit
def test_fixed_filters_are_all_ones_local_sums_with_zero_padding():
    k3_filter, k5_filter = _filters(1)
    ones = torch.ones(1, 1, 4, 4)
    k3 = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    k5 = torch.outer(torch.tensor([3.0, 4, 4, 3]), torch.tensor([3.0, 4, 4, 3]))  # neighbours within ±2
    assert torch.equal(k3_filter.box_sum(ones)[0, 0], k3)
    assert torch.equal(k5_filter.box_sum(ones)[0, 0], k5)


def test_full_fixed_filter_sums_all_channels_like_the_ones_kernel():
    """Full mode = conv with ones(C, C, k, k): every output channel sums all input channels; depthwise: per channel."""
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0] = 1.0  # channel 0 all ones, channel 2 a single 2 in the corner
    x[0, 2, 0, 0] = 2.0
    full, _ = _filters(3)
    corner = torch.tensor([[2.0, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    k3_of_ones = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    out = full.box_sum(x)
    for c in range(3):  # every output channel: the window sum of channel 0 + channel 1 + channel 2
        assert torch.equal(out[0, c], k3_of_ones + corner)
    depthwise, _ = _filters(3, "depthwise")
    out = depthwise.box_sum(x)
    assert torch.equal(out[0, 0], k3_of_ones) and torch.equal(out[0, 1], torch.zeros(4, 4))
    assert torch.equal(out[0, 2], corner)
    # against the naive full convolution, 2D and 3D, random values
    for dim, conv in ((2, F.conv2d), (3, F.conv3d)):
        y = torch.randn(2, 6, *([7] * dim))
        for f in _filters(6, dim=dim):
            naive = conv(y, torch.ones(6, 6, *([f.k] * dim)), torch.zeros(6), padding=f.k // 2)
            torch.testing.assert_close(f.box_sum(y), naive, rtol=1e-5, atol=1e-4)


def test_fixed_filter_sums_in_float32_under_autocast():
    """Sums of C·k^d activations overflow float16 / lose bits in bfloat16: they are computed in float32."""
    f = _filters(8)[1]  # k = 5: up to 8 · 25 = 200 summands
    x = torch.full((1, 8, 6, 6), 1001.0)  # 200 · 1001 = 200200 > 65504 (float16 max); bfloat16 would round it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = f.box_sum(x)
        out = f(x)
    assert sums.dtype == torch.float32 and sums[0, 0, 2, 2].item() == 200200.0
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert f.box_sum(x.double()).dtype == torch.float64  # wider inputs keep their precision


def test_subtraction_unit_hand_computed():
    unit = SubtractionUnit(1, _ops(), [3, 3])
    filters = _filters(1, identity_post=True)
    delta = torch.zeros(1, 1, 4, 4)
    delta[0, 0, 0, 0] = 1.0
    # |A-B| = delta; |k3 A - k3 B| = 1 on the 2x2 corner; |k5 A - k5 B| = 1 on the 3x3 corner
    expected = torch.tensor([[3, 2, 1, 0], [2, 2, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(unit.difference(delta, torch.zeros_like(delta), filters)[0, 0], expected)
    assert torch.equal(unit.difference(torch.zeros_like(delta), delta, filters)[0, 0], expected)
    # a coarser constant A (2x2 of 2s) is resized to B's 4x4: 1 + (k3 count) + (k5 count)
    got = unit.difference(torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 4, 4), filters)[0, 0]
    expected_const = torch.tensor([[14, 19, 19, 14], [19, 26, 26, 19], [19, 26, 26, 19], [14, 19, 19, 14]])
    assert torch.equal(got, expected_const.float())
    # two channels, full filters: a delta in channel 0 only reaches both channels through the window sums
    unit2 = SubtractionUnit(2, _ops(), [3, 3])
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, 0, 0] = 1.0
    diff = unit2.difference(a, torch.zeros_like(a), _filters(2, identity_post=True))
    assert torch.equal(diff[0, 0], expected) and torch.equal(diff[0, 1], expected - delta[0, 0])
    diff = unit2.difference(a, torch.zeros_like(a), _filters(2, "depthwise", identity_post=True))
    assert torch.equal(diff[0, 0], expected) and torch.equal(diff[0, 1], torch.zeros(4, 4))
    # MSNet's single-scale unit: |A - B| only
    assert torch.equal(unit.difference(delta, torch.zeros_like(delta)), delta)
    # with the learned norm + nonlin, identical inputs give exactly zero difference
    full = SubtractionUnit(3, _ops(), [3, 3])
    b = torch.randn(2, 3, 8, 8)
    assert torch.equal(full.difference(b, b, _filters(3)), torch.zeros_like(b))
    assert full(torch.randn(2, 3, 4, 4), b, _filters(3)).shape == b.shape


def test_fixed_filters_are_shared_constant_buffers():
    cm, patch = _plans(3, 4)
    net = build_m2snet(None, cm, 1, 2, True)
    dec = net.decoder
    n_units = sum(len(row) for row in dec.units)
    assert n_units == 4 * 3 // 2
    # one P_3 and one P_5 for the whole network (one norm each), called for A and B of every unit
    assert [f.k for f in dec.fixed_filters] == [3, 5] and all(f.mode == "full" for f in dec.fixed_filters)
    assert sum(isinstance(m, FixedFilter) for m in net.modules()) == 2
    assert all(len(list(u.parameters())) == len(list(u.fuse.parameters())) for row in dec.units for u in row)
    calls = []
    for f in dec.fixed_filters:
        f.register_forward_hook(lambda m, i, o: calls.append(m.k))
    with torch.no_grad():
        net.eval()(torch.randn(1, 1, *patch))
    assert calls.count(3) == calls.count(5) == 2 * n_units
    # the kernels are constants: not parameters, not in the state_dict, moved (and cast) with the module
    assert not any("kernel" in n for n, _ in net.named_parameters())
    assert not any("kernel" in k for k in net.state_dict())
    assert dec.fixed_filters[1].kernel.shape == (1, 1, 5, 5, 5) and torch.all(dec.fixed_filters[1].kernel == 1)
    net = net.double()
    assert dec.fixed_filters[0].kernel.dtype == torch.float64
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *patch, dtype=torch.float64))
    assert out[0].dtype == torch.float64
    msnet = build_m2snet(None, cm, 1, 2, True, multi_scale=False)
    assert isinstance(msnet, MSNet) and len(msnet.decoder.fixed_filters) == 0
    # nnU-Net's weight init: He-normal convs, zero biases in the decoder
    assert torch.all(net.decoder.seg_layers[0].bias == 0)


@pytest.mark.parametrize("n_stages", [2, 3, 4, 6])
def test_decoder_modules_follow_the_reference_layout(n_stages):
    """Level convs except at the deepest unit scale, a top block, S-2 output blocks, the last unit's extra conv."""
    cm, patch = _plans(2, n_stages) if n_stages >= 4 else _plans(2, 4)
    if n_stages < 4:  # 2- and 3-stage plans: cut the 4-stage one
        kw = cm.network_arch_init_kwargs
        for key in ("kernel_sizes", "strides", "n_conv_per_stage", "features_per_stage"):
            kw[key] = kw[key][:n_stages]
        kw["n_stages"], kw["n_conv_per_stage_decoder"] = n_stages, [1] * (n_stages - 1)
        cm.pool_op_kernel_sizes = kw["strides"]
        patch = tuple(int(8 * np.prod([s[a] for s in kw["strides"]])) for a in range(2))
    dec = build_m2snet(None, cm, 1, 3, True, width=8).decoder
    assert len(dec.reduce) == n_stages and sum(len(r) for r in dec.units) == n_stages * (n_stages - 1) // 2
    assert len(dec.levels) == n_stages - 2 and len(dec.outputs) == n_stages - 2
    assert (dec.last_input is None) == (n_stages == 2)
    assert dec.top.conv.in_channels == cm.network_arch_init_kwargs["features_per_stage"][-1]
    head = dec.seg_layers[0]
    assert head.kernel_size == (3, 3) and head.bias is not None  # their output1: a 3x3 conv with bias, no norm
    assert all(h.kernel_size == (1, 1) for h in dec.seg_layers[1:]) and len(dec.seg_layers) == n_stages - 1
    net = build_m2snet(None, cm, 1, 3, True, width=8)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *patch))
    assert len(out) == n_stages - 1 and out[0].shape[2:] == patch


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("n_stages", [4, 5, 6, 7])
def test_outputs_match_plainconvunet_deep_supervision(dim, n_stages):
    cm, patch = _plans(dim, n_stages)
    x = torch.randn(2, 1, *patch)
    torch.manual_seed(0)
    unet = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs, _REQ, 1, 3, True, True)
    assert isinstance(unet, PlainConvUNet)
    net = build_m2snet(None, cm, 1, 3, True, width=8)
    assert net.decoder.deep_supervision is True and isinstance(net, M2SNet)
    with torch.no_grad():
        ref = [o.shape for o in unet.eval()(x)]
        out = [o.shape for o in net.eval()(x)]
    assert out == ref
    # ... which are the resolutions nnU-Net's _get_deep_supervision_scales derives from the plans
    scales = (1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0))[:-1]
    assert out == [torch.Size([2, 3, *(round(p * s) for p, s in zip(patch, sc, strict=True))]) for sc in scales]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *patch)


def test_residual_encoder_plans_train_step_and_default_width():
    cm, patch = _plans(2, 5, resenc=True)
    net = build_m2snet(None, cm, 2, 4, True)
    assert net.decoder.width == 64 and type(net.encoder).__name__ == "ResidualEncoder"
    out = net(torch.randn(2, 2, *patch))
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for p in net.decoder.parameters())
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_trainer_builds_the_network_for_inference_and_is_registered():
    import inspect

    import nnunet_selfreg.trainers as trainers
    from nnunet_selfreg.trainers.m2snet import nnUNetTrainerM2SNet, nnUNetTrainerMSNet

    cm, patch = _plans(2, 4)
    assert "plans_manager" in inspect.signature(nnUNetTrainerM2SNet.build_network_architecture).parameters
    net = nnUNetTrainerM2SNet.build_network_architecture(None, cm, 1, 3, enable_deep_supervision=False)
    assert isinstance(net, M2SNet) and not isinstance(net, MSNet)
    assert isinstance(nnUNetTrainerMSNet.build_network_architecture(None, cm, 1, 3, False), MSNet)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)
    for name in M2SNET_TRAINERS:
        for suffix in ("", "_1epoch", "_100epochs", "_8000epochs", "_Budget"):
            cls = getattr(trainers, name + suffix)
            assert name + suffix in trainers.__all__ and issubclass(cls, nnUNetTrainerM2SNet)


M2SNET_TRAINERS = (
    "nnUNetTrainerM2SNet",
    "nnUNetTrainerM2SNet_NoLossNet",
    "nnUNetTrainerM2SNet_RandomLossNet",
    "nnUNetTrainerM2SNet_StructureLoss",
    "nnUNetTrainerMSNet",
    "nnUNetTrainerMSNet_StructureLoss",
    "nnUNetTrainerMSNet_RandomLossNet",
)


# ----------------------------------------------------------------------------- LossNet
@pytest.fixture
def no_vgg_env(monkeypatch):
    monkeypatch.delenv(ENV_VGG16_WEIGHTS, raising=False)


@pytest.fixture(scope="module")
def random_lossnet() -> LossNet:
    return LossNet(input_size=32, max_slices=3, slice_seed=7, random_init=True)


def test_lossnet_is_frozen_and_gradient_reaches_prediction(random_lossnet):
    ln = random_lossnet
    assert not ln.pretrained and ln.random_seed == 0 and "randomly initialised" in ln.source
    assert all(not p.requires_grad for p in ln.parameters())
    logits = torch.randn(2, 3, 20, 20, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 20, 20))
    prob, gt = probability_and_target_maps(logits, target, has_regions=False)
    assert prob.shape == gt.shape == (2, 2, 20, 20)  # background skipped
    loss = ln(prob, gt)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and loss > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in ln.parameters())
    assert ln(gt, gt) == 0
    ln.train()
    assert not ln.features.training
    with pytest.raises(ValueError, match="equal shape"):
        ln(prob, gt[:, :1])


def test_lossnet_3d_slices_are_drawn_per_call_from_a_seeded_generator(random_lossnet):
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draws_a = [draw_indices(10, 3, gen_a).tolist() for _ in range(3)]
    assert draws_a == [draw_indices(10, 3, gen_b).tolist() for _ in range(3)]  # same seed, same sequence
    assert all(len(d) == 3 and d == sorted(d) for d in draws_a) and len({tuple(d) for d in draws_a}) > 1
    assert draw_indices(2, 3, gen_a).tolist() == [0, 1]
    logits = torch.randn(1, 2, 10, 12, 12, requires_grad=True)
    prob, gt = probability_and_target_maps(logits, torch.randint(0, 2, (1, 1, 10, 12, 12)), False)
    random_lossnet(prob, gt).backward()
    touched = (logits.grad.abs().sum(dim=(0, 1, 3, 4)) > 0).sum().item()
    assert touched == 3  # only the drawn slices get a gradient


def test_lossnet_compares_at_most_max_classes_maps_per_call():
    ln = LossNet(input_size=32, slice_seed=3, random_init=True, max_classes=2)
    full = LossNet(input_size=32, random_init=True)  # the same seeded VGG-16, every class
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 5, 20, 20, generator=g).requires_grad_()
    gt = (torch.rand(2, 5, 20, 20, generator=g) > 0.5).float()
    expected_idx = draw_indices(5, 2, torch.Generator().manual_seed(3))
    loss = ln(prob, gt)
    assert loss.item() == pytest.approx(full(prob[:, expected_idx], gt[:, expected_idx]).item(), rel=1e-6)
    loss.backward()
    touched = (prob.grad.abs().sum(dim=(0, 2, 3)) > 0).nonzero().flatten()
    assert touched.tolist() == expected_idx.tolist()  # the same classes for every sample of the batch
    # the draw restarts with reseed, and moves on otherwise
    ln.reseed(11)
    first = [ln.select_classes(5).tolist() for _ in range(4)]
    ln.reseed(11)
    assert [ln.select_classes(5).tolist() for _ in range(4)] == first and len({tuple(d) for d in first}) > 1
    # unbiased: over every pair of classes the mean of the term is the term over all five maps
    pairs = [torch.tensor(p) for p in ((a, b) for a in range(5) for b in range(a + 1, 5))]
    mean = sum(full(prob[:, p], gt[:, p]).item() for p in pairs) / len(pairs)
    assert mean == pytest.approx(full(prob, gt).item(), rel=1e-5)
    # no more classes than the cap: every map, and the generator is not used (the 3D slice draws stay as they were)
    capped = LossNet(input_size=32, slice_seed=3, random_init=True, max_classes=5)
    assert capped(prob, gt).item() == pytest.approx(full(prob, gt).item(), rel=1e-6)
    assert capped.generator.get_state().equal(torch.Generator().manual_seed(3).get_state())
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="max_classes"):
            LossNet(input_size=32, random_init=True, max_classes=bad)


def test_lossnet_3d_draws_classes_then_slices():
    ln = LossNet(input_size=32, max_slices=3, slice_seed=5, random_init=True, max_classes=2)
    logits = torch.randn(1, 5, 10, 12, 12, requires_grad=True)
    prob = torch.softmax(logits, 1)[:, 1:]
    gt = (torch.rand(1, 4, 10, 12, 12) > 0.5).float()
    gen = torch.Generator().manual_seed(5)
    classes, slices = draw_indices(4, 2, gen), draw_indices(10, 3, gen)
    loss = ln(prob, gt)
    full = LossNet(input_size=32, max_slices=10, random_init=True)
    sub = prob[:, classes][:, :, slices], gt[:, classes][:, :, slices]
    assert loss.item() == pytest.approx(full(*sub).item(), rel=1e-6)


def test_target_maps_for_regions_and_ignore_label():
    logits = torch.zeros(1, 2, 3, 3)
    regions = torch.zeros(1, 3, 3, 3)
    regions[:, 0, 0, 0] = 1
    regions[:, 2, 1, 1] = 1  # ignore mask channel
    prob, gt = probability_and_target_maps(logits, regions, has_regions=True, ignore_label=3)
    assert prob.shape == gt.shape == (1, 2, 3, 3) and gt[0, 0, 0, 0] == 1
    assert prob[0, :, 1, 1].eq(0).all() and prob[0, :, 0, 0].eq(0.5).all()
    labels = torch.tensor([[[[0, 1, 4]]]])
    prob, gt = probability_and_target_maps(torch.zeros(1, 3, 1, 3), labels, False, ignore_label=4)
    assert gt[0, :, 0].tolist() == [[0, 1, 0], [0, 0, 0]] and prob[0, :, 0, 2].eq(0).all()


def test_segloss_wrapper_adds_weighted_lossnet_in_training_only(random_lossnet):
    seg = lambda out, tgt: out[0].mean() * 0  # noqa: E731
    wrapper = SegLossWithLossNet(seg, random_lossnet, 0.1, has_regions=False)
    out = [torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(2, 3, 8, 8)]
    tgt = [torch.randint(0, 3, (2, 1, 16, 16)), torch.randint(0, 3, (2, 1, 8, 8))]
    total = wrapper(out, tgt)
    prob, gt = probability_and_target_maps(out[0], tgt[0], False)
    assert torch.allclose(total, 0.1 * random_lossnet(prob, gt))
    result = wrapper.epoch_stats.pop_means()
    assert result.steps == 1 and np.isclose(result.means[EPOCH_TERM], 10 * total.item())
    wrapper.eval()
    assert wrapper(out, tgt) == 0
    assert not random_lossnet.features.training
    wrapper.train()
    with torch.no_grad():
        assert wrapper(out, tgt) == 0


def _random_vgg16_file(path, seed: int = 3) -> dict:
    """A torchvision-style VGG-16 state dict with seeded He-scaled weights (not ImageNet), saved to ``path``."""
    torch.manual_seed(seed)
    layers = vgg16_feature_layers()
    for m in layers.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.01)
    state = {f"features.{k}": v for k, v in layers.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # torchvision files also hold the classifier: ignored
    torch.save(state, path)
    return state


def test_lossnet_weights_file_env_and_explicit_with_sha256(tmp_path, monkeypatch):
    path = tmp_path / "vgg16.pth"
    state = _random_vgg16_file(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv(ENV_VGG16_WEIGHTS, str(path))
    ln = LossNet(input_size=32)
    assert ln.pretrained and str(path) in ln.source and ENV_VGG16_WEIGHTS in ln.source
    assert ln.sha256 == sha and sha in ln.source and not ln.imagenet and "NOT torchvision's ImageNet" in ln.source
    assert ln.provenance()["sha256"] == sha and ln.provenance()["expected_sha256"] == VGG16_IMAGENET_SHA256
    assert torch.equal(ln.features[21].weight, state["features.21.weight"])
    monkeypatch.delenv(ENV_VGG16_WEIGHTS)
    ln = LossNet(path, input_size=32)
    assert ln.pretrained and "given explicitly" in ln.source
    assert torch.equal(ln.features[0].bias, state["features.0.bias"])
    # random_init ignores any file and says so
    monkeypatch.setenv(ENV_VGG16_WEIGHTS, str(path))
    ln = LossNet(input_size=32, random_init=True, random_seed=4)
    assert not ln.pretrained and ln.sha256 is None and ln.provenance()["random_seed"] == 4


def test_lossnet_without_weights_refuses_with_instructions(no_vgg_env):
    with pytest.raises(MissingVGG16WeightsError) as err:
        LossNet(input_size=32)
    text = str(err.value)
    for part in (
        ENV_VGG16_WEIGHTS,
        "vgg16-397923af.pth",
        "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        "nnUNetTrainerM2SNet_RandomLossNet",
        "nnUNetTrainerMSNet_RandomLossNet",
        "lossnet_vgg16_weights",
        "Nothing is downloaded",
    ):
        assert part in text, part
    assert "\n" not in text  # one paragraph


def test_lossnet_wrong_weights_file_gives_a_clear_error(tmp_path, no_vgg_env):
    with pytest.raises(FileNotFoundError, match="VGG-16 weights file not found"):
        LossNet(tmp_path / "missing.pth")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG-16 state dict.*missing features.0.weight"):
        LossNet(bad)
    wrong_shape = tmp_path / "wrong.pth"
    torch.save({f"features.{k}": v[:1] for k, v in vgg16_feature_layers().state_dict().items()}, wrong_shape)
    with pytest.raises(ValueError, match="has shape"):
        LossNet(wrong_shape)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read VGG-16 weights"):
        LossNet(garbage)


def test_lossnet_random_init_is_deterministic(random_lossnet):
    other = LossNet(input_size=32, random_init=True)
    for p, q in zip(random_lossnet.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def _independent_lossnet(state: dict, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LossNet written out by hand from the VGG-16 weights: blocks end after relu1_2, relu2_2, relu3_3, relu4_3."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def image(maps):  # (B, K, H, W) -> (B·K, 3, 224, 224), normalised then resized like the reference
        x = ((maps.reshape(-1, 1, *maps.shape[2:]).repeat(1, 3, 1, 1)) - mean) / std
        return F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)

    convs_per_block = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21]]  # torchvision indices of the convs

    def blocks(x):
        out = []
        for b, convs in enumerate(convs_per_block):
            if b > 0:
                x = F.max_pool2d(x, 2, 2)
            for i in convs:
                x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    fp, ft = blocks(image(pred)), blocks(image(target))
    return sum(((a - b) ** 2).mean() for a, b in zip(fp, ft, strict=True))


def test_lossnet_value_against_an_independent_computation(tmp_path, no_vgg_env):
    path = tmp_path / "vgg16.pth"
    state = _random_vgg16_file(path, seed=11)
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(1, 1, 30, 26, generator=g)
    target = (torch.rand(1, 1, 30, 26, generator=g) > 0.5).float()
    expected = _independent_lossnet(state, pred, target)
    got = LossNet(path)(pred, target)  # input_size 224, as in the paper
    assert expected > 0 and got.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- structure loss
def test_structure_loss_hand_computed():
    """One 1x3 image, window 3 (divisor 9, zero padding): every number below is worked out by hand.

    g = [0, 1, 1]; box_3(g) = [1/9, 2/9, 2/9]; w = 1 + 5|box - g| = [14/9, 44/9, 44/9].
    """
    g = torch.tensor([[[[0.0, 1.0, 1.0]]]])
    # logits 0: p = 1/2, BCE = ln 2 everywhere
    # inter = Σ w p g = 44/9; union = Σ w (p + g) = 7/9 + 66/9 + 66/9 = 139/9; IoU term = 1 - (53/9) / (104/9)
    z = torch.zeros(1, 1, 1, 3)
    assert structure_loss(z, g, kernel_size=3).item() == pytest.approx(math.log(2) + 51 / 104, rel=1e-6)
    # logits [0, 0, ln 3]: p = [1/2, 1/2, 3/4]; BCE = [ln 2, ln 2, ln 4/3]
    # inter = 44/9 (1/2 + 3/4) = 55/9; union = 7/9 + 66/9 + 77/9 = 150/9; IoU term = 1 - (64/9) / (104/9) = 5/13
    z = torch.tensor([[[[0.0, 0.0, math.log(3)]]]])
    mean_bce = (2 * math.log(2) + math.log(4 / 3)) / 3  # the authors' code: plain mean
    assert structure_loss(z, g, kernel_size=3).item() == pytest.approx(mean_bce + 5 / 13, rel=1e-6)
    weighted_bce = (58 * math.log(2) + 44 * math.log(4 / 3)) / 102  # the paper: Σ w BCE / Σ w, w·9 = 14, 44, 44
    got = structure_loss(z, g, kernel_size=3, weighted_bce=True).item()
    assert got == pytest.approx(weighted_bce + 5 / 13, rel=1e-6)


def test_structure_loss_nd_box_mean_shapes_and_gradient():
    x = torch.rand(2, 3, 5, 6, 7)
    torch.testing.assert_close(box_mean(x, 3), F.avg_pool3d(x, 3, 1, 1, count_include_pad=True))
    torch.testing.assert_close(box_mean(x[:, :, 0], 5), F.avg_pool2d(x[:, :, 0], 5, 1, 2, count_include_pad=True))
    small = torch.zeros(1, 1, 2, 3)  # smaller than the window: one 1 in the corner, spread over 31² with divisor 961
    small[0, 0, 0, 0] = 961.0
    assert torch.allclose(box_mean(small, 31), torch.ones(1, 1, 2, 3))
    z = torch.randn(2, 2, 5, 6, 7, requires_grad=True)
    loss = structure_loss(z, (x[:, :2] > 0.5).float())
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shape"):
        structure_loss(z, x)
    with pytest.raises(ValueError, match="odd"):
        box_mean(x, 4)


def test_structure_loss_one_vs_rest_on_softmax_outputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, generator=g)
    labels = torch.randint(0, 4, (2, 1, 6, 5), generator=g)
    ovr = one_vs_rest_logits(logits)
    assert ovr.shape == (2, 3, 6, 5)
    torch.testing.assert_close(torch.sigmoid(ovr), torch.softmax(logits, 1)[:, 1:])  # σ(ovr_c) = softmax_c
    loss = StructureLoss(kernel_size=3)
    z, gt = loss.binary_maps(logits, labels)
    assert torch.equal(gt, torch.cat([(labels == c).float() for c in (1, 2, 3)], 1))
    expected = structure_loss(ovr, gt, kernel_size=3)  # foreground classes averaged (one loss over all channels)
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    per_class = [structure_loss(ovr[:, c : c + 1], gt[:, c : c + 1], kernel_size=3) for c in range(3)]
    assert loss(logits, labels).item() == pytest.approx(sum(per_class).item() / 3, rel=1e-6)
    regions = StructureLoss(has_regions=True, kernel_size=3)
    masks = (torch.rand(2, 4, 6, 5, generator=g) > 0.5).float()
    assert regions(logits, masks).item() == pytest.approx(structure_loss(logits, masks, 3).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 1, \.\.\.\)"):
        loss(logits, masks)


# ----------------------------------------------------------------------------- trainers in-process
def _trainer(env, dataset_id: int, cls_name: str, fold: int = 0, **attrs):
    import nnunet_selfreg.trainers as trainers

    ds = next(env.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    plans = json.loads((ds / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    dataset_json = json.loads((ds / "dataset.json").read_text())
    trainer = getattr(trainers, cls_name)(plans, "2d", fold, dataset_json, torch.device("cpu"))
    trainer.num_iterations_per_epoch = 1
    trainer.num_val_iterations_per_epoch = 1
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


@pytest.fixture
def single_process_da(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return nnunet_paths


@pytest.mark.parametrize(
    "name",
    [
        "nnUNetTrainerM2SNet",
        "nnUNetTrainerMSNet",
        "nnUNetTrainerM2SNet_StructureLoss",
        "nnUNetTrainerMSNet_StructureLoss",
    ],
)
def test_trainers_without_weights_stop_before_anything_is_built(single_process_da, ds2d, no_vgg_env, name):
    t = _trainer(single_process_da, ds2d, name)
    with pytest.raises(MissingVGG16WeightsError) as err:
        t.on_train_start()
    assert "NNUNET_SELFREG_VGG16_WEIGHTS" in str(err.value) and "nnUNetTrainerM2SNet_RandomLossNet" in str(err.value)
    assert "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0" in str(err.value)
    assert t.network is None and t.dataloader_train is None and not t.was_initialized
    t = _trainer(single_process_da, ds2d, "nnUNetTrainerM2SNet_NoLossNet")
    t.initialize()  # no LossNet, no weights needed
    assert t.lossnet is None


def test_random_lossnet_trainer_records_it_in_log_debug_json_and_checkpoint(single_process_da, ds2d, no_vgg_env):
    t = _trainer(single_process_da, ds2d, "nnUNetTrainerMSNet_RandomLossNet", fold=3, lossnet_input_size=32)
    t.on_train_start()
    assert t.lossnet_is_random and t.lossnet_vgg16_sha256 is None and "seed 0" in t.lossnet_source
    log = open(t.log_file).read()
    assert "WARNING: LossNet is a RANDOMLY INITIALISED VGG-16 (seed 0)" in log
    debug = json.loads((Path(t.output_folder) / "debug.json").read_text())
    assert debug["lossnet_is_random"] == "True" and "randomly initialised VGG-16" in debug["lossnet_source"]
    t.save_checkpoint(str(Path(t.output_folder) / "checkpoint_test.pth"))
    ckpt = torch.load(Path(t.output_folder) / "checkpoint_test.pth", map_location="cpu", weights_only=False)
    entry = ckpt["m2snet_lossnet"]
    assert entry["random_init"] and entry["random_seed"] == 0 and entry["sha256"] is None and entry["weight"] == 0.1
    assert set(ckpt["network_weights"]) == set(t.network.state_dict())
    install_trainer_hooks(t, StopControl(), None)  # sweep's hooks: every checkpoint is written atomically
    t.save_checkpoint(str(Path(t.output_folder) / "checkpoint_hooked.pth"))
    hooked = torch.load(Path(t.output_folder) / "checkpoint_hooked.pth", map_location="cpu", weights_only=False)
    assert hooked["m2snet_lossnet"] == entry and not list(Path(t.output_folder).glob(".*partial*"))
    t.on_train_end()


def test_lossnet_class_cap_and_per_epoch_draws_survive_a_restart(single_process_da, ds2d, no_vgg_env):
    t = _trainer(single_process_da, ds2d, "nnUNetTrainerM2SNet_RandomLossNet", fold=2, lossnet_input_size=32)
    t.on_train_start()
    assert t.lossnet.max_classes == t.lossnet_max_classes == 4
    assert "at most 4 class maps per step" in open(t.log_file).read()

    def draws(epoch: int) -> list[list[int]]:
        t.current_epoch = epoch
        t.on_train_epoch_start()
        return [t.lossnet.select_classes(20).tolist() for _ in range(3)]

    epoch3 = draws(3)
    assert draws(4) != epoch3
    assert draws(3) == epoch3  # what a run resumed at epoch 3 with --c draws
    gen = torch.Generator().manual_seed(epoch_seed(t.lossnet_seed, 2, 3))
    assert epoch3 == [draw_indices(20, 4, gen).tolist() for _ in range(3)]
    t.on_train_end()


@pytest.mark.parametrize(
    ("name", "network"), [("nnUNetTrainerM2SNet_StructureLoss", M2SNet), ("nnUNetTrainerMSNet_StructureLoss", MSNet)]
)
def test_structure_loss_trainer_step_with_own_weights_file(
    single_process_da, ds2d, tmp_path, monkeypatch, name, network
):
    path = tmp_path / "my-vgg16.pth"
    _random_vgg16_file(path)
    monkeypatch.setenv(ENV_VGG16_WEIGHTS, str(path))
    t = _trainer(single_process_da, ds2d, name, fold=4, lossnet_input_size=32)
    t.on_train_start()
    assert type(t.network) is network  # MSNet: single-scale units, no fixed filters
    seg = t.loss.seg_loss
    stock = nnUNetTrainer._build_loss(t)  # nnU-Net's deep-supervision weights for these plans
    assert isinstance(seg, DeepSupervisionWrapper) and isinstance(seg.loss, StructureLoss)
    assert seg.weight_factors == stock.weight_factors
    assert t.lossnet.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == t.lossnet_vgg16_sha256
    log = open(t.log_file).read()
    assert "WARNING: the LossNet weights file" in log and t.lossnet.sha256 in log
    assert "Segmentation loss: structure loss" in log
    t.on_epoch_start()
    t.on_train_epoch_start()
    out = t.train_step(next(t.dataloader_train))
    assert math.isfinite(float(out["loss"]))
    t.on_train_epoch_end([out])
    ckpt_path = Path(t.output_folder) / "checkpoint_test.pth"
    t.save_checkpoint(str(ckpt_path))
    entry = torch.load(ckpt_path, map_location="cpu", weights_only=False)["m2snet_lossnet"]
    assert entry["sha256"] == t.lossnet.sha256 and not entry["imagenet"] and not entry["random_init"]
    t.on_train_end()


# ----------------------------------------------------------------------------- end to end
def _dice(pred: np.ndarray, ref: np.ndarray, labels=(1, 2)) -> float:
    """Mean over foreground labels of Dice (a label absent from both counts as 1)."""
    scores = []
    for c in labels:
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        scores.append(1.0 if denom == 0 else 2 * np.logical_and(p, r).sum() / denom)
    return float(np.mean(scores))


@pytest.mark.cli_e2e
def test_m2snet_2d_train_and_predict_through_the_clis(nnenv, ds2d, tmp_path):
    weights = tmp_path / "vgg16-random.pth"
    _random_vgg16_file(weights)
    # OMP_WAIT_POLICY=PASSIVE: on a shared CPU, spinning OpenMP threads make M2SNet's many small ops
    # up to 40x slower (measured); it changes nothing else
    nnenv.train(
        ds2d, "2d", 0, TRAINER, SELFREG_TEST_EPOCHS=E2E_EPOCHS, SELFREG_TEST_ITERS=E2E_ITERS,
        NNUNET_SELFREG_VGG16_WEIGHTS=str(weights), OMP_WAIT_POLICY="PASSIVE",
    )  # fmt: skip
    folder = nnenv.model_folder(ds2d, TRAINER, "2d")
    fold = folder / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert (
        "M2SNet: width 64, multi-scale subtraction units (|A-B| + fixed full all-ones 3 and 5 filters, shared)" in log
    )
    assert f"LossNet: weight 0.1, VGG-16 weights from {weights} (${ENV_VGG16_WEIGHTS})" in log
    assert log.count("LossNet epoch mean:") == int(E2E_EPOCHS)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == int(E2E_EPOCHS)
    keys = list(ckpt["network_weights"])
    assert any(k.startswith("decoder.units.") for k in keys) and not any("lossnet" in k for k in keys)
    assert ckpt["m2snet_lossnet"]["weights_path"] == str(weights)
    values = ckpt["logging"]["m2snet_lossnet"]
    assert len(values) == int(E2E_EPOCHS) and np.all(np.isfinite(values)) and np.all(np.asarray(values) > 0)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    # the trained network against the same network untrained, on the fold's validation cases
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_selfreg.trainers.m2snet import nnUNetTrainerM2SNet

    plans = PlansManager(str(folder / "plans.json"))
    torch.manual_seed(0)
    untrained = nnUNetTrainerM2SNet.build_network_architecture(plans, plans.get_configuration("2d"), 1, 3, True)
    torch.save({**ckpt, "network_weights": untrained.state_dict()}, fold / "checkpoint_untrained.pth")
    raw = next(nnenv.raw.glob(f"Dataset{ds2d:03d}_*"))
    val_cases = sorted(p.name[: -len(".png")] for p in (fold / "validation").glob("*.png"))
    assert len(val_cases) >= 2
    inp = tmp_path / "in"
    inp.mkdir()
    for case in val_cases:
        (inp / f"{case}_0000.png").symlink_to(raw / "imagesTr" / f"{case}_0000.png")
    dice = {}
    for chk in ("checkpoint_final.pth", "checkpoint_untrained.pth"):
        out = tmp_path / chk
        nnenv.run(  # the stock nnUNetv2_predict rebuilds M2SNet through build_network_architecture
            "nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(ds2d), "-c", "2d", "-f", "0",
            "-tr", TRAINER, "-chk", chk, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
            OMP_WAIT_POLICY="PASSIVE",
        )  # fmt: skip
        scores = []
        for case in val_cases:
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.png")))
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.png")))
            assert seg.shape == ref.shape == (64, 64) and set(np.unique(seg)) <= {0, 1, 2}
            scores.append(_dice(seg, ref))
        dice[chk] = float(np.mean(scores))
    # training is not deterministic: the margin leaves 0.35 below the lowest of four runs at this budget
    assert dice["checkpoint_final.pth"] > dice["checkpoint_untrained.pth"] + 0.3, dice
