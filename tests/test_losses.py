"""SelfReg losses against values worked out by hand on tiny tensors."""

import itertools

import pytest
import torch

from nnunet_selfreg.losses import (
    SelfRegRegularizer,
    internal_feature_distillation_loss,
    pool_to_common_size,
    semantic_consistency_loss,
)


def test_scr_2d_pools_teacher_to_student_size():
    # teacher 4x4 holding 0..15, pooled 2x2 -> [[2.5, 4.5], [10.5, 12.5]]; student zeros (k = 1)
    teacher = torch.arange(16.0).reshape(1, 1, 4, 4)
    student = torch.zeros(1, 1, 2, 2)
    loss = semantic_consistency_loss(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4)  # 73.25


def test_scr_3d_anisotropic_pooling():
    # teacher t[z, y, x] = 12 z + 3 y + x on 2x4x3, student 1x2x3: z 2->1, y 4->2, x kept.
    # pooled p[0, y', x] = 7.5 + 6 y' + x -> values 7.5 8.5 9.5 13.5 14.5 15.5
    z, y, x = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), torch.arange(3.0), indexing="ij")
    teacher = (12 * z + 3 * y + x).reshape(1, 1, 2, 4, 3)
    student = torch.zeros(1, 1, 1, 2, 3)
    expected = (7.5**2 + 8.5**2 + 9.5**2 + 13.5**2 + 14.5**2 + 15.5**2) / 6  # 141.91666...
    assert semantic_consistency_loss(student, teacher).item() == pytest.approx(expected)
    # mixed per-axis sizes pool both maps to the per-axis minimum
    a, b = pool_to_common_size(torch.zeros(1, 1, 5, 7, 3), torch.zeros(1, 1, 6, 4, 3))
    assert a.shape[2:] == b.shape[2:] == (5, 4, 3)


def test_scr_random_channel_matching_is_seeded_and_valid():
    # student channels are constant 0 and 10, teacher channels constant 1, 2, 3 (k = 2):
    # the loss is the mean of (s_i - t_j)^2 over one injective pairing of the 2 student channels.
    student = torch.tensor([0.0, 10.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2).contiguous()
    teacher = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    valid = set()
    for s_perm in itertools.permutations([0.0, 10.0]):
        for t_pick in itertools.permutations([1.0, 2.0, 3.0], 2):
            valid.add(round(sum((s - t) ** 2 for s, t in zip(s_perm, t_pick, strict=True)) / 2, 6))
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        value = round(semantic_consistency_loss(student, teacher, generator=g).item(), 6)
        assert value in valid
        seen.add(value)
        g2 = torch.Generator().manual_seed(seed)
        assert semantic_consistency_loss(student, teacher, generator=g2).item() == pytest.approx(value)
    assert len(seen) > 1  # the pairing really is random


def test_scr_teacher_is_detached():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 8, 8, requires_grad=True)
    semantic_consistency_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def _ifd_example() -> torch.Tensor:
    # channels: c0 = [1, 0], c1 = [3, 4], c2 = [0, 2]; L2-normalised means: 0.5, 0.7, 0.5
    # stable descending order: c1, c0, c2; h = 1 -> MSE(c1, c0) = ((3-1)^2 + (4-0)^2) / 2 = 10; c2 left out
    return torch.tensor([[[[1.0, 0.0]], [[3.0, 4.0]], [[0.0, 2.0]]]])


def test_ifd_odd_channels_by_hand():
    assert internal_feature_distillation_loss(_ifd_example()).item() == pytest.approx(10.0)


def test_ifd_gradients_both_halves_or_detached_first_half():
    f = _ifd_example().requires_grad_(True)
    internal_feature_distillation_loss(f).backward()
    # d/dc1 = 2 (c1 - c0) / 2 = [2, 4]; d/dc0 = -[2, 4]; c2 unused
    assert torch.allclose(f.grad[0, 1, 0], torch.tensor([2.0, 4.0]))
    assert torch.allclose(f.grad[0, 0, 0], torch.tensor([-2.0, -4.0]))
    assert torch.all(f.grad[0, 2] == 0)
    g = _ifd_example().requires_grad_(True)
    loss = internal_feature_distillation_loss(g, detach_first_half=True)
    assert loss.item() == pytest.approx(10.0)
    loss.backward()
    assert torch.all(g.grad[0, 1] == 0)  # the first (higher-scored) half is the teacher
    assert torch.allclose(g.grad[0, 0, 0], torch.tensor([-2.0, -4.0]))


def test_ifd_3d_anisotropic_by_hand():
    # 2 channels on a 1x1x2 volume: c0 = [0, 1] (score 0.5), c1 = [2, 2] (score 1/sqrt(2) ~ 0.707)
    # order c1, c0 -> MSE = ((2-0)^2 + (2-1)^2) / 2 = 2.5
    f = torch.tensor([0.0, 1.0, 2.0, 2.0]).reshape(1, 2, 1, 1, 2)
    assert internal_feature_distillation_loss(f).item() == pytest.approx(2.5)


