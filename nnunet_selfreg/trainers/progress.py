"""Extra per-epoch curves in nnU-Net's logger and an extra panel under ``progress.png``."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger  # noqa: E402


class ExtendedLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with extra per-epoch keys, kept through ``load_checkpoint``.

    The extra curves are drawn in a panel appended below nnU-Net's own ``progress.png`` (which is
    produced unchanged by the parent class first).
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
        super().plot_progress_png(output_folder)
        path = os.path.join(output_folder, "progress.png")
        if os.path.isfile(path):
            append_panel(path, self.my_fantastic_logging, self.extra_keys, self.title)


def install_extended_logger(logger: MetaLogger, extra_keys: dict[str, str], title: str) -> ExtendedLocalLogger:
    """Swap the MetaLogger's local logger for an :class:`ExtendedLocalLogger` (keeping its values)."""
    old = logger.local_logger
    new = ExtendedLocalLogger(extra_keys, title, verbose=getattr(old, "verbose", False))
    new.my_fantastic_logging.update(old.my_fantastic_logging)
    new._ensure_keys()
    logger.local_logger = new
    return new


def append_panel(png_path: str, values: dict[str, list], keys: dict[str, str], title: str) -> None:
    """Append a panel with the curves ``values[k]`` (log scale when positive) below ``png_path``.

    Works on 8-bit RGB images (nnU-Net's figure is 3000 x 5400 px; float arrays would cost ~1 GB).
    """
    from PIL import Image

    with Image.open(png_path) as im:
        base = im.convert("RGB")
    width_px = base.width
    dpi = 100
    fig, ax = plt.subplots(1, 1, figsize=(width_px / dpi, 18), dpi=dpi)
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
    ax.legend(loc=(0, 1.02), ncol=max(1, math.ceil(len(keys) / 2)))
    fig.tight_layout()
    fig.canvas.draw()
    panel = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    combined = Image.new("RGB", (width_px, base.height + panel.height), "white")
    combined.paste(base, (0, 0))
    del base
    combined.paste(panel.crop((0, 0, min(width_px, panel.width), panel.height)), (0, combined.height - panel.height))
    tmp = png_path + ".tmp.png"
    combined.save(tmp)
    os.replace(tmp, png_path)
