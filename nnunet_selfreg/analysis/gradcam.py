"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017) for the stages of a segmentation network, N-dimensional.

For a scalar class score ``y`` and a stage's feature map ``A`` (``C`` channels over the positions
``Ω``)::

    α_k = 1/|Ω| · Σ_x ∂y/∂A_k(x)                 (channel weight: pooled gradient)
    CAM(x) = ReLU( Σ_k α_k A_k(x) )

upsampled (bilinear / trilinear) to the input size. For segmentation the score is the mean of the
class logit over the class's predicted region (over the whole image when the class is not
predicted), as in Vinogradova et al., "Towards Interpretable Semantic Segmentation via Gradient-
Weighted Class Activation Mapping", AAAI 2020 student abstract.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_score", "grad_cam", "normalise_map"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def class_score(logits: Tensor, channel: int, regions: bool = False) -> tuple[Tensor, Tensor, bool]:
    """Score for Grad-CAM: mean of ``logits[:, channel]`` over the class's predicted region.

    ``logits`` is ``(B, K, *spatial)``. The region is where the argmax over channels is ``channel``
    (label-based models) or where ``sigmoid(logit) > 0.5`` (region-based models). Returns the scalar
    score, the boolean region ``(B, *spatial)`` and whether the region was non-empty (if it is empty
    the score is the mean over the whole image).
    """
    if not 0 <= channel < logits.shape[1]:
        raise ValueError(f"channel {channel} is not an output channel of logits {tuple(logits.shape)}")
    with torch.no_grad():
        region = logits[:, channel] > 0 if regions else logits.argmax(1) == channel
    found = bool(region.any())
    target = logits[:, channel]
    score = target[region].mean() if found else target.mean()
    return score, region, found


def grad_cam(features: Sequence[Tensor], score: Tensor, size: Sequence[int] | None = None) -> list[Tensor]:
    """Grad-CAM map of every feature map in ``features`` for the scalar ``score`` (one backward pass).

    Each map is ``(B, C, *spatial)`` and part of the graph of ``score``. Returns ``(B, *size)``
    non-negative float32 maps (``size`` defaults to each map's own spatial size); a map that does not
    influence the score gets zeros.
    """
    if score.numel() != 1:
        raise ValueError(f"the score must be a scalar, got shape {tuple(score.shape)}")
    grads = torch.autograd.grad(score, list(features), allow_unused=True, retain_graph=False)
    cams = []
    for f, g in zip(features, grads, strict=True):
        f = f.detach().float()
        spatial = tuple(range(2, f.ndim))
        if g is None:
            cam = torch.zeros(f.shape[0], *f.shape[2:], dtype=torch.float32, device=f.device)
        else:
            weights = g.float().mean(dim=spatial, keepdim=True)
            cam = torch.relu((weights * f).sum(1))
        if size is not None and tuple(cam.shape[1:]) != tuple(size):
            mode = _MODES[cam.ndim - 1]
            cam = F.interpolate(cam[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]
            cam = cam.clamp_min(0)  # interpolation of non-negative values stays >= 0; guard rounding
        cams.append(cam)
    return cams


def normalise_map(cam: Tensor) -> Tensor:
    """``cam / max(cam)`` (zeros stay zeros), for display on a common [0, 1] colour scale."""
    peak = cam.max()
    return cam / peak if float(peak) > 0 else torch.zeros_like(cam)
