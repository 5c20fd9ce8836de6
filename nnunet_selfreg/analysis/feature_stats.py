"""Feature-map statistics of ``nnunet-selfreg analyze``, pure torch, N-dimensional.

Feature maps are ``(B, C, *spatial)`` with any number of spatial axes (a ``(n, C)`` matrix is the
case of none). Every statistic treats each position of each map in the batch as one **sample** and
the ``C`` channels as its **features**: ``X`` is the ``(n, C)`` matrix with ``n = B · |Ω|`` rows.

The statistics only need the first and second moments of ``X`` (and of a second map ``Y`` for CKA),
so they are computed from running sums (:class:`ChannelMoments`, :class:`CrossMoments`) in float64:
many cases can be streamed through a network without keeping their feature maps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ChannelMoments",
    "CrossMoments",
    "as_samples",
    "channel_correlation",
    "effective_rank",
    "effective_rank_of_covariance",
    "linear_cka",
    "mean_abs_channel_correlation",
    "mean_abs_correlation_of_covariance",
]

_CHUNK = 1 << 16  # rows per float64 matrix product: bounds the temporary float64 copy


def as_samples(x: Tensor) -> Tensor:
    """``(B, C, *spatial)`` -> ``(B · |Ω|, C)``: one row per position, one column per channel."""
    if x.ndim < 2:
        raise ValueError(f"features must have shape (B, C, *spatial) or (n, C), got shape {tuple(x.shape)}")
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class ChannelMoments:
    """Running ``n``, ``Σ x`` and ``Σ x xᵀ`` of the channel vectors of feature maps (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.gram: Tensor | None = None

    def update(self, x: Tensor) -> ChannelMoments:
        rows = as_samples(x.detach())
        if self.sum is None:
            c = rows.shape[1]
            self.sum = torch.zeros(c, dtype=torch.float64, device=rows.device)
            self.gram = torch.zeros(c, c, dtype=torch.float64, device=rows.device)
        elif rows.shape[1] != self.sum.numel():
            raise ValueError(f"got {rows.shape[1]} channels after {self.sum.numel()}")
        for start in range(0, rows.shape[0], _CHUNK):
            r = rows[start : start + _CHUNK].double()
            self.sum += r.sum(0)
            self.gram += r.T @ r
        self.n += rows.shape[0]
        return self

    def mean(self) -> Tensor:
        return self._require().sum / self.n

    def scatter(self) -> Tensor:
        """Centred scatter matrix ``Σ (x − x̄)(x − x̄)ᵀ = Σ x xᵀ − n x̄ x̄ᵀ``."""
        self._require()
        mean = self.mean()
        s = self.gram - self.n * torch.outer(mean, mean)
        return (s + s.T) / 2

    def covariance(self) -> Tensor:
        """Sample covariance ``scatter / (n − 1)`` of the channels."""
        if self._require().n < 2:
            raise ValueError("the covariance needs at least 2 samples")
        return self.scatter() / (self.n - 1)

    def _require(self) -> ChannelMoments:
        if self.n == 0:
            raise ValueError("no samples accumulated")
        return self


class CrossMoments:
    """Running moments of paired feature maps ``X`` (``C_x`` channels) and ``Y`` (``C_y``) for linear CKA.

    Both maps of a pair must have the same batch size and spatial size (pool them first), so that row
    ``i`` of ``X`` and of ``Y`` is the same position.
    """

    def __init__(self) -> None:
        self.x = ChannelMoments()
        self.y = ChannelMoments()
        self.cross: Tensor | None = None
        self.cross_shuffled: Tensor | None = None

    def update(self, x: Tensor, y: Tensor, y_shuffled: Tensor | None = None) -> CrossMoments:
        """Add paired maps; ``y_shuffled`` (optional): ``y`` with its positions permuted within the batch,
        for a chance-level CKA from the same moments (:meth:`cka` with ``shuffled=True``)."""
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(
                f"paired maps must share batch and spatial size, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if y_shuffled is not None and y_shuffled.shape != y.shape:
            raise ValueError(f"y_shuffled {tuple(y_shuffled.shape)} must have the shape of y {tuple(y.shape)}")
        if (y_shuffled is None) != (self.cross_shuffled is None) and self.cross is not None:
            raise ValueError("give y_shuffled with every update or with none")
        rx, ry = as_samples(x.detach()), as_samples(y.detach())
        rs = as_samples(y_shuffled.detach()) if y_shuffled is not None else None
        if self.cross is None:
            self.cross = torch.zeros(rx.shape[1], ry.shape[1], dtype=torch.float64, device=rx.device)
            if rs is not None:
                self.cross_shuffled = torch.zeros_like(self.cross)
        for start in range(0, rx.shape[0], _CHUNK):
            cx = rx[start : start + _CHUNK].double().T
            self.cross += cx @ ry[start : start + _CHUNK].double()
            if rs is not None:
                self.cross_shuffled += cx @ rs[start : start + _CHUNK].double()
        self.x.update(x)
        self.y.update(y)  # a permutation of positions leaves y's own moments unchanged
        return self

    def cka(self, shuffled: bool = False) -> float:
        """Linear CKA of the accumulated pairs (see :func:`linear_cka`); ``shuffled``: with ``y_shuffled``."""
        n = self.x._require().n
        cross = self.cross_shuffled if shuffled else self.cross
        if cross is None:
            raise ValueError("no shuffled pairs were accumulated")
        sxy = cross - n * torch.outer(self.x.mean(), self.y.mean())
        hsic_xy = float(torch.linalg.matrix_norm(sxy) ** 2)
        norm_x = float(torch.linalg.matrix_norm(self.x.scatter()))
        norm_y = float(torch.linalg.matrix_norm(self.y.scatter()))
        if norm_x == 0.0 or norm_y == 0.0:
            return math.nan
        return hsic_xy / (norm_x * norm_y)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., "Similarity of Neural Network Representations
    Revisited", ICML 2019, eq. 5) between two feature maps of the same batch and spatial size.

    With ``X`` (``n × C_x``) and ``Y`` (``n × C_y``) the column-centred sample matrices::

        CKA(X, Y) = ‖Yᵀ X‖²_F / ( ‖Xᵀ X‖_F · ‖Yᵀ Y‖_F )

    In [0, 1]; 1 iff ``Y`` is ``X`` up to an orthogonal transform and an isotropic scaling (the
    channel counts may differ). NaN if either map is constant.
    """
    return CrossMoments().update(x, y).cka()


def channel_correlation(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson correlation matrix of the non-constant channels, and the mask of non-constant channels.

    A channel is constant when its variance is 0 or below ``1e-12`` times the largest variance.
    """
    var = torch.diagonal(covariance).clamp_min(0)
    live = var > max(float(var.max()) * 1e-12, 0.0) if var.numel() else var.bool()
    cov = covariance[live][:, live]
    std = torch.sqrt(torch.diagonal(cov))
    corr = (cov / torch.outer(std, std)).clamp(-1.0, 1.0)
    return corr, live


def mean_abs_correlation_of_covariance(covariance: Tensor) -> float:
    """Mean ``|ρ_ij|`` over the off-diagonal pairs ``i ≠ j`` of non-constant channels (NaN if fewer than 2)."""
    corr, live = channel_correlation(covariance)
    c = int(live.sum())
    if c < 2:
        return math.nan
    off = ~torch.eye(c, dtype=torch.bool, device=corr.device)
    return float(corr.abs()[off].mean())


def mean_abs_channel_correlation(x: Tensor) -> float:
    """Channel redundancy: mean absolute Pearson correlation between distinct channels.

    With ``ρ_ij`` the correlation of channels ``i`` and ``j`` over the samples (positions of the
    batch) and ``C'`` the non-constant channels::

        r̄ = 1 / (C' (C' − 1)) · Σ_{i ≠ j} |ρ_ij|

    1 when every channel is an affine copy of one channel, about 0 for independent channels.
    """
    return mean_abs_correlation_of_covariance(ChannelMoments().update(x).covariance())


def effective_rank_of_covariance(covariance: Tensor) -> float:
    """Effective rank of a covariance matrix (see :func:`effective_rank`); NaN if it is zero."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a threaded eigensolver of a small matrix can be 100x slower on a busy CPU
    try:
        eig = torch.linalg.eigvalsh(covariance.detach().double().cpu()).clamp_min(0)
    finally:
        torch.set_num_threads(threads)
    total = float(eig.sum())
    if total <= 0.0:
        return math.nan
    p = eig[eig > 0] / total
    return math.exp(float(-(p * torch.log(p)).sum()))


def effective_rank(x: Tensor) -> float:
    """Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
    EUSIPCO 2007) of the channel covariance ``Σ`` of a feature map.

    With ``λ_1 … λ_C`` the eigenvalues of ``Σ`` (its singular values, ``Σ`` being symmetric positive
    semi-definite) and ``p_k = λ_k / Σ_j λ_j``::

        erank(Σ) = exp( −Σ_k p_k log p_k )        (0 log 0 = 0)

    In [1, C]: 1 when all channels are multiples of one direction, ``C`` when the covariance is
    isotropic (independent channels of equal variance).
    """
    return effective_rank_of_covariance(ChannelMoments().update(x).covariance())
