"""``progress.png``: nnU-Net's own plotting code with our fourth panel in the same figure.

nnU-Net's ``LocalLogger.plot_progress_png`` runs unchanged on logged values; the saved figure is
inspected twice: its axes (recorded when nnU-Net saves it) and the PNG's pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from nnunet_selfreg.trainers.progress import TRAIN_LOSS_NOTE, ExtendedLocalLogger

KEYS = {"selfreg_scr": "SCR", "selfreg_ifd_enc": "IFD encoder", "selfreg_weighted": "λ · L_reg"}


def _logger(epochs: int) -> ExtendedLocalLogger:
    logger = ExtendedLocalLogger(KEYS, "nnUNetTrainerSelfReg regularisers")
    for e in range(epochs):
        logger.log("epoch_start_timestamps", 100.0 * e, e)
        logger.log("train_losses", -0.2 - 0.01 * e, e)
        logger.log("val_losses", -0.4 - 0.01 * e, e)
        logger.log("mean_fg_dice", 0.6 + 0.01 * e, e)
        logger.log("ema_fg_dice", 0.5 + 0.01 * e, e)
        logger.log("dice_per_class_or_region", [0.6], e)
        logger.log("lrs", 0.01 * (1 - e / 10), e)
        logger.log("epoch_end_timestamps", 100.0 * e + 50.0, e)
        for i, key in enumerate(KEYS):
            logger.log(key, 0.1 * (i + 1) * math.exp(-e / 5), e)
    return logger


@pytest.fixture
def saved_figures(monkeypatch) -> list[dict]:
    """What each figure looked like when it was saved: panel boxes, line markers, texts."""
    seen: list[dict] = []
    original = Figure.savefig

    def record(fig, *args, **kwargs):
        fig.canvas.draw()
        seen.append(
            {
                "boxes": [ax.get_position().bounds for ax in fig.axes],
                "markers": [line.get_marker() for ax in fig.axes for line in ax.get_lines()],
                "texts": [t.get_text() for ax in fig.axes for t in ax.texts],
                "labels": [ax.get_ylabel() for ax in fig.axes],
            }
        )
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def test_one_epoch_progress_png_has_four_aligned_panels_with_visible_points(tmp_path, saved_figures):
    _logger(1).plot_progress_png(str(tmp_path))
    (fig,) = saved_figures
    # nnU-Net's 3 panels (the first with a twin axis for the pseudo dice) and ours, in one figure
    assert len(fig["boxes"]) == 5 and fig["labels"][3] == "nnUNetTrainerSelfReg regularisers\n(epoch mean)"
    panels = sorted({(round(x0, 6), round(w, 6)) for x0, _, w, _ in fig["boxes"]})
    assert len(panels) == 1, f"panels of different width or offset: {fig['boxes']}"
    heights = {round(h, 2) for *_, h in fig["boxes"]}
    assert len(heights) == 1, fig["boxes"]
    assert all(m == "o" for m in fig["markers"]), fig["markers"]  # one point per curve: drawn as a marker
    assert TRAIN_LOSS_NOTE in fig["texts"]

    image = np.asarray(Image.open(tmp_path / "progress.png").convert("RGB")).astype(int)
    assert image.shape[:2] == (7200, 3000)  # nnU-Net's 30 x 54 inch figure plus one 18-inch row
    height, width = image.shape[:2]
    for x0, y0, w, h in fig["boxes"][:4]:  # inside each panel's plot area something coloured is drawn
        top, bottom = int((1 - y0 - h) * height) + 5, int((1 - y0) * height) - 5
        area = image[top:bottom, int(x0 * width) + 5 : int((x0 + w) * width) - 5]
        coloured = (area.max(axis=2) - area.min(axis=2)) > 80  # not the grey background or white grid lines
        assert coloured.sum() > 50, (x0, y0, w, h)


def test_long_runs_keep_plain_lines_and_resume_keeps_our_curves(tmp_path, saved_figures):
    logger = _logger(60)
    logger.plot_progress_png(str(tmp_path))
    assert set(saved_figures[0]["markers"]) == {"None"}  # 60 epochs: lines without markers, as nnU-Net draws
    # a checkpoint from before our keys existed: they are padded, the figure still has our panel
    resumed = ExtendedLocalLogger(KEYS, "t")
    plain = {k: v for k, v in logger.my_fantastic_logging.items() if k not in KEYS}
    resumed.load_checkpoint(plain)
    assert all(
        len(resumed.my_fantastic_logging[k]) == 60 and math.isnan(resumed.my_fantastic_logging[k][0]) for k in KEYS
    )
    resumed.plot_progress_png(str(tmp_path))
    assert len(saved_figures[1]["boxes"]) == 5
