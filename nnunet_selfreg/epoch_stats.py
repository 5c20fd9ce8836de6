"""Per-epoch means of a method's loss terms, summed on the device and reduced over DDP ranks once.

Every method logs the epoch mean of each of its terms (nnU-Net's logger, ``progress.png``, the
training log). Reading a term on the host at every step would synchronise the device at every step,
and on several GPUs each rank only sees its own steps; so the sums stay on the device, and at the end
of the epoch one ``all_reduce`` adds the sums and step counts of every rank before the division. This
module lives below ``losses`` and ``trainers`` so that both a loss module and a trainer can hold the
accumulator.

A step may be flagged non-finite (``finite=False``): it then contributes 0 to every sum, is counted,
and the means are over the finite steps only. A method that does not flag steps gets plain means over
all steps (a NaN term then shows as a NaN mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class EpochMeans:
    """The epoch means of each term (over finite steps), the step count and the non-finite step count."""

    means: dict[str, float]
    steps: int
    nonfinite_steps: int


class EpochStats:
    """Sums of named per-step scalar terms over one epoch, kept on the device (no host sync per step).

    ``add`` stacks one step's terms (in ``terms`` order) into a device tensor; ``pop_means`` reads the
    sums once, after an optional all-reduce over DDP ranks (sums, non-finite count and step count in one
    tensor, one ``all_reduce``), and starts the next epoch from zero.
    """

    def __init__(self, terms: Sequence[str]) -> None:
        if not terms or len(set(terms)) != len(terms):
            raise ValueError(f"EpochStats needs distinct term names, got {list(terms)!r}")
        self.terms = tuple(terms)
        self._sums: Tensor | None = None  # len(terms) sums, then the non-finite step count
        self._steps = 0

    @property
    def steps(self) -> int:
        return self._steps

    def add(self, values: Mapping[str, Tensor | float], finite: Tensor | None = None) -> None:
        """Add one step's terms; ``finite`` (0-dim bool tensor): False drops this step's values and counts it."""
        row = self._row(values)
        if finite is None:
            nonfinite = torch.zeros(1, device=row.device)
        else:
            row = torch.where(finite, row, torch.zeros_like(row))
            nonfinite = (~finite).float().reshape(1)
        row = torch.cat([row, nonfinite])
        self._sums = row if self._sums is None else self._sums + row.to(self._sums.device)
        self._steps += 1

    def _row(self, values: Mapping[str, Tensor | float]) -> Tensor:
        missing = set(self.terms) - set(values)
        if missing:
            raise KeyError(f"terms {sorted(missing)} missing (expected {list(self.terms)})")
        ref = next((v for v in values.values() if isinstance(v, Tensor)), None)
        device = ref.device if ref is not None else torch.device("cpu")
        return torch.stack([torch.as_tensor(values[k], device=device).detach().float().reshape(()) for k in self.terms])

    def state(self) -> tuple[Tensor | None, int]:
        """The raw device-side sums (terms, then the non-finite count) and the step count."""
        return self._sums, self._steps

    def set_state(self, sums: Tensor | None, steps: int) -> None:
        self._sums, self._steps = sums, int(steps)

    def all_reduce(self, device: torch.device | str) -> None:
        """Sum the sums, non-finite counts and step counts of every DDP rank (one ``all_reduce``).

        Every rank must call it, including one that had no step this epoch.
        """
        packed = torch.zeros(len(self.terms) + 2, device=device)
        if self._sums is not None:
            packed[:-1] = self._sums
        packed[-1] = self._steps
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        self._sums, self._steps = packed[:-1], int(packed[-1].item())

    def pop_means(self, ddp: bool = False, device: torch.device | str = "cpu") -> EpochMeans:
        """The epoch means (all ranks' steps when ``ddp``; NaN for an epoch without steps); resets the sums."""
        if ddp:
            self.all_reduce(device)
        sums, steps = self._sums, self._steps
        self._sums, self._steps = None, 0
        if sums is None or steps == 0:
            return EpochMeans({k: float("nan") for k in self.terms}, 0, 0)
        values = sums.detach().cpu().tolist()
        nonfinite = int(round(values[-1]))
        finite_steps = max(steps - nonfinite, 1)
        means = {k: v / finite_steps for k, v in zip(self.terms, values[:-1], strict=True)}
        return EpochMeans(means, steps, nonfinite)


def format_means(means: Mapping[str, float], strip_prefix: str = "") -> str:
    """``"name value, …"`` with values rounded to 6 decimals (the style of every method's log line)."""
    return ", ".join(f"{k.removeprefix(strip_prefix)} {np.round(v, 6)}" for k, v in means.items())


def log_epoch_means(trainer, means: Mapping[str, float], line: str) -> None:
    """Write each mean to nnU-Net's logger under its key (this epoch) and ``line`` to the training log."""
    for key, value in means.items():
        trainer.logger.log(key, float(value), trainer.current_epoch)
    trainer.print_to_log_file(line)
