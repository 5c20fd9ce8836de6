"""Feature taps leave nnU-Net's networks exactly as they are and release what they capture."""

import gc
import weakref

import pytest
import torch

from nnunet_selfreg.losses import SelfRegRegularizer
from nnunet_selfreg.taps import (
    FeatureTaps,
    TapPoints,
    UNetFeatureTaps,
    UnsupportedArchitectureError,
    check_tappable,
    declare_taps,
    tap_points,
)
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


def test_undeclared_architecture_gets_the_declaration_recipe():
    with pytest.raises(UnsupportedArchitectureError, match=r"PlainConvUNet.*ResidualEncoderUNet(.|\n)*@declare_taps"):
        check_tappable(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))


def test_residual_unet_is_tapped_like_the_other_unets():
    from dynamic_network_architectures.architectures.unet import ResidualUNet

    net = ResidualUNet(
        1, 3, [8, 16, 32], torch.nn.Conv2d, 3, [1, 2, 2], [1, 1, 1], 3, [1, 1], norm_op=torch.nn.InstanceNorm2d
    ).train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    net(torch.randn(2, 1, 16, 16))
    enc, dec = taps.pop()
    assert [e.shape[1:] for e in enc] == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]
    assert [d.shape[1:] for d in dec] == [(16, 8, 8), (8, 16, 16)]


class _TinyUNet(torch.nn.Module):
    """A user's own two-level network, declared with a method."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.ModuleList([torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, 2, 1)])
        self.up = torch.nn.ModuleList([torch.nn.ConvTranspose2d(8, 4, 2, 2)])
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        skip = self.down[0](x)
        return self.head(self.up[0](self.down[1](skip)) + skip)

    def feature_tap_points(self) -> TapPoints:
        return TapPoints(encoder=tuple(self.down), decoder=tuple(self.up), encoder_channels=(4, 8))


class _TheirNet(_TinyUNet):
    """A class one cannot edit: declared from outside, the declaration wins over nothing else."""

    feature_tap_points = None


def test_user_networks_declare_their_taps_in_a_few_lines():
    for net in (_TinyUNet(), _TheirNet()):
        if isinstance(net, _TheirNet):
            with pytest.raises(UnsupportedArchitectureError, match="_TheirNet"):
                tap_points(net)
            declare_taps(_TheirNet)(lambda n: TapPoints(encoder=tuple(n.down), decoder=tuple(n.up)))
        taps = FeatureTaps()
        taps.attach(net.train())
        out = net(torch.randn(2, 1, 8, 8))
        enc, dec = taps.pop()
        assert [e.shape[1] for e in enc] == [4, 8] and dec[0].shape == (2, 4, 8, 8)
        # the SelfReg regulariser runs on them: e_2 and nothing from the decoder but the teacher
        terms = SelfRegRegularizer()(enc, dec)
        assert torch.isfinite(terms["total"]) and terms["ifd_dec"] == 0
        assert out.shape == (2, 2, 8, 8)


class _OldStyleNet(_TinyUNet):
    """A user's network declared with the hook's former name, selfreg_tap_points."""

    feature_tap_points = None

    def selfreg_tap_points(self) -> TapPoints:
        return TapPoints(encoder=tuple(self.down), decoder=tuple(self.up), encoder_channels=(4, 8))


def test_the_former_declaration_name_still_works_with_a_deprecation_warning():
    net = _OldStyleNet()
    with pytest.warns(DeprecationWarning, match="selfreg_tap_points.*rename it feature_tap_points"):
        points = tap_points(net)
    assert points.encoder == tuple(net.down) and points.decoder == tuple(net.up)
    assert points.encoder_channels == (4, 8)


def test_primus_tokens_become_maps_on_the_token_grid():
    from dynamic_network_architectures.architectures.primus import Primus

    net = Primus(1, 24, (4, 4, 4), 3, 8, 2, (8, 16, 12)).train()
    points = tap_points(net)
    assert points.encoder == (net.eva.blocks[1], net.eva.blocks[3], net.eva.blocks[5])
    assert points.decoder == (net.eva.blocks[7],) and points.first_student == 0
    taps = FeatureTaps()
    taps.attach(net)
    captured = {}
    handle = net.eva.blocks[7].register_forward_hook(lambda m, a, o: captured.setdefault("tokens", o))
    net(torch.randn(2, 1, 8, 16, 12))
    handle.remove()
    enc, dec = taps.pop()
    assert all(m.shape == (2, 24, 2, 4, 3) for m in [*enc, *dec])
    # token (w, h, d) sits at index w*H*D + h*D + d, as Primus's own rearrange "b (w h d) c" has it
    tokens = captured["tokens"]
    assert torch.equal(dec[0][:, :, 1, 2, 0], tokens[:, 1 * 4 * 3 + 2 * 3 + 0, :])


def test_stage_with_one_channel_rejected_before_training():
    cls, kwargs, _ = ARCHS["plain2d"]
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    keys = ("conv_op", "norm_op", "dropout_op", "nonlin")
    net = get_network_from_plans(cls, {**kwargs, "features_per_stage": [8, 1, 32, 32]}, keys, 1, 3)
    with pytest.raises(ValueError, match="encoder stage 1 has 1 feature channel"):
        UNetFeatureTaps().attach(net)
    UNetFeatureTaps().attach(net, min_channels=1)  # SCR alone can handle it
    # e_1 is not a student (as in the authors' code): a 1-channel first stage is fine
    net = get_network_from_plans(cls, {**kwargs, "features_per_stage": [1, 16, 32, 32]}, keys, 1, 3)
    UNetFeatureTaps().attach(net)


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
