"""Ramp-up schedule of SS-Net's unsupervised weight (Laine & Aila's sigmoid ramp-up, as in SS-Net)."""

from __future__ import annotations

import math

__all__ = ["sigmoid_rampup_weight"]


def sigmoid_rampup_weight(iteration: int, scale: float, rampup_length: float, step: int = 150) -> float:
    """``w(t) = c · exp(−5 (1 − min(t, T)/T)²)`` with ``t = iteration // step``, ``c = scale``, ``T = rampup_length``.

    Wu et al., SS-Net (MICCAI 2022), reference values ``c = 0.1, T = 200`` (2D) and ``c = 1, T = 40``
    (3D), ``step = 150`` iterations. ``T = 0`` means no ramp-up (``w = c`` from the start).
    """
    if iteration < 0 or step < 1 or rampup_length < 0 or scale < 0:
        raise ValueError(
            f"need iteration >= 0, step >= 1, rampup_length >= 0, scale >= 0; got {iteration}, {step}, "
            f"{rampup_length}, {scale}"
        )
    if rampup_length == 0:
        return float(scale)
    t = min(iteration // step, rampup_length)
    phase = 1.0 - t / rampup_length
    return float(scale * math.exp(-5.0 * phase * phase))
