"""SS-Net's smoothness term L_lds: virtual adversarial training for segmentation (N-dimensional).

Wu et al., "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image
Segmentation", MICCAI 2022 (SS-Net), after Miyato et al., "Virtual Adversarial Training", TPAMI 2019.

With ``p = softmax(f(x))`` held fixed (gradient stopped) and a random direction ``d`` of unit L2 norm
per sample::

    g = ∇_d  D(softmax(f(x + ξ·d)), p)          (one power iteration)
    r = g / ‖g‖₂  (per sample)
    L_lds = D(softmax(f(x + ε·r)), p)

``D`` is the soft Dice distance of :func:`soft_dice_distance`. Batch-norm running statistics are
frozen during both perturbed passes (:func:`frozen_batchnorm_stats`); the network's parameters get
no gradient from the direction search (``torch.autograd.grad`` with respect to ``d`` only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["soft_dice_distance", "l2_normalize_per_sample", "frozen_batchnorm_stats", "adversarial_direction"]


def _check_probabilities(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"soft Dice distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 3:
        raise ValueError(f"expected (B, K, *spatial) probability maps, got shape {tuple(a.shape)}")


def soft_dice_distance(q: Tensor, p: Tensor, smooth: float = 1e-5) -> Tensor:
    """Multi-class soft Dice distance between two probability maps of shape ``(B, K, *spatial)``::

        D(q, p) = 1 − (1/K) Σ_k (2 Σ_i q_ik p_ik + s) / (Σ_i q_ik² + Σ_i p_ik² + s)

    ``i`` runs over the batch and every spatial position, ``k`` over all K classes (background
    included), ``s = smooth``. 0 for identical one-hot maps; computed in float32.
    """
    _check_probabilities(q, p)
    q, p = q.float(), p.float()
    dims = [0, *range(2, q.ndim)]
    intersection = (q * p).sum(dims)
    denominator = (q * q).sum(dims) + (p * p).sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def l2_normalize_per_sample(d: Tensor, eps: float = 1e-30) -> Tensor:
    """``d / max(‖d_b‖₂, eps)`` for every sample ``b`` (the norm runs over all non-batch dimensions).

    The floor only guards an all-zero sample: tiny gradients are still scaled to unit norm.
    """
    if d.ndim < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(d.shape)}")
    norm = d.float().flatten(1).norm(dim=1).clamp_min(eps).view(-1, *([1] * (d.ndim - 1)))
    return (d.float() / norm).to(d.dtype)


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms of ``module`` use batch statistics but leave running statistics untouched.

    Instance norm (nnU-Net's default) keeps no running statistics, so nothing changes for it.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def adversarial_direction(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    p: Tensor,
    xi: float,
    generator: torch.Generator | None = None,
    distance: Callable[[Tensor, Tensor], Tensor] = soft_dice_distance,
) -> Tensor:
    """Unit-norm (per sample) direction ``r`` that most increases ``D(softmax(forward(x + ξ·r)), p)``.

    One power iteration from a Gaussian random direction. ``forward`` returns the logits at the
    resolution of ``p`` (``(B, K, *spatial)``); ``p`` must carry no gradient. Only ``d`` receives a
    gradient: the parameters of the network behind ``forward`` are not touched.
    """
    if p.requires_grad:
        raise ValueError("p must be detached (the VAT target carries no gradient)")
    if x.shape[0] != p.shape[0]:
        raise ValueError(f"batch sizes differ: x {tuple(x.shape)}, p {tuple(p.shape)}")
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    d = l2_normalize_per_sample(d).to(x.dtype).requires_grad_(True)
    with torch.enable_grad():
        q = torch.softmax(forward(x + xi * d).float(), dim=1)
        if q.shape != p.shape:
            raise ValueError(f"the network output {tuple(q.shape)} does not match p {tuple(p.shape)}")
        # scaled by the elements per sample (the direction is normalised anyway): keeps the per-element
        # gradient of an average away from float16 underflow under autocast
        (grad,) = torch.autograd.grad(distance(q, p) * float(x[0].numel()), d)
    return l2_normalize_per_sample(grad.float()).to(x.dtype).detach()
