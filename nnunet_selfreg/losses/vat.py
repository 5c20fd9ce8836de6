"""SS-Net's smoothness term L_lds: virtual adversarial training for segmentation (N-dimensional).

Wu et al., "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image
Segmentation", MICCAI 2022 (SS-Net), after Miyato et al., "Virtual Adversarial Training", TPAMI 2019.

With ``p = softmax(f(x))`` held fixed (gradient stopped) and a random direction ``d`` of unit L2 norm
per sample::

    g = ∇_d  D(softmax(f(x + ξ·d)), p)          (one power iteration)
    r = g / (‖g‖₂ + 1e-8)  (per sample)
    L_lds = D(softmax(f(x + ε·r)), p)

``D`` is one of :data:`VAT_DISTANCES`: the multi-class soft Dice distance of the reference's 2D code
or the whole-tensor binary Dice of its 3D code. ``‖·‖₂`` runs over every channel and voxel of a
sample, so ``ξ`` and ``ε`` are sizes of the whole perturbation, not per voxel: the per-voxel RMS is
``ε / sqrt(C · voxels)`` and shrinks as the patch grows (see docs/ssnet.md).

Batch-norm running statistics are frozen during both perturbed passes (:func:`frozen_batchnorm_stats`);
the network's parameters get no gradient from the direction search (``torch.autograd.grad`` with
respect to ``d`` only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "VAT_DISTANCES",
    "VAT_INITS",
    "adversarial_direction",
    "binary_dice_distance",
    "frozen_batchnorm_stats",
    "l2_normalize_per_sample",
    "random_unit_direction",
    "soft_dice_distance",
    "virtual_adversarial_loss",
]


def _check_probabilities(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"Dice distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 3:
        raise ValueError(f"expected (B, K, *spatial) probability maps, got shape {tuple(a.shape)}")


def soft_dice_distance(q: Tensor, p: Tensor, smooth: float = 1e-10) -> Tensor:
    """Multi-class soft Dice distance between two probability maps of shape ``(B, K, *spatial)``::

        D(q, p) = 1 − (1/K) Σ_k (2 Σ_i q_ik p_ik + s) / (Σ_i q_ik² + Σ_i p_ik² + s)

    ``i`` runs over the batch and every spatial position, ``k`` over all K classes (background
    included), ``s = smooth`` (the reference's 1e-10). The distance of SS-Net's 2D reference code
    (which hard-codes K = 4). 0 for identical one-hot maps; computed in float32.
    """
    _check_probabilities(q, p)
    q, p = q.float(), p.float()
    dims = [0, *range(2, q.ndim)]
    intersection = (q * p).sum(dims)
    denominator = (q * q).sum(dims) + (p * p).sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def binary_dice_distance(q: Tensor, p: Tensor, smooth: float = 1e-8) -> Tensor:
    """Dice distance over the whole tensor, as SS-Net's 3D reference code uses for L_lds::

        D(q, p) = 1 − (2 Σ q p + s) / (Σ q + Σ p + s)

    The sums run over batch, classes (background included) and voxels at once, with plain (not
    squared) denominators. For softmax maps ``Σ q = Σ p = `` number of voxels, so ``D`` is
    ``1 −`` the mean over voxels of ``<q_i, p_i>``: every voxel counts alike, and small foreground
    structures weigh little (unlike :func:`soft_dice_distance`, which averages over classes).
    """
    _check_probabilities(q, p)
    q, p = q.float(), p.float()
    return 1.0 - (2.0 * (q * p).sum() + smooth) / (q.sum() + p.sum() + smooth)


#: distances for ``D`` by name (trainer attribute ``ssnet_vat_distance``)
VAT_DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "soft_dice": soft_dice_distance,
    "binary_dice": binary_dice_distance,
}
#: distributions of the random start direction (trainer attribute ``ssnet_vat_init``)
VAT_INITS = ("uniform", "gaussian")


def l2_normalize_per_sample(d: Tensor, eps: float = 1e-8) -> Tensor:
    """``d / (‖d_b‖₂ + eps)`` for every sample ``b`` (the norm runs over all non-batch dimensions).

    The additive ``eps`` is the reference's: an all-zero sample stays zero, and a sample whose norm
    is not much larger than ``eps`` comes out shorter than 1.
    """
    if d.ndim < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(d.shape)}")
    norm = d.float().flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))
    return (d.float() / (norm + eps)).to(d.dtype)


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


def random_unit_direction(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    init: str = "uniform",
) -> Tensor:
    """A random float32 direction of unit L2 norm per sample.

    ``init="uniform"``: uniform in [−0.5, 0.5) per element, as the reference (``torch.rand − 0.5``);
    with a CPU generator seeded like the reference's global seed it is the reference's ``d``.
    ``init="gaussian"``: standard normal per element (isotropic, as in Miyato et al.).
    """
    if init == "uniform":
        d = torch.rand(shape, generator=generator, device=device, dtype=torch.float32).sub_(0.5)
    elif init == "gaussian":
        d = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"unknown VAT start direction {init!r}: use one of {VAT_INITS}")
    return l2_normalize_per_sample(d)


def adversarial_direction(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    p: Tensor,
    xi: float,
    generator: torch.Generator | None = None,
    distance: Callable[[Tensor, Tensor], Tensor] = soft_dice_distance,
    init: str = "uniform",
) -> Tensor:
    """Direction ``r`` (unit norm per sample) that most increases ``D(softmax(forward(x + ξ·r)), p)``.

    One power iteration from a random direction (:func:`random_unit_direction` with ``init``, drawn
    with ``generator`` on ``x``'s device). ``forward`` returns the logits at the resolution of ``p``
    (``(B, K, *spatial)``); ``p`` must carry no gradient. Only ``d`` receives a gradient: the
    parameters of the network behind ``forward`` are not touched.
    """
    if p.requires_grad:
        raise ValueError("p must be detached (the VAT target carries no gradient)")
    if x.shape[0] != p.shape[0]:
        raise ValueError(f"batch sizes differ: x {tuple(x.shape)}, p {tuple(p.shape)}")
    d = random_unit_direction(x.shape, generator, x.device, init).to(x.dtype).requires_grad_(True)
    with torch.enable_grad():
        q = torch.softmax(forward(x + xi * d).float(), dim=1)
        if q.shape != p.shape:
            raise ValueError(f"the network output {tuple(q.shape)} does not match p {tuple(p.shape)}")
        # scaled by the elements per sample (the direction is normalised anyway): keeps the per-element
        # gradient of an average away from float16 underflow under autocast; the reference's 1e-8 in
        # the normalisation is scaled alike, so r is the reference's g / (‖g‖ + 1e-8)
        scale = float(x[0].numel())
        (grad,) = torch.autograd.grad(distance(q, p) * scale, d)
    return l2_normalize_per_sample(grad.float(), eps=1e-8 * scale).to(x.dtype).detach()


def virtual_adversarial_loss(
    probe_forward: Callable[[Tensor], Tensor],
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    p: Tensor,
    xi: float,
    eps: float,
    generator: torch.Generator | None = None,
    distance: Callable[[Tensor, Tensor], Tensor] = soft_dice_distance,
    init: str = "uniform",
) -> tuple[Tensor, Tensor]:
    """``(L_lds, r)``: the direction search with ``probe_forward``, then ``D(softmax(forward(x + ε·r)), p)``.

    Both callables return logits of shape ``p.shape``; the second one carries the gradient to the
    parameters (the trainer passes its DDP-wrapped network there and the plain one for the probe).
    Wrap the call in :func:`frozen_batchnorm_stats` to keep batch-norm running statistics.
    """
    r = adversarial_direction(probe_forward, x, p, xi, generator, distance, init)
    q = torch.softmax(forward(x + eps * r).float(), dim=1)
    return distance(q, p), r
