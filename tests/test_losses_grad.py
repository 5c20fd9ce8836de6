"""The hand-written backward passes of SCR, IFD and the gradient gate against plain autograd.

Each case recomputes the same formula with ordinary autograd ops (adaptive average pooling,
indexing, ``mse_loss``) and compares the gradients, so a sign, scale or index error in a custom
backward fails here (the forward values alone cannot show it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_selfreg.losses import SelfRegRegularizer, internal_feature_distillation_loss, semantic_consistency_loss
from nnunet_selfreg.losses.selfreg_objective import _GradientGate

_POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _plain_scr(s: torch.Tensor, t: torch.Tensor, idx_s, idx_t) -> torch.Tensor:
    size = [min(a, b) for a, b in zip(s.shape[2:], t.shape[2:], strict=True)]
    pool = _POOL[s.ndim - 2]
    return F.mse_loss(pool(s, size)[:, idx_s], pool(t.detach(), size)[:, idx_t])


def _plain_ifd(f: torch.Tensor, detach_first_half: bool = False) -> torch.Tensor:
    norms = f.flatten(2).norm(dim=2).clamp_min(1e-12).reshape(*f.shape[:2], *([1] * (f.ndim - 2)))
    scores = (f / norms).mean(dim=[0, *range(2, f.ndim)])
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    h = f.shape[1] // 2
    first, second = f[:, order[:h]], f[:, order[h : 2 * h]]
    return F.mse_loss(first.detach() if detach_first_half else first, second)


CASES = {  # name: (student shape, teacher shape)
    "Cs<Ct 2d": ((2, 3, 4, 4), (2, 6, 8, 8)),
    "Cs>Ct 2d": ((2, 7, 4, 4), (2, 4, 8, 8)),
    "Cs=Ct 2d": ((2, 5, 8, 8), (2, 5, 8, 8)),
    "Cs<Ct 3d aniso": ((2, 4, 2, 3, 5), (2, 6, 4, 6, 5)),
    "Cs>Ct 3d aniso": ((1, 9, 3, 2, 2), (1, 4, 6, 4, 4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scr_backward_matches_autograd(name):
    s_shape, t_shape = CASES[name]
    g = torch.Generator().manual_seed(1)
    s = torch.randn(s_shape, generator=g).requires_grad_(True)
    t = torch.randn(t_shape, generator=g).requires_grad_(True)
    k = min(s_shape[1], t_shape[1])
    idx_s = torch.randperm(s_shape[1], generator=g)[:k]
    idx_t = torch.randperm(t_shape[1], generator=g)[:k]
    ours = semantic_consistency_loss(s, t, indices=(idx_s, idx_t))
    (grad_ours,) = torch.autograd.grad(3.0 * ours, s)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = _plain_scr(s_ref, t, idx_s, idx_t)
    (grad_ref,) = torch.autograd.grad(3.0 * ref, s_ref)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (2, 7, 3, 4), (1, 5, 2, 3, 4), (2, 8, 3, 1, 2)])
@pytest.mark.parametrize("detach_first_half", [False, True])
def test_ifd_backward_matches_autograd(shape, detach_first_half):
    f = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    ours = internal_feature_distillation_loss(f, detach_first_half)
    (grad_ours,) = torch.autograd.grad(-2.0 * ours, f)
    f_ref = f.detach().clone().requires_grad_(True)
    ref = _plain_ifd(f_ref, detach_first_half)
    (grad_ref,) = torch.autograd.grad(-2.0 * ref, f_ref)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dim", [2, 3])
def test_regulariser_total_backward_matches_autograd(dim):
    g = torch.Generator().manual_seed(3)
    sp = [(16, 16), (8, 8), (4, 4)] if dim == 2 else [(4, 16, 16), (2, 8, 8), (1, 4, 4)]
    enc_shapes = [(2, 4, *sp[0]), (2, 6, *sp[1]), (2, 9, *sp[2])]
    dec_shapes = [(2, 6, *sp[1]), (2, 5, *sp[0])]
    enc = [torch.randn(s, generator=g).requires_grad_(True) for s in enc_shapes]
    dec = [torch.randn(s, generator=g).requires_grad_(True) for s in dec_shapes]
    teacher = dec[-1]
    students = [*enc[1:], *dec[:-1]]
    draws = []
    for f in students:
        k = min(f.shape[1], teacher.shape[1])
        draws.append((torch.randperm(f.shape[1], generator=g)[:k], torch.randperm(teacher.shape[1], generator=g)[:k]))
    out = SelfRegRegularizer()(enc, dec, scr_indices=draws)
    grads = torch.autograd.grad(out["total"], [*enc, *dec], allow_unused=True)
    ref_inputs = [x.detach().clone().requires_grad_(True) for x in [*enc, *dec]]
    r_enc, r_dec = ref_inputs[: len(enc)], ref_inputs[len(enc) :]
    r_students = [*r_enc[1:], *r_dec[:-1]]
    ifd_enc = torch.stack([_plain_ifd(f) for f in r_enc[1:]]).mean()
    ifd_dec = torch.stack([_plain_ifd(f) for f in r_dec[:-1]]).mean()
    scr = torch.stack([_plain_scr(f, r_dec[-1], *d) for f, d in zip(r_students, draws, strict=True)]).mean()
    ref_total = ifd_enc + ifd_dec + scr
    ref_grads = torch.autograd.grad(ref_total, ref_inputs, allow_unused=True)
    assert out["total"].item() == pytest.approx(ref_total.item(), rel=1e-6)
    for ours, ref in zip(grads, ref_grads, strict=True):
        if ref is None:  # e_1 (not a student) and F_final (detached teacher)
            assert ours is None or torch.count_nonzero(ours) == 0
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_gradient_gate_passes_or_zeroes_by_the_flag_set_after_forward():
    x = torch.randn(3, 4, requires_grad=True)
    for open_gate in (True, False):
        flag = torch.ones((), dtype=torch.bool)
        y = _GradientGate.apply(x, flag)
        assert torch.equal(y, x)
        flag.fill_(open_gate)  # decided after the forward, as the loss does once L_reg is known
        (grad,) = torch.autograd.grad((y * torch.arange(12.0).reshape(3, 4)).sum(), x)
        expected = torch.arange(12.0).reshape(3, 4) if open_gate else torch.zeros(3, 4)
        assert torch.equal(grad, expected)
