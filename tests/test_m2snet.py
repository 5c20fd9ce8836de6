"""M2SNet / MSNet on nnU-Net's plans: subtraction unit, shapes, buffers, LossNet, and the real CLIs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_selfreg.losses.lossnet import (
    ENV_VGG16_WEIGHTS,
    LossNet,
    SegLossWithLossNet,
    draw_slices,
    probability_and_target_maps,
    vgg16_feature_layers,
)
from nnunet_selfreg.networks.m2snet import M2SNet, MSNet, PlanOps, SubtractionUnit, build_m2snet
from tests.nets import _COMMON_2D, _COMMON_3D, _REQ

TRAINER = "nnUNetTrainerM2SNetTiny"  # tests/ext_trainers: nnUNetTrainerM2SNet with a tiny budget


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


def _unit(channels: int = 1, sizes=(3, 5), identity_post: bool = False) -> SubtractionUnit:
    cm, _ = _plans(2, 4)
    unet = get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, _REQ, 1, 2, deep_supervision=False
    )
    unit = SubtractionUnit(channels, PlanOps(unet.encoder), [3, 3], sizes)
    if identity_post:
        unit.post = nn.ModuleList([nn.Identity() for _ in unit.sizes])
    return unit


# ----------------------------------------------------------------------------- subtraction unit
def test_fixed_filters_are_all_ones_local_sums_with_zero_padding():
    unit = _unit()
    ones = torch.ones(1, 1, 4, 4)
    k3 = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    k5 = torch.outer(torch.tensor([3.0, 4, 4, 3]), torch.tensor([3.0, 4, 4, 3]))  # neighbours within ±2
    assert torch.equal(unit.fixed_filter(ones, 3)[0, 0], k3)
    assert torch.equal(unit.fixed_filter(ones, 5)[0, 0], k5)


def test_subtraction_unit_hand_computed():
    unit = _unit(identity_post=True)  # norm + nonlin replaced by identity: the raw differences
    delta = torch.zeros(1, 1, 4, 4)
    delta[0, 0, 0, 0] = 1.0
    # |A-B| = delta; |k3 A - k3 B| = 1 on the 2x2 corner; |k5 A - k5 B| = 1 on the 3x3 corner
    expected = torch.tensor([[3, 2, 1, 0], [2, 2, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(unit.difference(delta, torch.zeros_like(delta))[0, 0], expected)
    assert torch.equal(unit.difference(torch.zeros_like(delta), delta)[0, 0], expected)
    # a coarser constant A (2x2 of 2s) is resized to B's 4x4: 1 + (k3 count) + (k5 count)
    got = unit.difference(torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 4, 4))[0, 0]
    expected = torch.tensor([[14, 19, 19, 14], [19, 26, 26, 19], [19, 26, 26, 19], [14, 19, 19, 14]])
    assert torch.equal(got, expected.float())
    # MSNet's single-scale unit: |A - B| only
    single = _unit(sizes=())
    assert torch.equal(single.difference(delta, torch.zeros_like(delta)), delta)
    # with the learned (shared) norm + nonlin, identical inputs give exactly zero difference
    full = _unit(channels=3)
    a = torch.randn(2, 3, 8, 8)
    assert torch.equal(full.difference(a, a), torch.zeros_like(a))
    assert full(torch.randn(2, 3, 4, 4), a).shape == a.shape


def test_fixed_kernels_are_buffers_not_parameters():
    cm, patch = _plans(3, 4)
    net = build_m2snet(None, cm, 1, 2, True)
    n_units = sum(len(row) for row in net.decoder.units)
    assert n_units == 4 * 3 // 2
    names = [n for n, _ in net.named_parameters()]
    assert not any("kernel" in n for n in names)
    state = net.state_dict()
    kernels = [k for k in state if k.endswith(("kernel3", "kernel5"))]
    assert len(kernels) == 2 * n_units
    assert state["decoder.units.0.0.kernel5"].shape == (net.decoder.width, 1, 5, 5, 5)
    assert torch.all(state["decoder.units.0.0.kernel3"] == 1)
    net = net.double()  # moved (and cast) with the module
    assert net.decoder.units[0][0].kernel3.dtype == torch.float64
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *patch, dtype=torch.float64))
    assert out[0].dtype == torch.float64
    msnet = build_m2snet(None, cm, 1, 2, True, multi_scale=False)
    assert isinstance(msnet, MSNet) and not any("kernel" in k for k in msnet.state_dict())
    # nnU-Net's weight init: He-normal convs, zero biases in the decoder
    assert torch.all(net.decoder.seg_layers[0].bias == 0)


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
    for name in ("nnUNetTrainerM2SNet", "nnUNetTrainerM2SNet_NoLossNet", "nnUNetTrainerMSNet"):
        for suffix in ("", "_1epoch", "_100epochs", "_8000epochs", "_Budget"):
            cls = getattr(trainers, name + suffix)
            assert name + suffix in trainers.__all__ and issubclass(cls, nnUNetTrainerM2SNet)


# ----------------------------------------------------------------------------- LossNet
@pytest.fixture
def no_vgg_env(monkeypatch):
    monkeypatch.delenv(ENV_VGG16_WEIGHTS, raising=False)


@pytest.fixture(scope="module")
def random_lossnet() -> LossNet:
    import os

    saved = os.environ.pop(ENV_VGG16_WEIGHTS, None)
    try:
        return LossNet(input_size=32, max_slices=3, slice_seed=7)
    finally:
        if saved is not None:
            os.environ[ENV_VGG16_WEIGHTS] = saved


def test_lossnet_is_frozen_and_gradient_reaches_prediction(random_lossnet):
    ln = random_lossnet
    assert not ln.pretrained and "randomly initialised" in ln.source
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
    draws_a = [draw_slices(10, 3, gen_a).tolist() for _ in range(3)]
    assert draws_a == [draw_slices(10, 3, gen_b).tolist() for _ in range(3)]  # same seed, same sequence
    assert all(len(d) == 3 and d == sorted(d) for d in draws_a) and len({tuple(d) for d in draws_a}) > 1
    assert draw_slices(2, 3, gen_a).tolist() == [0, 1]
    logits = torch.randn(1, 2, 10, 12, 12, requires_grad=True)
    prob, gt = probability_and_target_maps(logits, torch.randint(0, 2, (1, 1, 10, 12, 12)), False)
    random_lossnet(prob, gt).backward()
    touched = (logits.grad.abs().sum(dim=(0, 1, 3, 4)) > 0).sum().item()
    assert touched == 3  # only the drawn slices get a gradient


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
    mean, steps = wrapper.pop_epoch_mean()
    assert steps == 1 and np.isclose(mean, 10 * total.item())
    wrapper.eval()
    assert wrapper(out, tgt) == 0
    assert not random_lossnet.features.training
    wrapper.train()
    with torch.no_grad():
        assert wrapper(out, tgt) == 0


def _random_vgg16_file(path, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    layers = vgg16_feature_layers()
    for p in layers.parameters():
        nn.init.normal_(p, std=0.01)
    state = {f"features.{k}": v for k, v in layers.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # torchvision files also hold the classifier: ignored
    torch.save(state, path)
    return state


def test_lossnet_weights_file_env_and_explicit(tmp_path, monkeypatch):
    path = tmp_path / "vgg16.pth"
    state = _random_vgg16_file(path)
    monkeypatch.setenv(ENV_VGG16_WEIGHTS, str(path))
    ln = LossNet(input_size=32)
    assert ln.pretrained and str(path) in ln.source and ENV_VGG16_WEIGHTS in ln.source
    assert torch.equal(ln.features[21].weight, state["features.21.weight"])
    monkeypatch.delenv(ENV_VGG16_WEIGHTS)
    ln = LossNet(path, input_size=32)
    assert ln.pretrained and "given explicitly" in ln.source
    assert torch.equal(ln.features[0].bias, state["features.0.bias"])


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


def test_lossnet_random_fallback_is_deterministic(random_lossnet, no_vgg_env):
    other = LossNet(input_size=32)
    for p, q in zip(random_lossnet.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- end to end
def test_m2snet_2d_train_and_predict_through_the_clis(nnenv, ds2d, tmp_path):
    weights = tmp_path / "vgg16-random.pth"
    _random_vgg16_file(weights)
    # OMP_WAIT_POLICY=PASSIVE: on a shared CPU, spinning OpenMP threads make M2SNet's many small ops
    # up to 40x slower (measured); it changes nothing else
    nnenv.train(
        ds2d, "2d", 0, TRAINER, SELFREG_TEST_EPOCHS="1", NNUNET_SELFREG_VGG16_WEIGHTS=str(weights),
        OMP_WAIT_POLICY="PASSIVE",
    )  # fmt: skip
    fold = nnenv.model_folder(ds2d, TRAINER, "2d") / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "M2SNet: width 64, multi-scale (1, 3, 5) subtraction units" in log
    assert f"LossNet: weight 0.1, VGG-16 weights from {weights} (${ENV_VGG16_WEIGHTS})" in log
    assert log.count("LossNet epoch mean:") == 1
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 1
    keys = list(ckpt["network_weights"])
    assert any(k.startswith("decoder.units.") for k in keys) and not any("lossnet" in k for k in keys)
    values = ckpt["logging"]["m2snet_lossnet"]
    assert len(values) == 1 and np.isfinite(values[0]) and values[0] > 0
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    inp = tmp_path / "in"
    inp.mkdir()
    src = next(nnenv.raw.glob(f"Dataset{ds2d:03d}_*")) / "imagesTr" / "case_000_0000.png"
    (inp / src.name).symlink_to(src)
    out = tmp_path / "out"
    nnenv.run(  # the stock nnUNetv2_predict rebuilds M2SNet through build_network_architecture
        "nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(ds2d), "-c", "2d", "-f", "0",
        "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", OMP_WAIT_POLICY="PASSIVE",
    )  # fmt: skip
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_000.png")))
    assert seg.shape == (64, 64) and set(np.unique(seg)) <= {0, 1, 2}