def test_fewer_than_two_channels_rejected_clearly():
    with pytest.raises(ValueError, match="at least 2"):
        internal_feature_distillation_loss(torch.randn(1, 1, 4, 4))
    reg = SelfRegRegularizer()
    with pytest.raises(ValueError, match="encoder stage 1 output has 1 channel"):
        reg([torch.randn(1, 4, 4, 4), torch.randn(1, 1, 4, 4)], [torch.randn(1, 4, 4, 4)])
    # e_1 is not a student by default: a 1-channel e_1 is fine, unless it is tapped too
    reg([torch.randn(1, 1, 4, 4), torch.randn(1, 2, 2, 2)], [torch.randn(1, 4, 4, 4)])
    with pytest.raises(ValueError, match="encoder stage 0 output has 1 channel"):
        SelfRegRegularizer(include_first_encoder=True)([torch.randn(1, 1, 4, 4)], [torch.randn(1, 4, 4, 4)])


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="shape"):
        semantic_consistency_loss(torch.randn(4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        semantic_consistency_loss(torch.randn(2, 2, 4, 4), torch.randn(3, 2, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        internal_feature_distillation_loss(torch.ones(1, 2, 2, 2, dtype=torch.int64))


@pytest.mark.parametrize("include_first_encoder", [False, True])
def test_regularizer_total_matches_its_terms(include_first_encoder):
    torch.manual_seed(0)
    enc = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    dec = [torch.randn(2, 8, 8, 8), torch.randn(2, 4, 16, 16)]
    reg = SelfRegRegularizer(include_first_encoder=include_first_encoder)
    out = reg(enc, dec, generator=torch.Generator().manual_seed(3))
    # students: e_2, e_3 (+ e_1 if included) and d_1; F_final = d_2 is the teacher, never a student
    enc_students = enc if include_first_encoder else enc[1:]
    ifd_enc = sum(internal_feature_distillation_loss(f) for f in enc_students) / len(enc_students)
    ifd_dec = internal_feature_distillation_loss(dec[0])
    assert out["ifd_enc"].item() == pytest.approx(ifd_enc.item(), rel=1e-6)
    assert out["ifd_dec"].item() == pytest.approx(ifd_dec.item(), rel=1e-6)
    # SCR: (S-1)+(S-2) = 3 pairs (4 with e_1) against F_final, channel draws in the same order
    g = torch.Generator().manual_seed(3)
    students = [*enc_students, dec[0]]
    scr = sum(semantic_consistency_loss(f, dec[-1], generator=g) for f in students) / len(students)
    assert out["scr"].item() == pytest.approx(scr.item(), rel=1e-6)
    assert out["total"].item() == pytest.approx((ifd_enc + ifd_dec + scr).item(), rel=1e-6)
    only_scr = SelfRegRegularizer(use_ifd=False)(enc, dec)
    assert only_scr["ifd_enc"].item() == only_scr["ifd_dec"].item() == 0.0
    with pytest.raises(ValueError):
        SelfRegRegularizer(use_scr=False, use_ifd=False)


def test_first_encoder_map_is_ignored_by_default():
    # changing e_1 changes nothing unless it is tapped (the authors' code regularises e_2 .. e_S only)
    torch.manual_seed(0)
    enc = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    dec = [torch.randn(1, 4, 8, 8)]
    other = [enc[0] * 5 + 1, enc[1]]
    a = SelfRegRegularizer()(enc, dec, generator=torch.Generator().manual_seed(0))
    b = SelfRegRegularizer()(other, dec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["total"], b["total"])
    c = SelfRegRegularizer(include_first_encoder=True)(enc, dec, generator=torch.Generator().manual_seed(0))
    d = SelfRegRegularizer(include_first_encoder=True)(other, dec, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(c["total"], d["total"])


def test_scr_explicit_indices_and_their_validation():
    student = torch.arange(8.0).reshape(1, 2, 2, 2)
    teacher = torch.zeros(1, 3, 2, 2)
    teacher[0, 2] = 1.0
    # pairs (s0, t2), (s1, t0): ((0..3 - 1)^2 + (4..7)^2) / 8
    expected = (sum((v - 1) ** 2 for v in range(4)) + sum(v**2 for v in range(4, 8))) / 8
    assert semantic_consistency_loss(student, teacher, indices=([0, 1], [2, 0])).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="distinct channel indices"):
        semantic_consistency_loss(student, teacher, indices=([0, 0], [2, 0]))
    with pytest.raises(ValueError, match="distinct channel indices"):
        semantic_consistency_loss(student, teacher, indices=([0, 1], [2, 3]))


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_float32_under_bfloat16_autocast_with_large_activations(scale):
    torch.manual_seed(0)
    enc = [(torch.randn(2, 4, 8, 8) * scale).bfloat16(), (torch.randn(2, 8, 4, 4) * scale).bfloat16()]
    dec = [(torch.randn(2, 4, 8, 8) * scale).bfloat16()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SelfRegRegularizer()(enc, dec, generator=torch.Generator().manual_seed(0))
    for value in out.values():
        assert value.dtype == torch.float32 and torch.isfinite(value)
    ref = SelfRegRegularizer()(
        [f.float() for f in enc], [f.float() for f in dec], generator=torch.Generator().manual_seed(0)
    )
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-5)
