"""SelfReg-UNet regularisers (Zhu et al., "SelfReg-UNet: Self-Regularized UNet for Medical Image
Segmentation", MICCAI 2024, arXiv:2406.14896), N-dimensional.

Notation (docs/method.md): encoder stage outputs ``e_1 … e_S``, decoder stage outputs
``d_1 … d_{S-1}`` (coarsest to finest), ``F_final = d_{S-1}``. As in the authors' code, the students
are ``e_2 … e_S`` and ``d_1 … d_{S-2}``: the first, full-resolution encoder stage is not tapped.
Feature maps are ``(B, C, *spatial)`` with 2 or 3 spatial axes. Every term is computed in float32, also
under autocast (the squared differences of large float16 activations overflow).

Both terms are mean squared errors between gathered channels. They are computed by small autograd
functions that keep only what is alive anyway (the feature map, the channel indices, the detached
teacher) and recompute the difference in the backward pass: autograd's own ``index_select`` +
``mse_loss`` would keep two float32 copies of every gathered map until the backward pass and build
each gradient from a zero-filled buffer plus a scatter-add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "SelfRegRegularizer",
    "internal_feature_distillation_loss",
    "pool_to_common_size",
    "semantic_consistency_loss",
]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _check_feature_map(x: Tensor, name: str, min_channels: int = 1) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with 1 to 3 spatial axes, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] < min_channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channel(s); this term needs at least {min_channels}. "
            "Use a plans file whose stages have at least 2 features (features_per_stage), "
            "or disable the term."
        )
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def _pool(x: Tensor, size: Sequence[int]) -> Tensor:
    """Adaptive average pooling of ``x`` to spatial ``size``, per axis (identity if equal)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return _POOL[x.ndim - 2](x, size)


def pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pool ``a`` and ``b`` to their per-axis minimum spatial size by adaptive average pooling.

    In a U-Net the deeper map is never larger along any axis, so this pools the larger map down to
    the smaller one; per-axis minima also cover anisotropic 3D patches (e.g. ``5x7x3``).
    """
    if a.ndim != b.ndim:
        raise ValueError(f"feature maps have different dimensionality: {tuple(a.shape)} vs {tuple(b.shape)}")
    target = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    return _pool(a, target), _pool(b, target)


def _random_permutation(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``randperm(n)`` drawn where ``generator`` lives, on ``device``; its first ``k`` entries are distinct channels."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device).to(device, non_blocking=True)


def _pool_float(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` if it already has spatial ``size`` (any dtype), else ``x`` pooled to ``size`` in float32."""
    return x if tuple(x.shape[2:]) == tuple(size) else _pool(x.float(), size)


def _mse_scale(grad_out: Tensor, numel: int) -> Tensor:
    """``d mean(d²) / d d = 2 d / numel``, times the incoming gradient (a 0-dim tensor: no host sync)."""
    return grad_out * (2.0 / numel)


def _mean_squared_difference(a: Tensor, b: Tensor) -> Tensor:
    """``mean((a − b)²)`` in float32; ``a`` is a temporary (gathered) tensor and is overwritten."""
    d = a.float()
    return d.sub_(b).square_().mean()


