"""``nnunet-selfreg analyze``'s statistics on features with known answers, Grad-CAM and eval-mode taps."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_selfreg.analysis.feature_stats import (
    ChannelMoments,
    CrossMoments,
    effective_rank,
    effective_rank_of_covariance,
    linear_cka,
    mean_abs_channel_correlation,
)
from nnunet_selfreg.analysis.gradcam import class_score, grad_cam, normalise_map
from nnunet_selfreg.losses.selfreg import semantic_consistency_loss
from nnunet_selfreg.taps import UNetFeatureTaps
from tests.nets import ARCHS, batch, build


def _features(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hadamard_columns() -> torch.Tensor:
    """4 samples x 3 channels: centred, pairwise orthogonal columns of equal norm (Hadamard 4, minus column 1)."""
    return torch.tensor([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)


# --------------------------------------------------------------------------- redundancy


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 1, 4, 8, 6), (300, 1)])
def test_identical_channels_are_fully_redundant(shape):
    base = _features(0, shape)
    x = torch.cat([base, -2.0 * base + 3.0, 0.5 * base, base], dim=1)  # affine copies, one with negative slope
    assert mean_abs_channel_correlation(x) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_channels_have_zero_correlation_and_full_rank():
    x = _hadamard_columns()  # (n, C) = (4, 3)
    assert mean_abs_channel_correlation(x) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(x) == pytest.approx(3.0, abs=1e-9)
    spatial = x.T.reshape(1, 3, 2, 2)  # the same samples laid out as a (B, C, H, W) map
    assert mean_abs_channel_correlation(spatial) == pytest.approx(0.0, abs=1e-12)
    assert effective_rank(spatial) == pytest.approx(3.0, abs=1e-9)


def test_independent_channels_are_nearly_uncorrelated_and_full_rank():
    x = _features(1, (4, 8, 32, 32))  # 4096 samples of 8 independent channels
    assert mean_abs_channel_correlation(x) < 0.03
    assert 7.9 < effective_rank(x) <= 8.0


def test_effective_rank_by_hand():
    # eigenvalues 2, 1, 1 -> p = (1/2, 1/4, 1/4), H = 1.5 ln 2, erank = 2^1.5
    assert effective_rank_of_covariance(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(2**1.5)
    assert effective_rank_of_covariance(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)
    assert math.isnan(effective_rank_of_covariance(torch.zeros(3, 3)))


def test_constant_channels_are_left_out_of_the_correlation():
    x = _hadamard_columns()
    with_constant = torch.cat([x, torch.full((4, 1), 7.0, dtype=torch.float64)], dim=1)
    assert mean_abs_channel_correlation(with_constant) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(mean_abs_channel_correlation(torch.ones(5, 2)))


# --------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("shape", [(3, 6, 10, 10), (2, 5, 4, 6, 5), (200, 7)])
def test_cka_of_a_map_with_itself_is_one(shape):
    x = _features(2, shape)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = _features(3, (2, 6, 12, 12))
    y = torch.tanh(x[:, :4]) + 0.3 * _features(4, (2, 4, 12, 12))  # related to x, fewer channels
    q, _ = torch.linalg.qr(_features(5, (4, 4)))
    y_rot = torch.einsum("dc,bc...->bd...", q, y)
    ref = linear_cka(x, y)
    assert 0.1 < ref < 0.99
    assert linear_cka(x, y_rot) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x + 5.0, 0.01 * y_rot - 2.0) == pytest.approx(ref, abs=1e-10)  # centring
    assert linear_cka(y, x) == pytest.approx(ref, abs=1e-12)  # symmetric
    x_scaled_channel = x.clone()
    x_scaled_channel[:, 0] *= 10.0  # anisotropic scaling is not an invariance
    assert abs(linear_cka(x_scaled_channel, y) - ref) > 1e-3


def test_cka_by_hand():
    # one channel each: CKA is the squared Pearson correlation; x - mean = (-1, 0, 1), y - mean = (0, -1, 1)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25)  # (x·y)^2 / (|x|^2 |y|^2) = 1 / 4
    # X = 4 samples on the axes (XᵀX = 2I), Y = its first column: ‖YᵀX‖² = 4, ‖XᵀX‖ = 2√2, ‖YᵀY‖ = 2
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(x2, x2[:, :1]) == pytest.approx(1 / math.sqrt(2))


def test_cka_of_independent_maps_is_small_and_streaming_matches_one_batch():
    x = _features(6, (4, 5, 20, 20))
    y = _features(7, (4, 3, 20, 20))
    assert linear_cka(x, y) < 0.02
    streamed = CrossMoments()
    for b in range(4):
        streamed.update(x[b : b + 1], y[b : b + 1])
    assert streamed.cka() == pytest.approx(linear_cka(x, y), abs=1e-12)
    m = ChannelMoments().update(x[:2]).update(x[2:])
    assert torch.allclose(m.covariance(), ChannelMoments().update(x).covariance())
    with pytest.raises(ValueError, match="share batch and spatial size"):
        linear_cka(x, y[:, :, :10])


def test_scr_of_a_single_channel_map_with_itself_is_zero():
    x = _features(8, (2, 1, 8, 8)).float()
    assert float(semantic_consistency_loss(x, x)) == pytest.approx(0.0)


# --------------------------------------------------------------------------- Grad-CAM and taps


def test_grad_cam_of_a_two_layer_example_by_hand():
    """A_1 = (x, −x) (a 1x1 convolution with weights 1, −1), A_2 = ReLU(A_1), y = mean_x(2·A_2,0 − A_2,1).

    x = [[1, −2], [3, 0]]: A_2,0 = [[1, 0], [3, 0]], A_2,1 = [[0, 2], [0, 0]], y = (2·4 − 2) / 4 = 1.5.
    Stage 2: ∂y/∂A_2 = (2/4, −1/4) everywhere, α = (0.5, −0.25), CAM = ReLU(0.5·A_2,0 − 0.25·A_2,1)
    = ReLU([[0.5, −0.5], [1.5, 0]]) = [[0.5, 0], [1.5, 0]]. Stage 1: ∂y/∂A_1,0 = 0.5·[A_1,0 > 0]
    = [[0.5, 0], [0.5, 0]], α_0 = 0.25; ∂y/∂A_1,1 = −0.25·[A_1,1 > 0] = [[0, −0.25], [0, 0]], α_1 = −0.0625;
    CAM = ReLU(0.25·x + 0.0625·x) = ReLU(0.3125·x) = [[0.3125, 0], [0.9375, 0]].
    """
    x = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]], requires_grad=True)

    def layers() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a1 = torch.cat([x, -x], dim=1)
        a2 = torch.relu(a1)
        return a1, a2, (2 * a2[:, 0] - a2[:, 1]).mean()

    a1, a2, score = layers()
    assert float(score) == pytest.approx(1.5)
    cam1, cam2 = grad_cam([a1, a2], score)
    assert torch.allclose(cam1, torch.tensor([[[0.3125, 0.0], [0.9375, 0.0]]]))
    assert torch.allclose(cam2, torch.tensor([[[0.5, 0.0], [1.5, 0.0]]]))

    # upsampled to (2, 4) (bilinear, align_corners=False): a row (u, v) becomes (u, ¾u + ¼v, ¼u + ¾v, v)
    _, a2, score = layers()
    (wide,) = grad_cam([a2], score, size=(2, 4))
    assert torch.allclose(wide, torch.tensor([[[0.5, 0.375, 0.125, 0.0], [1.5, 1.125, 0.375, 0.0]]]))


@pytest.mark.parametrize("arch", ["plain2d", "plain3d_aniso"])
def test_grad_cam_shapes_and_non_negativity(arch):
    net = build(arch, deep_supervision=False).eval()
    taps = UNetFeatureTaps(capture_eval=True)
    taps.attach(net, min_channels=1)
    x = batch(arch)
    logits = net(x)
    enc, dec = taps.pop()
    score, region, found = class_score(logits, 1)
    assert region.shape == (x.shape[0], *x.shape[2:]) and score.ndim == 0
    cams = grad_cam([*enc, *dec], score, size=x.shape[2:])
    assert len(cams) == len(enc) + len(dec) == 2 * ARCHS[arch][1]["n_stages"] - 1
    for cam in cams:
        assert cam.shape == (x.shape[0], *x.shape[2:])
        assert torch.isfinite(cam).all() and (cam >= 0).all()
    assert any(float(c.max()) > 0 for c in cams)
    out = net(x)
    enc2, _ = taps.pop()
    own = grad_cam(enc2, out[:, 1].mean())  # size None: each map keeps its own size
    assert [tuple(c.shape[1:]) for c in own] == [tuple(f.shape[2:]) for f in enc]
    normalised = normalise_map(cams[-1])
    assert float(normalised.max()) == pytest.approx(1.0) and float(normalised.min()) >= 0
    taps.detach()


def test_class_score_falls_back_to_the_whole_image_when_the_class_is_not_predicted():
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        logits[:, 0] = 5.0  # background everywhere
    score, region, found = class_score(logits, 2)
    assert not found and not region.any() and float(score.detach()) == 0.0
    score.backward()
    assert torch.allclose(logits.grad[:, 2], torch.full((1, 4, 4), 1 / 16))
    with pytest.raises(ValueError, match="not an output channel"):
        class_score(logits, 3)


def test_taps_capture_eval_mode_only_when_asked():
    net = build("plain2d").eval()
    default, eval_taps = UNetFeatureTaps(), UNetFeatureTaps(capture_eval=True)
    default.attach(net)
    eval_taps.attach(net)
    with torch.no_grad():
        net(batch("plain2d"))
    assert default.pop() is None
    enc, dec = eval_taps.pop()
    assert len(enc) == 4 and len(dec) == 3
    default.detach()
    eval_taps.detach()
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0


def test_gradcam_row_labels_wrap_at_name_separators():
    from nnunet_selfreg.analysis.analysis_report import _wrap_name

    for name in (
        "nnUNetTrainerSelfReg_Budget",
        "Dataset950_DSB2018Nuclei/nnUNetTrainer_Rep2__nnUNetPlans__2d",
        "short",
    ):
        lines = _wrap_name(name, width=22).split("\n")
        assert "".join(lines) == name and all(len(line) <= 22 for line in lines), lines
    assert _wrap_name("nnUNetTrainerSelfReg_Budget", width=22) == "nnUNetTrainerSelfReg_\nBudget"
    assert _wrap_name("a" * 30, width=22) == "a" * 30  # nothing to break at: kept whole
