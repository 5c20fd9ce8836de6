"""Extra per-epoch curves in nnU-Net's logger and a fourth panel in its ``progress.png``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger  # noqa: E402

#: curves with at most this many epochs get a marker at each epoch (one epoch alone is otherwise invisible)
MARKERS_UP_TO_EPOCHS = 50
#: the note beside nnU-Net's loss curves: its ``loss_tr`` is the training objective, regularisers included
TRAIN_LOSS_NOTE = "loss_tr includes the weighted terms of the bottom panel; loss_val does not"


class ExtendedLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with extra per-epoch keys, kept through ``load_checkpoint``.

    ``progress.png`` gets a fourth panel with the extra curves, in the same figure as nnU-Net's three
    (so it has their width and x positions), a note that nnU-Net's ``loss_tr`` includes the weighted
    extra terms, and markers on short curves.
    """

    def __init__(self, extra_keys: dict[str, str], title: str, verbose: bool = False) -> None:
        super().__init__(verbose)
        self.extra_keys = dict(extra_keys)  # key -> legend label
        self.title = title
        self._ensure_keys()

    def _ensure_keys(self) -> None:
        """Register missing extra keys, padded with NaN to the epochs already logged."""
        n = len(self.my_fantastic_logging.get("train_losses", []))
        for k in self.extra_keys:
            if k not in self.my_fantastic_logging:
                self.my_fantastic_logging[k] = [float("nan")] * n

    def load_checkpoint(self, checkpoint: dict) -> None:
        super().load_checkpoint(checkpoint)
        self._ensure_keys()

    def plot_progress_png(self, output_folder: str) -> None:
        # nnU-Net's own method draws its panels; it is called unchanged, with one more row in its figure
        with one_more_panel(self._draw_panel):
            super().plot_progress_png(output_folder)

    def _draw_panel(self, ax) -> None:
        draw_panel(ax, self.my_fantastic_logging, self.extra_keys, self.title)


def install_extended_logger(logger: MetaLogger, extra_keys: dict[str, str], title: str) -> ExtendedLocalLogger:
    """Swap the MetaLogger's local logger for an :class:`ExtendedLocalLogger` (keeping its values)."""
    old = logger.local_logger
    new = ExtendedLocalLogger(extra_keys, title, verbose=getattr(old, "verbose", False))
    new.my_fantastic_logging.update(old.my_fantastic_logging)
    new._ensure_keys()
    logger.local_logger = new
    return new


def draw_panel(ax, values: dict[str, list], keys: dict[str, str], title: str) -> None:
    """The curves ``values[k]`` over the epochs (log scale when all positive), cut to the shortest list."""
    n = min(len(v) for v in values.values()) if values else 0
    x = list(range(n))
    positive, has_data = True, False
    for key, label in keys.items():
        y = np.asarray(values.get(key, [])[:n], dtype=float)
        ax.plot(x, y, ls="-", label=label, linewidth=4)
        finite = y[np.isfinite(y)]
        has_data |= finite.size > 0
        positive &= bool((finite > 0).all())
    if positive and has_data:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{title}\n(epoch mean)")
    ax.legend(loc=(0, 1), ncol=max(1, math.ceil(len(keys) / 2)))


@contextlib.contextmanager
def one_more_panel(draw: Callable[[Any], None]) -> Iterator[None]:
    """While active, the first ``plt.subplots(n, 1, figsize=(w, h))`` gets an extra row drawn by ``draw``.

    nnU-Net's ``LocalLogger.plot_progress_png`` (called unchanged) makes its figure with
    ``plt.subplots(3, 1, ...)``, lays it out with ``plt.tight_layout()`` and saves it with
    ``fig.savefig``. Here that figure gets a fourth row of the same height, drawn by ``draw`` before
    nnU-Net's layout runs, so all panels share one layout; before saving, short curves in every panel
    get markers and nnU-Net's loss panel gets :data:`TRAIN_LOSS_NOTE`. A figure of another shape is
    left alone (no extra panel). Training runs in one thread, so replacing ``pyplot.subplots`` for the
    duration of the call is safe.
    """
    original = plt.subplots
    used = False

    def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
        nonlocal used
        if used or ncols != 1 or not isinstance(nrows, int) or nrows < 1:
            return original(nrows, ncols, **kwargs)
        used = True
        width, height = kwargs.pop("figsize", None) or plt.rcParams["figure.figsize"]
        fig, axes = original(nrows + 1, 1, figsize=(width, height * (nrows + 1) / nrows), **kwargs)
        draw(axes[-1])
        save = fig.savefig

        def finish_and_save(*args, **kw):
            _finish(fig, axes[0])
            return save(*args, **kw)

        fig.savefig = finish_and_save
        return fig, (axes[:-1] if nrows > 1 else axes[0])

    plt.subplots = subplots
    try:
        yield
    finally:
        plt.subplots = original


def _finish(fig, loss_ax) -> None:
    """Markers on curves of up to :data:`MARKERS_UP_TO_EPOCHS` points, whole epochs on the x axes, the loss note."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
        for line in ax.get_lines():
            if len(line.get_xdata()) <= MARKERS_UP_TO_EPOCHS and line.get_marker() in (None, "None", "", " "):
                line.set_marker("o")
                line.set_markersize(max(8.0, 4 * line.get_linewidth()))
    if any(line.get_label() == "loss_tr" for line in loss_ax.get_lines()):
        loss_ax.text(1, 1.01, TRAIN_LOSS_NOTE, transform=loss_ax.transAxes, ha="right", va="bottom", fontsize="small")
