"""M2SNet's structure loss (boundary-weighted IoU + BCE), N-D, and its multi-class one-vs-rest form.

M2SNet (Zhao et al., 2023, arXiv:2303.10894; MSNet, MICCAI 2021) trains its binary polyp / lesion
outputs with ``L = L_structure + 0.1 · L_LossNet``; the structure loss comes from F3Net (Wei et al.,
AAAI 2020). For logits ``z``, probabilities ``p = σ(z)`` and a ground-truth map ``g`` in [0, 1], per
sample and channel, with ``box_k`` the mean over the ``k^d`` window (zero padding, divisor ``k^d``)::

    w      = 1 + 5 · |box_31(g) − g|                             (large near boundaries)
    L_IoU  = 1 − (Σ w·p·g + 1) / (Σ w·(p + g) − Σ w·p·g + 1)     (sums over voxels)
    L_BCE  = mean over all elements of BCE(z, g)
    L      = L_BCE + mean over samples and channels of L_IoU

``L_BCE`` is what the authors' code computes: its BCE call passes the legacy ``reduce='none'``, which
PyTorch reads as ``reduce=True``, i.e. a scalar mean, so the boundary weight cancels out of the BCE
term. The paper's boundary-weighted BCE, ``Σ w·BCE / Σ w`` per sample and channel, averaged, is
``weighted_bce=True``.

The box mean is computed separably (one 1-D average pool per axis), equal to the ``k^d`` average
pool of the reference (``count_include_pad``) up to rounding and cheap in 3D.

Multi-class (nnU-Net's softmax outputs): each foreground class ``c`` is a binary problem, class
``c`` against the rest, with the one-vs-rest logit ``z_c − log Σ_{j≠c} exp z_j`` (its sigmoid is
softmax probability ``c``; with two classes it is ``z_1 − z_0``); the loss above is computed over
all foreground classes at once, i.e. averaged over them. Region training (sigmoid outputs) uses
each region's logit as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StructureLoss", "box_mean", "one_vs_rest_logits", "structure_loss"]

_AVG_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def box_mean(x: Tensor, kernel_size: int) -> Tensor:
    """Mean over the ``k^d`` window of ``x`` (N, C, *spatial), zero padding ``k // 2``, divisor ``k^d``.

    Equal to ``avg_poolNd(x, k, stride=1, padding=k // 2)`` (``count_include_pad=True``), computed as
    one 1-D pool per spatial axis on zero-padded input, so any size works (also smaller than ``k``).
    """
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    dim = x.ndim - 2
    if dim not in _AVG_POOLS:
        raise ValueError(f"expected (N, C, *spatial) with 1 to 3 spatial axes, got shape {tuple(x.shape)}")
    for axis in range(dim):
        kernel = [1] * dim
        kernel[axis] = k
        pad = [0] * (2 * dim)  # F.pad lists the last axis first
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = k // 2
        # explicit zero padding: the pools refuse inputs smaller than the window (3D patches, coarse deep-supervision
        # outputs); the divisor stays k, as with count_include_pad
        x = _AVG_POOLS[dim](F.pad(x, pad), kernel, stride=1)
    return x


def structure_loss(
    logits: Tensor, target: Tensor, kernel_size: int = 31, boundary_weight: float = 5.0, weighted_bce: bool = False
) -> Tensor:
    """Binary structure loss of the module docstring for per-channel logits and targets (B, C, *spatial).

    Every channel is its own binary map; ``target`` holds values in [0, 1]. Float32, autocast off.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"structure loss needs logits and target of equal shape, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if logits.ndim not in (3, 4, 5):
        raise ValueError(f"expected (B, C, *spatial) with 1 to 3 spatial axes, got shape {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z, g = logits.float(), target.float()
        spatial = tuple(range(2, z.ndim))
        w = 1 + boundary_weight * (box_mean(g, kernel_size) - g).abs()
        bce = F.binary_cross_entropy_with_logits(z, g, reduction="none")
        if weighted_bce:
            l_bce = ((w * bce).sum(spatial) / w.sum(spatial)).mean()
        else:
            l_bce = bce.mean()
        p = torch.sigmoid(z)
        inter = (p * g * w).sum(spatial)
        union = ((p + g) * w).sum(spatial)
        l_iou = 1 - (inter + 1) / (union - inter + 1)
        return l_bce + l_iou.mean()


def one_vs_rest_logits(logits: Tensor) -> Tensor:
    """(B, K, ...) softmax logits -> (B, K-1, ...) logits of each foreground class against the rest.

    ``z_c − logsumexp_{j≠c} z_j`` for ``c = 1 … K-1``: ``σ`` of it is ``softmax(z)_c``.
    """
    k = logits.shape[1]
    if logits.ndim < 3 or k < 2:
        raise ValueError(f"expected (B, K >= 2, *spatial) logits, got shape {tuple(logits.shape)}")
    out = []
    for c in range(1, k):
        rest = torch.cat([logits[:, :c], logits[:, c + 1 :]], 1)
        out.append(logits[:, c : c + 1] - torch.logsumexp(rest, 1, keepdim=True))
    return torch.cat(out, 1)


class StructureLoss(nn.Module):
    """:func:`structure_loss` on nnU-Net's outputs: one-vs-rest per foreground class, or per region.

    ``forward(logits, target)`` for one resolution (nnU-Net's ``DeepSupervisionWrapper`` applies it to
    each): labels: ``logits`` (B, K, ...), ``target`` (B, 1, ...) label indices; regions: ``logits``
    (B, R, ...) and ``target`` (B, R, ...) region masks. nnU-Net's ignore label is not supported.
    """

    def __init__(
        self,
        has_regions: bool = False,
        kernel_size: int = 31,
        boundary_weight: float = 5.0,
        weighted_bce: bool = False,
    ) -> None:
        super().__init__()
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.has_regions = bool(has_regions)
        self.kernel_size = int(kernel_size)
        self.boundary_weight = float(boundary_weight)
        self.weighted_bce = bool(weighted_bce)

    def binary_maps(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, ground truth) of the binary problems: one channel per foreground class or region."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[2:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in batch or spatial size"
            )
        if self.has_regions:
            if target.shape[1] != logits.shape[1]:
                raise ValueError(
                    f"region target must have one channel per output, got {target.shape[1]} for {logits.shape[1]}"
                )
            return logits, target
        if target.shape[1] != 1:
            raise ValueError(f"label target must have shape (B, 1, ...), got {tuple(target.shape)}")
        labels = target.long()
        classes = torch.arange(1, logits.shape[1], device=target.device).view(1, -1, *([1] * (target.ndim - 2)))
        return one_vs_rest_logits(logits.float()), (labels == classes).float()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        z, g = self.binary_maps(logits, target)
        return structure_loss(z, g, self.kernel_size, self.boundary_weight, self.weighted_bce)
