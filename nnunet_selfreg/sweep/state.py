"""What nnU-Net's own files say about one training: finished, resumable, how far, how fast.

The files in a fold folder are the truth about a training (the manifest only records what the sweep
did): a training is finished when ``checkpoint_final.pth`` and ``validation/summary.json`` exist, and
resumable (nnU-Net's ``--c``) when any checkpoint exists. Progress and ETA come from nnU-Net's own
training logs (``Epoch k`` and ``Epoch time: t s`` lines) and ``debug.json`` (``num_epochs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import CHECKPOINTS, DEBUG_JSON, FINAL_CHECKPOINT, training_logs, validation_summary

__all__ = [
    "Progress",
    "check_budget",
    "checkpoint_to_continue",
    "fold_state",
    "is_done",
    "log_tail",
    "training_progress",
]

_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r": Epoch time: ([0-9.]+) s")


def is_done(fold_dir: Path) -> bool:
    """Trained and validated: nnU-Net's final checkpoint and its validation summary exist."""
    return (fold_dir / FINAL_CHECKPOINT).is_file() and validation_summary(fold_dir).is_file()


def checkpoint_to_continue(fold_dir: Path) -> Path | None:
    """The checkpoint ``--c`` would load (final, latest, best), None for a new training."""
    for name in CHECKPOINTS:
        if (fold_dir / name).is_file():
            return fold_dir / name
    return None


def fold_state(fold_dir: Path) -> str:
    """'done', 'partial' (continue with ``--c``) or 'new'."""
    if is_done(fold_dir):
        return "done"
    return "partial" if fold_dir.is_dir() and any(fold_dir.iterdir()) else "new"


def _debug_info(fold_dir: Path) -> dict | None:
    try:
        return read_json(fold_dir / DEBUG_JSON)
    except UserError:
        return None


def check_budget(fold_dir: Path, epochs: int, iterations: int, hint: str) -> None:
    """Refuse results trained with another budget (``debug.json``): they are never continued or overwritten."""
    info = _debug_info(fold_dir)
    if info is None:
        return
    have = (int(info.get("num_epochs", -1)), int(info.get("num_iterations_per_epoch", -1)))
    if have != (epochs, iterations):
        raise UserError(
            f"{fold_dir} holds results trained with {have[0]} epochs x {have[1]} iterations, not "
            f"{epochs} x {iterations}; they are never overwritten: {hint}"
        )


@dataclass(frozen=True)
class Progress:
    """How far a training is: the epoch it is in (0-based), of how many, and recent epoch times."""

    epoch: int
    num_epochs: int | None
    epoch_times: tuple[float, ...]

    def eta_s(self) -> float | None:
        """Seconds left for the remaining epochs (mean of the last 5 epoch times), None if unknown."""
        if self.num_epochs is None or not self.epoch_times:
            return None
        recent = self.epoch_times[-5:]
        return max(0, self.num_epochs - self.epoch) * sum(recent) / len(recent)


def training_progress(fold_dir: Path) -> Progress | None:
    """Progress from nnU-Net's training logs in ``fold_dir`` (newest last), None before the first epoch."""
    logs = training_logs(fold_dir)
    epoch, times = None, []
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if m := _EPOCH.search(line):
                epoch = int(m.group(1))
            elif m := _EPOCH_TIME.search(line):
                times.append(float(m.group(1)))
    if epoch is None:
        return None
    info = _debug_info(fold_dir) or {}
    try:
        num_epochs = int(info["num_epochs"])
    except (KeyError, ValueError):
        num_epochs = None
    return Progress(epoch, num_epochs, tuple(times))


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
