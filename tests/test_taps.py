"""Feature taps leave nnU-Net's networks exactly as they are and release what they capture."""

import gc
import weakref

import pytest
import torch

from nnunet_selfreg.taps import UNetFeatureTaps, UnsupportedArchitectureError, check_tappable
from tests.nets import ARCHS, batch, build


@pytest.mark.parametrize("arch", list(ARCHS))
def test_state_dict_parameters_and_outputs_unchanged(arch):
    stock = build(arch)
    tapped = build(arch, seed=1)
    tapped.load_state_dict(stock.state_dict(), strict=True)
    taps = UNetFeatureTaps()
    taps.attach(tapped)
    assert list(tapped.state_dict()) == list(stock.state_dict())
    assert [n for n, _ in tapped.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert [n for n, _ in tapped.named_buffers()] == [n for n, _ in stock.named_buffers()]
    x = batch(arch)
    for mode in ("train", "eval"):
        getattr(stock, mode)()
        getattr(tapped, mode)()
        with torch.no_grad():
            out_s, out_t = stock(x), tapped(x)
        assert len(out_s) == len(out_t)
        for a, b in zip(out_s, out_t, strict=True):
            assert torch.equal(a, b)
    taps.detach()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_captures_every_stage_in_training_mode_only(arch):
    net = build(arch)
    taps = UNetFeatureTaps()
    taps.attach(net)
    x = batch(arch)
    net.eval()
    with torch.no_grad():
        net(x)
    assert taps.pop() is None  # validation / inference store nothing
    net.train()
    out = net(x)
    enc, dec = taps.pop()
    n = ARCHS[arch][1]["n_stages"]
    assert len(enc) == n and len(dec) == n - 1
    assert [f.shape[1] for f in enc] == ARCHS[arch][1]["features_per_stage"]
    assert dec[-1].shape[2:] == x.shape[2:] == out[0].shape[2:]  # F_final at full resolution
    assert taps.pop() is None  # handed over once, then forgotten
    if arch == "plain3d_aniso":
        assert tuple(enc[-1].shape[2:]) == (5, 7, 3)  # odd, anisotropic bottleneck


def test_captured_features_are_released_after_the_step():
    net = build("plain2d").train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    out = net(batch("plain2d"))
    enc, dec = taps.pop()
    ref = weakref.ref(enc[0])
    del enc, dec, out
    gc.collect()
    assert ref() is None
    for _ in range(3):  # repeated forwards without a consumer keep one set, not a growing list
        net(batch("plain2d"))
    assert len(taps._encoder) == 4 and len(taps._decoder) == 3


def test_detach_removes_every_hook():
    net = build("resenc2d")
    taps = UNetFeatureTaps()
    taps.attach(net)
    assert sum(len(m._forward_hooks) for m in net.modules()) == 4 + 3
    taps.attach(net)  # idempotent
    assert sum(len(m._forward_hooks) for m in net.modules()) == 4 + 3
    taps.detach()
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
    assert not taps.attached


def test_unsupported_architecture_gets_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="PlainConvUNet.*ResidualEncoderUNet"):
        check_tappable(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    from dynamic_network_architectures.architectures.unet import ResidualUNet

    net = ResidualUNet(
        1, 3, [8, 16, 32], torch.nn.Conv2d, 3, [1, 2, 2], [1, 1, 1], 3, [1, 1], norm_op=torch.nn.InstanceNorm2d
    )
    with pytest.raises(UnsupportedArchitectureError, match="ResidualUNet"):
        UNetFeatureTaps().attach(net)


def test_stage_with_one_channel_rejected_before_training():
    cls, kwargs, _ = ARCHS["plain2d"]
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(
        cls, {**kwargs, "features_per_stage": [1, 16, 32, 32]}, ("conv_op", "norm_op", "dropout_op", "nonlin"), 1, 3
    )
    with pytest.raises(ValueError, match="encoder stage 0 has 1 feature channel"):
        UNetFeatureTaps().attach(net)
    UNetFeatureTaps().attach(net, min_channels=1)  # SCR alone can handle it


def test_unwraps_compiled_network_and_hooks_fire_after_compile():
    """nnU-Net compiles in initialize(); our taps attach afterwards but before the first forward."""
    net = build("plain2d").train()
    compiled = torch.compile(net, backend="aot_eager")
    taps = UNetFeatureTaps()
    taps.attach(compiled)
    out = compiled(batch("plain2d"))
    feats = taps.pop()
    assert feats is not None, "hooks did not fire under torch.compile"
    enc, dec = feats
    (out[0].mean() + enc[0].pow(2).mean()).backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None
