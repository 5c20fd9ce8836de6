"""SS-Net's class-separation term L_cs: per-pixel embeddings pulled towards a per-class memory.

Wu et al., "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image
Segmentation", MICCAI 2022 (SS-Net).

Per-pixel features ``h`` of the finest decoder stage go through a projection head ``g`` and a
prediction head ``q`` (each Linear → BatchNorm1d → ReLU → Linear). A memory holds, for every
foreground class ``c``, up to ``capacity`` projected features ``g(h)`` of labelled pixels that are
predicted correctly, ranked by the class's selector score ``s_c(g(h))``. For class ``c`` with
predicted features ``z_i = q(g(h_i))`` of the pixels assigned to ``c`` (ground truth for labelled
pixels, the argmax pseudo-label for unlabelled ones) and memory vectors ``m_j``::

    dist_ij = 1 − cos(z_i, m_j)
    a_i = σ(s_c(z_i)) · N / Σ_i σ(s_c(z_i))        (feature-side selector, rescaled to mean 1)
    b_j = σ(t_c(m̂_j)) · M / Σ_j σ(t_c(m̂_j))       (memory-side selector on m̂_j = m_j / ‖m_j‖, mean 1)
    L_c = mean_ij (a_i · b_j · dist_ij)
    L_cs = (1/K) Σ_c L_c                            (K classes, background included)

``L_c`` counts only when ``N > 1`` and ``M > 1`` (batch norm needs two vectors); background has no
memory, so its term is 0, as in the reference implementation. Memory vectors and the selector
inputs ``z_i`` are detached: the selectors learn through the weights only.

Three places where the reference code (github.com/ycwu1997/SS-Net, ``utils/feature_memory.py`` and
``utils/contrastive_losses.py``) does something else than it says; each is an option here:

* it keeps the ``capacity`` **lowest**-scored candidates (an ascending sort, under a comment that
  says highest): ``PrototypeMemory(keep="lowest")``; default ``"highest"``;
* its memory-side rescaling divides each weight by itself (a transposed shape), so every ``b_j`` is
  exactly 1 and the memory-side selector has no effect: ``memory_weights="ones"``; default
  ``"learned"`` (the mean-1 rescaling above);
* it scores candidates with the selector in training mode (batch statistics of each class's
  candidates): ``memory_candidates(scoring="batch")``; default ``"eval"`` (per-vector scores, the
  same on one GPU or many).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_selfreg.losses.vat import frozen_batchnorm_stats

__all__ = [
    "MEMORY_KEEP",
    "MEMORY_SCORING",
    "MEMORY_WEIGHTS",
    "ClassSeparationHeads",
    "PrototypeMemory",
    "class_separation_loss",
]

#: which candidates the memory keeps (``PrototypeMemory(keep=...)``, trainer ``ssnet_memory_keep``)
MEMORY_KEEP = ("highest", "lowest")
#: how candidates are scored (``memory_candidates(scoring=...)``, trainer ``ssnet_memory_scoring``)
MEMORY_SCORING = ("eval", "batch")
#: memory-side weights (``class_separation_loss(memory_weights=...)``, trainer ``ssnet_memory_weights``)
MEMORY_WEIGHTS = ("learned", "ones")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _mlp(in_dim: int, hidden: int, out_dim: int, negative_slope: float | None = None) -> nn.Sequential:
    act: nn.Module = nn.ReLU() if negative_slope is None else nn.LeakyReLU(negative_slope)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), act, nn.Linear(hidden, out_dim))


class ClassSeparationHeads(nn.Module):
    """Projection and prediction heads plus one feature-side and one memory-side selector per class.

    Training-only: lives outside nnU-Net's network (checkpoints keep it under their own key).
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 32) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or dim < 1:
            raise ValueError(
                f"need in_channels >= 1, num_classes >= 2, dim >= 1; got {in_channels}, {num_classes}, {dim}"
            )
        self.in_channels, self.num_classes, self.dim = in_channels, num_classes, dim
        self.projection = _mlp(in_channels, dim, dim)
        self.prediction = _mlp(dim, dim, dim)
        self.selectors = nn.ModuleList(_mlp(dim, dim, 1, 0.2) for _ in range(num_classes))
        self.memory_selectors = nn.ModuleList(_mlp(dim, dim, 1, 0.2) for _ in range(num_classes))

    def forward(self, h: Tensor) -> Tensor:
        """Predicted features ``q(g(h))`` of per-pixel features ``h`` of shape (N, in_channels)."""
        if h.ndim != 2 or h.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}) pixel features, got {tuple(h.shape)}")
        return self.prediction(self.projection(h))

    @torch.no_grad()
    def memory_candidates(self, h: Tensor, labels: Tensor, scoring: str = "eval") -> tuple[Tensor, Tensor]:
        """Projected features ``g(h)`` (projection head in evaluation mode) and their selector scores ``s_c(g(h))``.

        ``scoring="eval"``: the selector in evaluation mode, so each score depends on its own vector
        only (not on the batch) and the best vectors of a class are the same whether chosen on one
        GPU or over all of them. ``scoring="batch"``: the reference's way, the selector in training
        mode normalising each class's candidates by their own batch statistics (running statistics
        left untouched); a class with a single candidate gets score 0 (it is kept either way).
        """
        _check_choice(scoring, MEMORY_SCORING, "scoring")
        if h.shape[0] == 0:
            return h.new_zeros((0, self.dim), dtype=torch.float32), h.new_zeros((0,), dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            z = self.projection(h).float()
            scores = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
            for c in labels.unique().tolist():
                sel = labels == c
                selector = self.selectors[int(c)]
                if scoring == "eval":
                    scores[sel] = selector(z[sel]).float().squeeze(1)
                elif int(sel.sum()) > 1:
                    selector.train()
                    with frozen_batchnorm_stats(selector):
                        scores[sel] = selector(z[sel]).float().squeeze(1)
                    selector.eval()
        finally:
            self.train(was_training)
        return z, scores


def _rescaled_sigmoid(logits: Tensor) -> Tensor:
    w = torch.sigmoid(logits.float().reshape(-1))
    return w * (w.numel() / w.sum())


def class_separation_loss(
    z: Tensor,
    labels: Tensor,
    memory: Sequence[Tensor | None],
    selectors: Sequence[Callable[[Tensor], Tensor]],
    memory_selectors: Sequence[Callable[[Tensor], Tensor]],
    memory_weights: str = "learned",
) -> Tensor:
    """L_cs of predicted features ``z`` (N, D) with class ``labels`` (N,) against ``memory[c]`` (M_c, D).

    ``selectors[c]`` / ``memory_selectors[c]`` map (n, D) to selector logits (n, 1); the memory-side
    selector sees the L2-normalised memory vectors, as in the reference. ``memory_weights="ones"``
    sets every ``b_j = 1`` (what the reference's rescaling computes; the memory-side selectors are
    then not called). Labels outside ``0 … K−1`` (e.g. nnU-Net's ignore label) belong to no class.
    See the module docstring.
    """
    _check_choice(memory_weights, MEMORY_WEIGHTS, "memory_weights")
    num_classes = len(memory)
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"expected z (N, D) and labels (N,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    if len(selectors) != num_classes or len(memory_selectors) != num_classes:
        raise ValueError(f"need one selector per class: {num_classes} memory slots, {len(selectors)} selectors")
    total = z.new_zeros((), dtype=torch.float32)
    for c in range(num_classes):
        bank = memory[c]
        if bank is None or bank.shape[0] < 2:
            continue
        if bank.shape[1] != z.shape[1]:
            raise ValueError(f"memory of class {c} has dimension {bank.shape[1]}, features have {z.shape[1]}")
        zc = z[labels == c]
        if zc.shape[0] < 2:
            continue
        unit_bank = F.normalize(bank.detach().float(), dim=1)
        distance = 1.0 - F.normalize(zc.float(), dim=1) @ unit_bank.T
        a = _rescaled_sigmoid(selectors[c](zc.detach()))
        weighted = distance * a[:, None]
        if memory_weights == "learned":
            weighted = weighted * _rescaled_sigmoid(memory_selectors[c](unit_bank.to(zc.dtype)))[None, :]
        total = total + weighted.mean()
    return total / num_classes


class PrototypeMemory:
    """Per-class memory of at most ``capacity`` projected features, refilled at every update.

    ``keep="highest"`` keeps the ``capacity`` highest-scored candidates of each class (what the
    reference's own comment says, and the paper's "high-quality prototypes"); ``keep="lowest"`` the
    lowest-scored ones (what the reference code does). A class whose update brings no candidate
    keeps its previous vectors. With torch.distributed initialised, every rank offers its
    ``capacity`` best candidates per class and all ranks keep the same global best (an all-gather),
    so every rank sees the same prototypes.
    """

    def __init__(self, num_classes: int, capacity: int = 32, keep: str = "highest") -> None:
        if num_classes < 2 or capacity < 2:
            raise ValueError(f"need num_classes >= 2 and capacity >= 2, got {num_classes}, {capacity}")
        self.keep = _check_choice(keep, MEMORY_KEEP, "keep")
        self.num_classes, self.capacity = num_classes, capacity
        self.bank: list[Tensor | None] = [None] * num_classes

    def _local_best(self, z: Tensor, labels: Tensor, scores: Tensor) -> Tensor:
        """(K, capacity, D + 1): the best candidates per class, rank key in the last column (−inf: empty)."""
        packed = torch.full((self.num_classes, self.capacity, z.shape[1] + 1), float("-inf"), device=z.device)
        for c in range(1, self.num_classes):
            sel = labels == c
            if not bool(sel.any()):
                continue
            zc, sc = z[sel], scores[sel]
            k = min(self.capacity, zc.shape[0])
            top = torch.topk(sc, k).indices
            packed[c, :k, :-1] = zc[top]
            packed[c, :k, -1] = sc[top]
        return packed

    @torch.no_grad()
    def update(self, z: Tensor, labels: Tensor, scores: Tensor, distributed: bool | None = None) -> None:
        """Refill from candidates ``z`` (N, D) of classes ``labels`` (N,) ranked by ``scores`` (N,)."""
        if z.ndim != 2 or labels.shape != z.shape[:1] or scores.shape != z.shape[:1]:
            raise ValueError(
                f"expected z (N, D), labels (N,), scores (N,); got {tuple(z.shape)}, {tuple(labels.shape)}, "
                f"{tuple(scores.shape)}"
            )
        key = scores.float() if self.keep == "highest" else -scores.float()
        packed = self._local_best(z.float(), labels, key)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, packed)
            packed = torch.cat(gathered, dim=1)  # (K, world * capacity, D + 1)
        for c in range(1, self.num_classes):
            valid = torch.isfinite(packed[c, :, -1])
            n = int(valid.sum())
            if n == 0:
                continue
            rows = packed[c][valid]
            top = torch.topk(rows[:, -1], min(self.capacity, n)).indices
            self.bank[c] = rows[top, :-1].clone()

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "bank": [None if b is None else b.cpu() for b in self.bank]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        bank = state["bank"]
        if len(bank) != self.num_classes or int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"memory state for {len(bank)} classes / capacity {state['capacity']} does not fit "
                f"{self.num_classes} classes / capacity {self.capacity}"
            )
        self.bank = [None if b is None else b.to(device) for b in bank]