class _IFDLoss(torch.autograd.Function):
    """``mean((x[:, first] − x[:, second])²)`` in float32 (IFD after sorting), gradient into ``x``.

    Saves only ``x`` (alive anyway) and the channel order. The backward pass needs no scatter: with
    ``π`` swapping each channel with its partner, the gradient is ``c · (x − x[:, π])`` (0 on the
    detached first half and on the left-out channel of an odd ``C``), one gathered buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, grad_first: bool) -> Tensor:
        h = x.shape[1] // 2
        ctx.grad_first = grad_first
        ctx.save_for_backward(x, order)
        return _mean_squared_difference(x.index_select(1, order[:h]), x.index_select(1, order[h : 2 * h]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, order = ctx.saved_tensors
        c, h = x.shape[1], x.shape[1] // 2
        first, second = order[:h], order[h : 2 * h]
        partner = torch.arange(c, device=order.device)
        partner.index_copy_(0, first, second)
        partner.index_copy_(0, second, first)
        grad = x.index_select(1, partner).float()
        grad.sub_(x).mul_(-_mse_scale(grad_out, x[:, :h].numel()))  # c · (x − x[:, π])
        grad = grad.to(x.dtype)
        if 2 * h < c:
            grad.index_fill_(1, order[2 * h :], 0)
        if not ctx.grad_first:
            grad.index_fill_(1, first, 0)
        return grad, None, None


class _SCRLoss(torch.autograd.Function):
    """``mean((s[:, idx_s] − t[:, idx_t])²)`` in float32 with ``t`` constant; gradient into ``s``.

    ``k = len(idx_s) = min(C_s, C_t)``, so one side uses all its channels: the pairs are reordered so
    that this side needs no gather (``J``: the teacher channel of each student channel when
    ``k = C_s``; ``K``: the student channel of each teacher channel otherwise). Saves only ``s``,
    ``t`` (both alive anyway) and the index; the backward pass recomputes the difference.
    """

    @staticmethod
    def forward(ctx, s: Tensor, idx_s: Tensor, t: Tensor, idx_t: Tensor) -> Tensor:
        if idx_s.numel() == s.shape[1]:
            ctx.all_student = True
            index = idx_t.index_select(0, torch.argsort(idx_s))
            loss = _mean_squared_difference(t.index_select(1, index), s)
        else:
            ctx.all_student = False
            index = idx_s.index_select(0, torch.argsort(idx_t))
            loss = _mean_squared_difference(s.index_select(1, index), t)
        ctx.save_for_backward(s, t, index)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        s, t, index = ctx.saved_tensors
        scale = _mse_scale(grad_out, s[:, : index.numel()].numel())
        if ctx.all_student:  # c · (s − t[:, J])
            grad = t.index_select(1, index).float()
            return grad.sub_(s).mul_(-scale).to(s.dtype), None, None, None
        diff = s.index_select(1, index).float()
        diff.sub_(t).mul_(scale)
        grad = torch.zeros_like(s)
        grad.index_copy_(1, index, diff.to(s.dtype))
        return grad, None, None, None


def semantic_consistency_loss(
    student: Tensor,
    teacher: Tensor,
    generator: torch.Generator | None = None,
    indices: tuple[Sequence[int] | Tensor, Sequence[int] | Tensor] | None = None,
) -> Tensor:
    """Semantic consistency regularisation (SCR) for one (student, teacher) pair.

    ``t = stopgrad(teacher)``; both maps are pooled to their per-axis minimum size
    (:func:`pool_to_common_size`); with ``k = min(C_s, C_t)``, ``k`` distinct random channels
    ``I_s`` of the student and, independently, ``k`` distinct random channels ``I_t`` of the teacher
    are drawn (fresh each call, from ``generator`` when given)::

        SCR(f, t) = 1 / (B k |Ω|) · Σ_b Σ_i Σ_x ( f[b, I_s(i), x] − t[b, I_t(i), x] )²

    ``indices=(I_s, I_t)`` replaces the draw (e.g. to reproduce another implementation's draws).
    Gradient reaches the student only. Computed in float32.
    """
    _check_feature_map(student, "student")
    _check_feature_map(teacher, "teacher")
    if student.shape[0] != teacher.shape[0] or student.ndim != teacher.ndim:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share batch size "
            "and number of spatial axes"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        target = tuple(min(x, y) for x, y in zip(student.shape[2:], teacher.shape[2:], strict=True))
        return _scr_aligned(_pool_float(student, target), _pool_float(teacher.detach(), target), generator, indices)


def _channel_indices(value: Sequence[int] | Tensor, k: int, channels: int, name: str, device: torch.device) -> Tensor:
    """Given channel indices as a long tensor on ``device``: ``k`` distinct values in ``[0, channels)``."""
    idx = torch.as_tensor(value, dtype=torch.long, device=device).flatten()
    if idx.numel() != k or idx.unique().numel() != k or (idx.numel() and (idx.min() < 0 or idx.max() >= channels)):
        raise ValueError(f"{name} must hold k = {k} distinct channel indices in [0, {channels}), got {value!r}")
    return idx


def _scr_aligned(
    s: Tensor,
    t: Tensor,
    generator: torch.Generator | None,
    indices: tuple[Sequence[int] | Tensor, Sequence[int] | Tensor] | None = None,
) -> Tensor:
    """SCR of a student and a detached teacher of the same spatial size (any float dtypes)."""
    k = min(s.shape[1], t.shape[1])
    if indices is not None:
        idx_s = _channel_indices(indices[0], k, s.shape[1], "student indices", s.device)
        idx_t = _channel_indices(indices[1], k, t.shape[1], "teacher indices", t.device)
        return _SCRLoss.apply(s, idx_s, t, idx_t)
    perm_s = _random_permutation(s.shape[1], generator, s.device)
    perm_t = _random_permutation(t.shape[1], generator, t.device)
    return _SCRLoss.apply(s, perm_s[:k], t, perm_t[:k])


def _ifd_order(x: Tensor) -> Tensor:
    """Channels sorted by descending score ``s_c`` (stable), scores computed in float32 without a copy."""
    with torch.no_grad():
        flat = x.flatten(2)
        sums = flat.sum(dim=2, dtype=torch.float32)
        norms = torch.linalg.vector_norm(flat, dim=2, dtype=torch.float32).clamp_min_(1e-12)
        scores = (sums / norms).mean(dim=0) / flat.shape[2]
        return torch.sort(scores, descending=True, stable=True).indices


def internal_feature_distillation_loss(features: Tensor, detach_first_half: bool = False) -> Tensor:
    """Internal feature distillation (IFD) of one feature map ``f`` with ``C >= 2`` channels.

    Channel score (mean over batch and space after L2-normalising each channel over space)::

        s_c = 1 / (B |Ω|) · Σ_b Σ_x f[b, c, x] / ||f[b, c, :]||₂

    Channels are sorted by ``s_c`` descending (stable sort), ``σ``; with ``h = C // 2`` (for odd
    ``C`` the last sorted channel is left out)::

        IFD(f) = 1 / (B h |Ω|) · Σ_b Σ_{i<h} Σ_x ( f[b, σ(i), x] − f[b, σ(h+i), x] )²

    The reference implementation lets the gradient reach both halves (default);
    ``detach_first_half=True`` distils the first half into the second only, as the paper reads.
    Computed in float32.
    """
    _check_feature_map(features, "features", min_channels=2)
    with torch.autocast(device_type=features.device.type, enabled=False):
        order = _ifd_order(features)
        return _IFDLoss.apply(features, order, not detach_first_half)


def _mean(terms: list[Tensor], like: Tensor) -> Tensor:
    if not terms:
        return like.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


def _divides(small: Sequence[int], large: Sequence[int]) -> bool:
    return all(b % a == 0 for a, b in zip(small, large, strict=True))


class SelfRegRegularizer(nn.Module):
    """SelfReg-UNet's ``L_reg`` from a U-Net's tapped stage outputs.

    ``forward(encoder_features, decoder_features)`` takes ``[e_1 … e_S]`` and ``[d_1 … d_{S-1}]``
    (coarsest decoder stage first, so ``decoder_features[-1] = F_final``) and returns a dict of
    scalar float32 tensors ``scr``, ``ifd_enc``, ``ifd_dec`` and ``total``. As in the authors' code
    the first, full-resolution encoder map ``e_1`` is not a student (``include_first_encoder=True``
    makes it one)::

        L_reg = mean_{f ∈ e_2..e_S} IFD(f) + mean_{f ∈ d_1..d_{S-2}} IFD(f)
              + mean_{f ∈ e_2..e_S, d_1..d_{S-2}} SCR(f, F_final)

    i.e. SCR averages over (S-1)+(S-2) pairs and the encoder IFD over S-1 maps. Disabled terms are
    zero. The detached, pooled teacher is computed once per distinct target size, from the smallest
    already pooled map that the target size divides exactly (block averages of block averages: the
    same values as pooling ``F_final`` directly, up to rounding). The module has no parameters or
    buffers.
    """

    def __init__(
        self,
        use_scr: bool = True,
        use_ifd: bool = True,
        detach_first_half: bool = False,
        include_first_encoder: bool = False,
    ) -> None:
        super().__init__()
        if not (use_scr or use_ifd):
            raise ValueError("SelfRegRegularizer needs at least one of use_scr / use_ifd")
        self.use_scr = use_scr
        self.use_ifd = use_ifd
        self.detach_first_half = detach_first_half
        self.include_first_encoder = include_first_encoder

    def extra_repr(self) -> str:
        return (
            f"use_scr={self.use_scr}, use_ifd={self.use_ifd}, detach_first_half={self.detach_first_half}, "
            f"include_first_encoder={self.include_first_encoder}"
        )

    @staticmethod
    def _pooled_teachers(teacher: Tensor, targets: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
        """The detached teacher pooled to each target size (float32; the full size keeps its dtype)."""
        full = tuple(teacher.shape[2:])
        t = teacher.detach()
        t_float = t.float()  # no copy for float32 features; freed after pooling otherwise
        pooled = {full: t}
        exact = [full]  # sizes whose map is an exact block average of F_final
        for target in sorted(set(targets) - {full}, key=lambda s: torch.Size(s).numel(), reverse=True):
            sources = [s for s in exact if _divides(target, s)]
            if sources:
                source = min(sources, key=lambda s: torch.Size(s).numel())
                pooled[target] = _pool(t_float if source == full else pooled[source], target)
                exact.append(target)
            else:
                pooled[target] = _pool(t_float, target)
        return pooled

    def students(
        self, encoder_features: Sequence[Tensor], decoder_features: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The encoder and decoder maps that are regularised (all but ``e_1`` and ``F_final`` by default)."""
        return list(encoder_features[0 if self.include_first_encoder else 1 :]), list(decoder_features[:-1])

    def forward(
        self,
        encoder_features: Sequence[Tensor],
        decoder_features: Sequence[Tensor],
        generator: torch.Generator | None = None,
        scr_indices: Sequence[tuple[Sequence[int] | Tensor, Sequence[int] | Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """``scr_indices``: one ``(I_s, I_t)`` per SCR pair (students in order ``e…, d…``) instead of draws."""
        first = 0 if self.include_first_encoder else 1
        if len(encoder_features) < first + 1 or len(decoder_features) < 1:
            raise ValueError(
                f"need at least {first + 1} encoder and one decoder feature map, got {len(encoder_features)} "
                f"and {len(decoder_features)}"
            )
        enc_students, dec_students = self.students(encoder_features, decoder_features)
        min_channels = 2 if self.use_ifd else 1
        for i, f in enumerate(enc_students, start=first):
            _check_feature_map(f, f"encoder stage {i} output", min_channels=min_channels)
        for i, f in enumerate(dec_students):
            _check_feature_map(f, f"decoder stage {i} output", min_channels=min_channels)
        teacher = decoder_features[-1]
        _check_feature_map(teacher, "F_final (last decoder stage output)")
        students = [*enc_students, *dec_students]
        if scr_indices is not None and len(scr_indices) != len(students):
            raise ValueError(f"scr_indices needs one (I_s, I_t) per student ({len(students)}), got {len(scr_indices)}")
        zero = teacher.new_zeros((), dtype=torch.float32)
        out = {"scr": zero, "ifd_enc": zero, "ifd_dec": zero}
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            if self.use_ifd:
                out["ifd_enc"] = _mean(
                    [internal_feature_distillation_loss(f, self.detach_first_half) for f in enc_students], teacher
                )
                out["ifd_dec"] = _mean(
                    [internal_feature_distillation_loss(f, self.detach_first_half) for f in dec_students], teacher
                )
            if self.use_scr and students:
                targets = []
                for f in students:
                    if f.shape[0] != teacher.shape[0] or f.ndim != teacher.ndim:
                        raise ValueError(
                            f"tapped map {tuple(f.shape)} does not match F_final {tuple(teacher.shape)} "
                            "in batch size or number of spatial axes"
                        )
                    targets.append(tuple(min(a, b) for a, b in zip(f.shape[2:], teacher.shape[2:], strict=True)))
                pooled = self._pooled_teachers(teacher, targets)
                draws = scr_indices if scr_indices is not None else [None] * len(students)
                pair_losses = [
                    _scr_aligned(_pool_float(f, target), pooled[target], generator, idx)
                    for f, target, idx in zip(students, targets, draws, strict=True)
                ]
                out["scr"] = _mean(pair_losses, teacher)
        out["total"] = out["scr"] + out["ifd_enc"] + out["ifd_dec"]
        return out
