"""SelfReg-UNet regularisers (Zhu et al., "SelfReg-UNet: Self-Regularized UNet for Medical Image
Segmentation", MICCAI 2024, arXiv:2406.14896), N-dimensional.

Notation follows ``shared/methods.md``: encoder stage outputs ``e_1 … e_S``, decoder stage outputs
``d_1 … d_{S-1}`` (coarsest to finest), ``F_final = d_{S-1}``. Feature maps are ``(B, C, *spatial)``
with 2 or 3 spatial axes. Every term is computed in float32, also under autocast (the squared
differences of large float16 activations overflow).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def _random_channels(n: int, k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    idx = torch.randperm(n, generator=generator, device=gen_device)[:k]
    return idx.to(device, non_blocking=True)


def semantic_consistency_loss(
    student: Tensor,
    teacher: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Semantic consistency regularisation (SCR) for one (student, teacher) pair.

    ``t = stopgrad(teacher)``; both maps are pooled to their per-axis minimum size
    (:func:`pool_to_common_size`); with ``k = min(C_s, C_t)``, ``k`` distinct random channels
    ``I_s`` of the student and, independently, ``k`` distinct random channels ``I_t`` of the teacher
    are drawn (fresh each call, from ``generator`` when given)::

        SCR(f, t) = 1 / (B k |Ω|) · Σ_b Σ_i Σ_x ( f[b, I_s(i), x] − t[b, I_t(i), x] )²

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
        s, t = pool_to_common_size(student.float(), teacher.detach().float())
        return _scr_aligned(s, t, generator)


def _scr_aligned(s: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
    k = min(s.shape[1], t.shape[1])
    idx_s = _random_channels(s.shape[1], k, generator, s.device)
    idx_t = _random_channels(t.shape[1], k, generator, t.device)
    return F.mse_loss(s.index_select(1, idx_s), t.index_select(1, idx_t))


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
        x = features.float()
        scores = F.normalize(x.flatten(2), p=2, dim=2).mean(dim=(0, 2))
        order = torch.sort(scores.detach(), descending=True, stable=True).indices
        h = x.shape[1] // 2
        first = x.index_select(1, order[:h])
        second = x.index_select(1, order[h : 2 * h])
        if detach_first_half:
            first = first.detach()
        return F.mse_loss(first, second)


def _mean(terms: list[Tensor], like: Tensor) -> Tensor:
    if not terms:
        return like.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


class SelfRegRegularizer(nn.Module):
    """SelfReg-UNet's ``L_reg`` from a U-Net's tapped stage outputs.

    ``forward(encoder_features, decoder_features)`` takes ``[e_1 … e_S]`` and ``[d_1 … d_{S-1}]``
    (coarsest decoder stage first, so ``decoder_features[-1] = F_final``) and returns a dict of
    scalar float32 tensors ``scr``, ``ifd_enc``, ``ifd_dec`` and ``total``::

        L_reg = mean_{f ∈ e_1..e_S} IFD(f) + mean_{f ∈ d_1..d_{S-2}} IFD(f)
              + mean_{f ∈ e_1..e_S, d_1..d_{S-2}} SCR(f, F_final)

    Disabled terms are zero. The detached, pooled teacher is computed once per distinct target
    size. The module has no parameters or buffers.
    """

    def __init__(self, use_scr: bool = True, use_ifd: bool = True, detach_first_half: bool = False) -> None:
        super().__init__()
        if not (use_scr or use_ifd):
            raise ValueError("SelfRegRegularizer needs at least one of use_scr / use_ifd")
        self.use_scr = use_scr
        self.use_ifd = use_ifd
        self.detach_first_half = detach_first_half

    def extra_repr(self) -> str:
        return f"use_scr={self.use_scr}, use_ifd={self.use_ifd}, detach_first_half={self.detach_first_half}"

    def forward(
        self,
        encoder_features: Sequence[Tensor],
        decoder_features: Sequence[Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        if len(encoder_features) < 1 or len(decoder_features) < 1:
            raise ValueError(
                f"need at least one encoder and one decoder feature map, got {len(encoder_features)} "
                f"and {len(decoder_features)}"
            )
        for i, f in enumerate(encoder_features):
            _check_feature_map(f, f"encoder stage {i} output", min_channels=2 if self.use_ifd else 1)
        for i, f in enumerate(decoder_features):
            _check_feature_map(f, f"decoder stage {i} output", min_channels=2 if self.use_ifd else 1)
        teacher = decoder_features[-1]
        students = [*encoder_features, *decoder_features[:-1]]
        zero = teacher.new_zeros((), dtype=torch.float32)
        out = {"scr": zero, "ifd_enc": zero, "ifd_dec": zero}
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            if self.use_ifd:
                out["ifd_enc"] = _mean(
                    [internal_feature_distillation_loss(f, self.detach_first_half) for f in encoder_features],
                    teacher,
                )
                out["ifd_dec"] = _mean(
                    [internal_feature_distillation_loss(f, self.detach_first_half) for f in decoder_features[:-1]],
                    teacher,
                )
            if self.use_scr and students:
                t_full = teacher.detach().float()
                pooled: dict[tuple[int, ...], Tensor] = {}
                pair_losses = []
                for f in students:
                    if f.shape[0] != teacher.shape[0] or f.ndim != teacher.ndim:
                        raise ValueError(
                            f"tapped map {tuple(f.shape)} does not match F_final {tuple(teacher.shape)} "
                            "in batch size or number of spatial axes"
                        )
                    target = tuple(min(a, b) for a, b in zip(f.shape[2:], teacher.shape[2:], strict=True))
                    if target not in pooled:
                        pooled[target] = _pool(t_full, target)
                    pair_losses.append(_scr_aligned(_pool(f.float(), target), pooled[target], generator))
                out["scr"] = _mean(pair_losses, teacher)
        out["total"] = out["scr"] + out["ifd_enc"] + out["ifd_dec"]
        return out
