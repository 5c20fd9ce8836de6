"""Surface metrics (HD95, normalised surface Dice) from prediction and reference files, computed by MONAI,
and the instance metrics of ``nnunet_selfreg.evaluation.instances`` in the same pass over the files.

Images are read with nnU-Net's own reader/writer (the plans' ``image_reader_writer``), so the spacing is
exactly the one nnU-Net uses. Conventions (as in MONAI and nnU-Net):

* reference and prediction both empty for a class: HD95 and NSD are NaN (excluded from means);
* only one of them empty: HD95 is NaN (undefined, excluded and counted), NSD is 0.
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from nnunet_selfreg.evaluation.instances import connected_instances, instance_metrics

SURFACE_METRICS = ("HD95", "NSD")

#: case -> model name -> metric -> label key -> value
CaseSurface = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class SurfaceJob:
    """Everything needed to evaluate one case for all models (picklable, for worker processes)."""

    case: str
    reference_file: str
    prediction_files: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]
    reader: str
    tolerance_mm: float
    surface: bool = True  # HD95 / NSD for every label
    instance_label: str | None = None  # PQ / SQ / RQ / AJI of this label's connected components


def squeeze_spatial(seg: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Drop nnU-Net's channel axis and size-1 spatial axes (2D images are read as 1 x Y x X), with their spacing."""
    seg = seg[0]
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != seg.ndim:
        raise ValueError(f"spacing {spacing} does not match an image of shape {seg.shape}")
    keep = [i for i, n in enumerate(seg.shape) if n > 1]
    if len(keep) < 2:  # degenerate (line or single-pixel) images: keep the last two axes
        keep = list(range(seg.ndim))[-2:]
    drop = tuple(i for i in range(seg.ndim) if i not in keep)
    return seg.squeeze(axis=drop), tuple(spacing[i] for i in keep)


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """HD95 (mm) and normalised surface Dice at ``tolerance_mm`` of two boolean masks, by MONAI."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred_empty, ref_empty = not pred.any(), not ref.any()
    if pred_empty and ref_empty:
        return {"HD95": math.nan, "NSD": math.nan}
    y_pred = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32)[None, None])
    y = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)[None, None])
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks, handled here
        nsd = compute_surface_dice(y_pred, y, [tolerance_mm], include_background=True, spacing=spacing)
        if pred_empty or ref_empty:
            hd95 = math.nan
        else:
            hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
            hd95 = float(hd95.item())
    return {"HD95": hd95, "NSD": float(nsd.item())}


def _read(reader, path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # readers raise assorted errors (RuntimeError from SimpleITK, OSError...)
        detail = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ValueError(f"cannot read {path} with nnU-Net's {type(reader).__name__}: {detail[-1]}") from e
    return squeeze_spatial(seg, props["spacing"])


def evaluate_case(job: SurfaceJob) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    """Surface metrics of every model's prediction of one case (the reference is read once)."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region, region_or_label_to_mask
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    reader = recursive_find_reader_writer_by_name(job.reader)()
    ref_seg, spacing = _read(reader, job.reference_file)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, path in job.prediction_files:
        pred_seg, _ = _read(reader, path)
        if pred_seg.shape != ref_seg.shape:
            raise ValueError(f"{path} has shape {pred_seg.shape}, its reference {ref_seg.shape}")
        per_metric: dict[str, dict[str, float]] = {m: {} for m in SURFACE_METRICS} if job.surface else {}
        if job.instance_label is not None:
            region = key_to_label_or_region(job.instance_label)
            values = instance_metrics(
                connected_instances(region_or_label_to_mask(pred_seg, region)),
                connected_instances(region_or_label_to_mask(ref_seg, region)),
            )
            per_metric.update({metric: {job.instance_label: value} for metric, value in values.items()})
        for label in job.labels if job.surface else ():
            region = key_to_label_or_region(label)
            values = surface_metrics(
                region_or_label_to_mask(pred_seg, region),
                region_or_label_to_mask(ref_seg, region),
                spacing,
                job.tolerance_mm,
            )
            for metric, value in values.items():
                per_metric[metric][label] = value
        out[model] = per_metric
    return job.case, out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def compute_surface_metrics(
    jobs: Sequence[SurfaceJob],
    num_processes: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> CaseSurface:
    """Evaluate ``jobs`` (in worker processes if ``num_processes`` > 1), reporting progress per case."""
    results: CaseSurface = {}
    n = len(jobs)
    num_processes = max(1, min(num_processes, n))
    if num_processes == 1:
        done: Iterable = map(evaluate_case, jobs)
        _collect(done, results, n, progress)
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes, initializer=_init_worker) as pool:
            _collect(pool.imap_unordered(evaluate_case, jobs), results, n, progress)
    return results


def _collect(done: Iterable, results: CaseSurface, n: int, progress: Callable[[int, int, str], None] | None):
    for i, (case, values) in enumerate(done, start=1):
        results[case] = values
        if progress is not None:
            progress(i, n, case)
