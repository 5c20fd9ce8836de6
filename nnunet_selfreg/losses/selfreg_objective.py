"""SelfReg's objective: nnU-Net's segmentation loss plus the weighted SelfReg regulariser on the tapped features."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from nnunet_selfreg.epoch_stats import EpochStats
from nnunet_selfreg.losses.selfreg import SelfRegRegularizer
from nnunet_selfreg.taps import UNetFeatureTaps

#: the per-step terms :class:`RegularisedSegLoss` sums on the device (then the count of non-finite steps)
STAT_TERMS = ("scr", "ifd_enc", "ifd_dec", "reg_weighted")


class _GradientGate(torch.autograd.Function):
    """Identity forward; backward lets the gradient through only if ``flag`` (filled later) is True.

    ``flag`` is a 0-dim bool tensor that the caller sets *after* the forward of the regulariser, once
    it knows whether ``L_reg`` is finite; so a NaN/inf regulariser sends zero gradient into the
    network without any host-device synchronisation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, flag: Tensor) -> Tensor:
        ctx.flag = flag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.where(ctx.flag, grad, 0.0), None  # a scalar 0: no zero-filled buffer per map


class RegularisedSegLoss(nn.Module):
    """``L = L_seg(output, target) + Σ_term λ_term · term(taps)``, a drop-in for nnU-Net's ``self.loss``.

    ``seg_loss`` is nnU-Net's own loss (Dice+CE with deep supervision), called unchanged. ``weight``
    is one λ for the regulariser's ``total``, or a mapping ``{term: λ_term}`` over its terms (e.g.
    separate weights for SCR and IFD). The regulariser runs only when the taps hold a training-mode
    forward's features, so validation losses are the plain segmentation loss, as in the baseline; a
    training-mode forward whose taps are incomplete raises (the regulariser is never skipped
    silently). Per-term sums are accumulated on the
    device (no host sync per step) in :attr:`epoch_stats` and read once per epoch (the trainer reduces
    them over DDP ranks). A non-finite ``L_reg`` is dropped for that step (it contributes 0 and no
    gradient) and counted.
    """

    def __init__(
        self,
        seg_loss: nn.Module | Callable[[object, object], Tensor],
        taps: UNetFeatureTaps,
        regularizer: SelfRegRegularizer,
        weight: float | Mapping[str, float],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.seg_loss = seg_loss
        self.taps = taps
        self.regularizer = regularizer
        self.weight: float | dict[str, float] = (
            {k: float(v) for k, v in weight.items()} if isinstance(weight, Mapping) else float(weight)
        )
        self.generator = generator
        self.epoch_stats = EpochStats(STAT_TERMS)

    def forward(self, output, target) -> Tensor:
        seg = self.seg_loss(output, target)
        feats = self.taps.pop(require=True)
        if feats is None:
            return seg
        gate = torch.ones((), dtype=torch.bool, device=seg.device)
        enc, dec = ([_GradientGate.apply(f, gate) for f in group] for group in feats)
        terms = self.regularizer(enc, dec, generator=self.generator)
        if isinstance(self.weight, dict):
            reg = sum(w * terms[k] for k, w in self.weight.items())
        else:
            reg = self.weight * terms["total"]
        finite = torch.isfinite(reg)
        gate.copy_(finite)
        weighted = torch.where(finite, reg, torch.zeros_like(reg))
        self.epoch_stats.add(
            {"scr": terms["scr"], "ifd_enc": terms["ifd_enc"], "ifd_dec": terms["ifd_dec"], "reg_weighted": weighted},
            finite=finite,
        )
        return seg + weighted
