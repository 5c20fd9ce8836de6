"""Surface metrics (HD95, normalised surface Dice) from prediction and reference files, computed by MONAI,
and the instance metrics of ``nnunet_selfreg.evaluation.instances`` in the same pass over the files;
:func:`comparison_file_metrics` runs them for every case of a comparison, in a pool of worker processes.

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
from nnunet_selfreg.evaluation.results import CompareInputError, Comparison, prediction_file, reference_file

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


# --------------------------------------------------------------------------- the file metrics of a comparison


def instance_label_key(comparison: Comparison, requested: str | None) -> str | None:
    """The label key of ``requested`` (a label key or name of the compared dataset), None if not requested."""
    if requested is None:
        return None
    names = comparison.label_names
    match = [k for k in comparison.labels if requested in (k, names.get(k))]
    if not match:
        known = ", ".join(f"{k} ({names.get(k, k)})" for k in comparison.labels)
        raise CompareInputError(f"--instances {requested}: not a label of {comparison.dataset}; use one of {known}")
    return match[0]


def comparison_file_metrics(
    comparison: Comparison,
    tolerance_mm: float,
    surface: bool = True,
    instances: str | None = None,
    num_processes: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[CaseSurface | None, dict]:
    """The file-based metrics of every compared case (HD95/NSD and/or the instance metrics of label
    ``instances``; None when neither is computed) and how they were obtained (``results.json``'s ``surface``).

    Surface metrics are skipped when the dataset has an ignore label (partial annotations have no meaningful
    surface). ``announce`` gets one line before the work starts, ``progress`` one call per case.
    """
    instance_label = instance_label_key(comparison, instances)
    info: dict = {
        "computed": False,
        "nsd_tolerance_mm": tolerance_mm,
        "reader": comparison.reader,
        "library": "monai.metrics (compute_hausdorff_distance percentile=95, compute_surface_dice)",
    }
    if instance_label is not None:
        info["instances"] = {"label": instance_label, "connectivity": "face connectivity", "iou_threshold": 0.5}
    if surface and comparison.ignore_label is not None:
        reason = f"the dataset has an ignore label ({comparison.ignore_label}): surfaces of partial annotations"
        info["reason"] = reason + " are not meaningful"
        surface = False
    elif not surface:
        info["reason"] = "--no-surface"
    if not surface and instance_label is None:
        return None, info
    jobs = [
        SurfaceJob(
            case=c,
            reference_file=str(reference_file(comparison, c)),
            prediction_files=tuple((m.name, str(prediction_file(m, c))) for m in comparison.models),
            labels=tuple(comparison.labels),
            reader=comparison.reader,
            tolerance_mm=tolerance_mm,
            surface=surface,
            instance_label=instance_label,
        )
        for c in comparison.cases
    ]
    what = " and ".join(x for x, on in (("surface", surface), ("instance", instance_label is not None)) if on)
    if announce is not None:
        announce(
            f"{what} metrics for {len(jobs)} cases x {len(comparison.models)} models "
            f"({min(num_processes, len(jobs))} processes)"
        )
    try:
        values = compute_surface_metrics(jobs, num_processes, progress)
    except (ValueError, OSError) as e:
        raise CompareInputError(f"{what} metrics failed: {e}") from None
    if instance_label is not None:
        baseline = comparison.models[0].name
        if all(math.isnan(v[baseline]["PQ"][instance_label]) for v in values.values()):
            raise CompareInputError(
                f"--instances {instances}: label {instance_label} is absent from every reference and prediction "
                "of these cases; choose a label that marks objects (e.g. the nucleus label)"
            )
    return values, {**info, "computed": surface}
