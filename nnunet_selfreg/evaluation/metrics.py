"""Surface metrics (HD95, normalised surface Dice) from prediction and reference files, and the instance
metrics of ``nnunet_selfreg.evaluation.instances`` in the same pass over the files;
:func:`comparison_file_metrics` runs them for every case of a comparison, in a pool of worker processes,
and keeps each (case, model) result in a :class:`~nnunet_selfreg.evaluation.metric_cache.MetricCache`.

Images are read with nnU-Net's own reader/writer (the plans' ``image_reader_writer``), so the spacing is
exactly the one nnU-Net uses.

**The values are MONAI's** (``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice``
on the CPU, tested against them), computed with the building blocks MONAI itself calls there: edges are
``scipy.ndimage.binary_erosion(mask) ^ mask`` on the box around both masks with a one-voxel margin, and the
distance from each edge voxel to the nearest edge voxel of the other mask comes from a
``scipy.spatial.KDTree`` over the scaled edge coordinates, rounded to float32. What differs is only where
the work is done: MONAI finds the edges and distances once for HD95 and once more for NSD, each time after
scanning the whole volume for the label; here the boxes of every label come from one
``scipy.ndimage.find_objects`` pass per label map, and each label's edges and distances are computed once,
on its box, for both metrics. Workers import neither torch nor MONAI unless instance metrics are asked for.

Conventions:

* reference and prediction both empty for a label: HD95 and NSD are NaN (left out of every mean, as
  nnU-Net does for Dice);
* exactly one of them empty (a missed class, or a class predicted where the reference has none): NSD is 0
  (MONAI), and HD95 is the **image diagonal** in mm (:data:`HD95_ONE_EMPTY`), a worst-case value larger
  than any HD95 two non-empty masks can have in that image. Left undefined (NaN), a missed class would drop
  out of the model's per-case foreground mean, which is then taken over fewer labels and can favour the
  model that misses. With the penalty, a label of a case is defined for HD95 exactly when it is for Dice
  and NSD.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nnunet_selfreg.evaluation.instances import INSTANCE_METRICS, connected_instances, instance_metrics
from nnunet_selfreg.evaluation.metric_cache import MetricCache, entry_key, file_digest
from nnunet_selfreg.evaluation.results import CompareInputError, Comparison, prediction_file, reference_file
from nnunet_selfreg.report_folder import package_version

SURFACE_METRICS = ("HD95", "NSD")
#: HD95 of a label present in exactly one of prediction and reference (recorded in results.json)
HD95_ONE_EMPTY = "image_diagonal"
HD95_ONE_EMPTY_TEXT = (
    "a label present in exactly one of prediction and reference (a missed class, or a class predicted where "
    "the reference has none) has NSD 0 and HD95 = the image diagonal in the spacing's unit (mm; px for images "
    "without spacing), sqrt(sum((size_i * spacing_i)^2)), "
    "a worst-case value larger than any HD95 of two non-empty masks in that image; both empty: NaN"
)
#: changes whenever a metric's value for the same files and settings can change (part of every cache key)
METRIC_CODE_VERSION = "surface-2"

#: label key -> label value, or the label values of a region (nnU-Net's region-based training)
Regions = Mapping[str, tuple[int, ...]]
#: case -> model name -> metric -> label key -> value
CaseSurface = dict[str, dict[str, dict[str, float]]]
Box = tuple[slice, ...]


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
    regions: tuple[tuple[int, ...], ...] | None = None  # the labels' values (None: parsed from the keys)
    reader_class: str | None = None  # 'module:class' of ``reader`` (None: nnU-Net's registry finds it)


def label_regions(labels: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Label keys as summary.json spells them ('1', '(1, 2)') -> their label values (nnU-Net's parser)."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region

    out = {}
    for key in labels:
        value = key_to_label_or_region(key)
        out[key] = tuple(int(v) for v in value) if isinstance(value, tuple) else (int(value),)
    return out


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


# --------------------------------------------------------------------------- one label, edges and distances once


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the HD95 of a label present in only one of the two masks."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def _mask(seg: np.ndarray, region: tuple[int, ...]) -> np.ndarray:
    return seg == region[0] if len(region) == 1 else np.isin(seg, region)


def _window(seg: np.ndarray, box: Box, region: tuple[int, ...]) -> np.ndarray:
    """The mask of ``region`` on ``box`` grown by one voxel on every side, zero-padded where that leaves the
    image: the crop MONAI's ``get_mask_edges`` makes (margin 1, not clipped), hence the same coordinates."""
    src = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, seg.shape, strict=True))
    mask = _mask(seg[src], region)
    pad = [(int(b.start == 0), int(b.stop == n)) for b, n in zip(box, seg.shape, strict=True)]
    return np.pad(mask, pad) if any(a or b for a, b in pad) else mask


def _edges(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(mask) ^ mask  # MONAI's get_mask_edges (CPU, no subvoxels)


def _distances(from_edges: np.ndarray, to_edges: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance (mm, float32) from every voxel of ``from_edges`` to the nearest of ``to_edges``: MONAI's
    ``get_surface_distance`` on the CPU (a KD-tree over the scaled edge coordinates)."""
    from scipy.spatial import KDTree

    to_coords = np.argwhere(to_edges).astype(np.float64) * scale
    from_coords = np.argwhere(from_edges).astype(np.float64) * scale
    return KDTree(to_coords, leafsize=32).query(from_coords, k=1)[0].astype(np.float32)


def _box_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict:
    """HD95 and NSD of two non-empty masks given on the same window."""
    pred_edges, ref_edges = _edges(pred), _edges(ref)
    scale = np.asarray(spacing, dtype=np.float64)
    pred_to_ref = _distances(pred_edges, ref_edges, scale)
    ref_to_pred = _distances(ref_edges, pred_edges, scale)
    hd95 = max(np.quantile(pred_to_ref, 0.95), np.quantile(ref_to_pred, 0.95))
    tolerance = np.float32(tolerance_mm)  # MONAI compares float32 distances with the tolerance in float32
    correct = int((pred_to_ref <= tolerance).sum()) + int((ref_to_pred <= tolerance).sum())
    nsd = np.float32(correct) / np.float32(len(pred_to_ref) + len(ref_to_pred))
    return {"HD95": float(np.float32(hd95)), "NSD": float(nsd)}


def _one_empty(shape: Sequence[int], spacing: Sequence[float]) -> dict[str, float]:
    return {"HD95": image_diagonal_mm(shape, spacing), "NSD": 0.0}


def _union(a: Box | None, b: Box | None) -> Box | None:
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def label_boxes(seg: np.ndarray, regions: Regions) -> dict[str, Box | None]:
    """Bounding box of every label (or region) of an integer label map, from one pass over it."""
    values = [v for region in regions.values() for v in region]
    if not values:
        return {}
    if min(values) < 1:
        raise ValueError(f"label values must be >= 1 (0 is the background), got {sorted(set(values))}")
    objects = ndimage.find_objects(seg, max_label=max(values))
    boxes: dict[str, Box | None] = {}
    for key, region in regions.items():
        box = None
        for v in region:
            box = _union(box, objects[v - 1])
        boxes[key] = box
    return boxes


def label_surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    regions: Regions,
    spacing: Sequence[float],
    tolerance_mm: float,
    ref_boxes: Mapping[str, Box | None] | None = None,
) -> dict[str, dict[str, float]]:
    """metric -> label key -> HD95 (mm) / NSD of two integer label maps, every label on its own box.

    ``ref_boxes`` (:func:`label_boxes` of ``ref``) saves the pass over the reference when several
    predictions are compared with it.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction of shape {pred.shape} against a reference of shape {ref.shape}")
    ref_boxes = label_boxes(ref, regions) if ref_boxes is None else ref_boxes
    pred_boxes = label_boxes(pred, regions)
    out: dict[str, dict[str, float]] = {m: {} for m in SURFACE_METRICS}
    for key, region in regions.items():
        pred_box, ref_box = pred_boxes[key], ref_boxes[key]
        if pred_box is None and ref_box is None:
            values = {"HD95": math.nan, "NSD": math.nan}
        elif pred_box is None or ref_box is None:
            values = _one_empty(ref.shape, spacing)
        else:
            box = _union(pred_box, ref_box)
            values = _box_metrics(_window(pred, box, region), _window(ref, box, region), spacing, tolerance_mm)
        for metric, value in values.items():
            out[metric][key] = value
    return out


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """HD95 (mm) and normalised surface Dice at ``tolerance_mm`` of two boolean masks (see the module docstring)."""
    values = label_surface_metrics(
        np.asarray(pred, dtype=np.uint8), np.asarray(ref, dtype=np.uint8), {"1": (1,)}, spacing, tolerance_mm
    )
    return {metric: per_label["1"] for metric, per_label in values.items()}


# --------------------------------------------------------------------------- one case, every model


def reader_class_path(name: str) -> str:
    """'module:class' of nnU-Net's reader/writer ``name``: workers import that module alone, not the
    registry, which imports every reader nnU-Net has (scikit-image and imageio among them)."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    cls = recursive_find_reader_writer_by_name(name)
    return f"{cls.__module__}:{cls.__qualname__}"


def _reader(job: SurfaceJob):
    import importlib

    module, name = (job.reader_class or reader_class_path(job.reader)).split(":")
    return getattr(importlib.import_module(module), name)()


def _read(reader, path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """An integer label map (squeezed to its spatial axes) and its spacing, by nnU-Net's reader."""
    try:
        seg, props = reader.read_seg(path)
    except Exception as e:  # readers raise assorted errors (RuntimeError from SimpleITK, OSError...)
        detail = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ValueError(f"cannot read {path} with nnU-Net's {type(reader).__name__}: {detail[-1]}") from e
    seg, spacing = squeeze_spatial(seg, props["spacing"])
    labels = seg.astype(np.int32)  # nnU-Net's readers return float32 label maps
    if not np.array_equal(labels, seg):
        raise ValueError(f"{path} is not a label map: it holds non-integer values")
    if labels.size and labels.min() >= 0 and labels.max() <= np.iinfo(np.uint8).max:
        labels = labels.astype(np.uint8)
    return labels, spacing


def _instance_values(pred: np.ndarray, ref: np.ndarray, region: tuple[int, ...]) -> dict[str, float]:
    return instance_metrics(connected_instances(_mask(pred, region)), connected_instances(_mask(ref, region)))


def evaluate_case(job: SurfaceJob) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    """Surface (and instance) metrics of every model's prediction of one case (the reference is read once)."""
    regions = dict(zip(job.labels, job.regions, strict=True)) if job.regions is not None else label_regions(job.labels)
    reader = _reader(job)
    ref_seg, spacing = _read(reader, job.reference_file)
    ref_boxes = label_boxes(ref_seg, regions) if job.surface else None
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, path in job.prediction_files:
        pred_seg, _ = _read(reader, path)
        if pred_seg.shape != ref_seg.shape:
            raise ValueError(f"{path} has shape {pred_seg.shape}, its reference {ref_seg.shape}")
        per_metric: dict[str, dict[str, float]] = {}
        if job.instance_label is not None:
            values = _instance_values(pred_seg, ref_seg, regions[job.instance_label])
            per_metric.update({metric: {job.instance_label: value} for metric, value in values.items()})
        if job.surface:
            per_metric.update(
                label_surface_metrics(pred_seg, ref_seg, regions, spacing, job.tolerance_mm, ref_boxes=ref_boxes)
            )
        out[model] = per_metric
    return job.case, out


def _init_worker() -> None:
    # set before anything imports torch (only instance metrics do): one thread per worker process
    os.environ["OMP_NUM_THREADS"] = "1"


def compute_surface_metrics(
    jobs: Sequence[SurfaceJob],
    num_processes: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> CaseSurface:
    """Evaluate ``jobs`` (in worker processes if ``num_processes`` > 1), reporting progress per case.

    ``progress(0, n, "")`` marks the start, then ``progress(i, n, case)`` follows each finished case.
    """
    results: CaseSurface = {}
    n = len(jobs)
    if n == 0:
        return results
    if progress is not None:
        progress(0, n, "")
    num_processes = max(1, min(num_processes, n))
    if num_processes == 1:
        _collect(map(evaluate_case, jobs), results, n, progress)
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


def metric_settings(comparison: Comparison, tolerance_mm: float, surface: bool, instance_label: str | None) -> dict:
    """Everything besides the two files that decides a case's values: part of every cache key."""
    settings: dict = {
        "code": METRIC_CODE_VERSION,
        "reader": comparison.reader,
        "surface": surface,
        "instance_label": instance_label,
    }
    if surface:
        settings.update(
            labels=list(comparison.labels), nsd_tolerance_mm=float(tolerance_mm), hd95_one_empty=HD95_ONE_EMPTY
        )
    if instance_label is not None:
        settings.update(instances={"connectivity": "face", "iou_threshold": 0.5, "monai": package_version("monai")})
    return settings


def _expected_metrics(comparison: Comparison, surface: bool, instance_label: str | None) -> dict[str, list[str]]:
    out = {m: list(comparison.labels) for m in SURFACE_METRICS} if surface else {}
    if instance_label is not None:
        out.update({m: [instance_label] for m in INSTANCE_METRICS})
    return out


@dataclass
class _Lookup:
    """Cache keys of every (case, model) and the values found in the cache."""

    keys: dict[tuple[str, str], str]
    found: CaseSurface
    invalid: int


def _look_up(
    comparison: Comparison, cache: MetricCache, settings: dict, expected: dict[str, list[str]], threads: int
) -> _Lookup:
    files = {c: str(reference_file(comparison, c)) for c in comparison.cases}
    files.update({f"{m.name}\0{c}": str(prediction_file(m, c)) for m in comparison.models for c in comparison.cases})
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL: files hashed in parallel
            digests = dict(zip(files, pool.map(file_digest, files.values()), strict=True))
    except OSError as e:
        raise CompareInputError(f"cannot read {e.filename}: {e.strerror}; or use --no-cache") from None
    keys, found = {}, {}
    invalid_before = cache.invalid
    for c in comparison.cases:
        for m in comparison.models:
            key = entry_key(digests[f"{m.name}\0{c}"], digests[c], settings)
            keys[(c, m.name)] = key
            values = cache.get(key, expected)
            if values is not None:
                found.setdefault(c, {})[m.name] = values
    return _Lookup(keys, found, cache.invalid - invalid_before)


def _metrics_info(comparison: Comparison, tolerance_mm: float, instance_label: str | None) -> dict:
    """How the file-based metrics are computed (``results.json``'s ``surface``), before any is."""
    info: dict = {
        "computed": False,
        "nsd_tolerance_mm": tolerance_mm,
        "reader": comparison.reader,
        "library": (
            "MONAI's CPU method (monai.metrics compute_hausdorff_distance percentile=95, compute_surface_dice): "
            "scipy.ndimage binary-erosion edges and scipy.spatial KDTree distances, once per label for both metrics"
        ),
        "hd95_one_empty": {"rule": HD95_ONE_EMPTY, "description": HD95_ONE_EMPTY_TEXT},
        "code_version": METRIC_CODE_VERSION,
    }
    if instance_label is not None:
        info["instances"] = {"label": instance_label, "connectivity": "face connectivity", "iou_threshold": 0.5}
    return info


def _surface_wanted(comparison: Comparison, surface: bool, info: dict) -> bool:
    """Surface metrics are asked for and meaningful (no ignore label); the reason in ``info`` when not."""
    if surface and comparison.ignore_label is not None:
        reason = f"the dataset has an ignore label ({comparison.ignore_label}): surfaces of partial annotations"
        info["reason"] = reason + " are not meaningful"
        return False
    if not surface:
        info["reason"] = "--no-surface"
    return surface


def _jobs(
    comparison: Comparison, found: CaseSurface, tolerance_mm: float, surface: bool, instance_label: str | None
) -> list[SurfaceJob]:
    """One job per case with a model whose values are not in ``found`` (the cache)."""
    jobs = []
    for c in comparison.cases:
        todo = [m for m in comparison.models if m.name not in found.get(c, {})]
        if todo:
            if not jobs:  # resolved once, and only when something is computed
                regions = label_regions(comparison.labels)
                reader_class = reader_class_path(comparison.reader)
            jobs.append(
                SurfaceJob(
                    case=c,
                    reference_file=str(reference_file(comparison, c)),
                    prediction_files=tuple((m.name, str(prediction_file(m, c))) for m in todo),
                    labels=tuple(comparison.labels),
                    reader=comparison.reader,
                    tolerance_mm=tolerance_mm,
                    surface=surface,
                    instance_label=instance_label,
                    regions=tuple(regions[k] for k in comparison.labels),
                    reader_class=reader_class,
                )
            )
    return jobs


def _stored(
    comparison: Comparison,
    found: CaseSurface,
    computed: CaseSurface,
    cache: MetricCache | None,
    lookup: _Lookup | None,
    settings: dict,
) -> CaseSurface:
    """Cached and computed values of every (case, model), in the comparison's order; the computed ones cached."""
    values: CaseSurface = {c: dict(found.get(c, {})) for c in comparison.cases}
    for c, per_model in computed.items():
        values[c].update(per_model)
        if cache is not None and lookup is not None:
            for model, metrics in per_model.items():
                cache.put(lookup.keys[(c, model)], metrics, {"case": c, "model": model, "settings": settings})
    return {c: {m.name: values[c][m.name] for m in comparison.models} for c in comparison.cases}


def _check_instances_present(comparison: Comparison, values: CaseSurface, label: str, option: str | None) -> None:
    baseline = comparison.models[0].name
    if all(math.isnan(v[baseline]["PQ"][label]) for v in values.values()):
        raise CompareInputError(
            f"--instances {option}: label {label} is absent from every reference and prediction "
            "of these cases; choose a label that marks objects (e.g. the nucleus label)"
        )


def comparison_file_metrics(
    comparison: Comparison,
    tolerance_mm: float,
    surface: bool = True,
    instances: str | None = None,
    num_processes: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
    announce: Callable[[str], None] | None = None,
    cache_folder: Path | None = None,
) -> tuple[CaseSurface | None, dict]:
    """The file-based metrics of every compared case (HD95/NSD and/or the instance metrics of label
    ``instances``; None when neither is computed) and how they were obtained (``results.json``'s ``surface``).

    Surface metrics are skipped when the dataset has an ignore label (partial annotations have no meaningful
    surface). With ``cache_folder``, each (case, model) is looked up by the content of its two files and the
    settings, and only what is missing is computed (then stored). ``announce`` gets one line before the work
    starts, ``progress`` the calls described in :func:`compute_surface_metrics`.
    """
    instance_label = instance_label_key(comparison, instances)
    info = _metrics_info(comparison, tolerance_mm, instance_label)
    surface = _surface_wanted(comparison, surface, info)
    if not surface and instance_label is None:
        return None, info
    what = " and ".join(x for x, on in (("surface", surface), ("instance", instance_label is not None)) if on)
    settings = metric_settings(comparison, tolerance_mm, surface, instance_label)
    expected = _expected_metrics(comparison, surface, instance_label)
    cache = MetricCache(cache_folder) if cache_folder is not None else None
    t0 = time.perf_counter()
    lookup = _look_up(comparison, cache, settings, expected, num_processes) if cache is not None else None
    found = lookup.found if lookup is not None else {}
    jobs = _jobs(comparison, found, tolerance_mm, surface, instance_label)
    n_total = len(comparison.cases) * len(comparison.models)
    n_todo = sum(len(j.prediction_files) for j in jobs)
    if announce is not None:
        cached = f"{n_total - n_todo} of {n_total} (case, model) pairs from the cache {cache.folder}; " if cache else ""
        processes = min(num_processes, len(jobs))
        announce(
            f"{what} metrics for {len(comparison.cases)} cases x {len(comparison.models)} models: {cached}"
            + (f"computing {n_todo} ({processes} processes)" if n_todo else "nothing to compute")
        )
    try:
        computed = compute_surface_metrics(jobs, num_processes, progress)
    except (ValueError, OSError) as e:
        raise CompareInputError(f"{what} metrics failed: {e}") from None
    values = _stored(comparison, found, computed, cache, lookup, settings)
    if cache is not None and cache.write_error is not None and announce is not None:
        announce(f"the metric cache could not be written ({cache.write_error}); the results are complete")
    if instance_label is not None:
        _check_instances_present(comparison, values, instance_label, instances)
    info["cache"] = {
        "used": cache is not None,
        "folder": str(cache.folder) if cache is not None else None,
        "pairs": n_total,
        "from_cache": n_total - n_todo,
        "computed": n_todo,
        "invalid_entries": lookup.invalid if lookup is not None else 0,
        "write_error": cache.write_error if cache is not None else None,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    return values, {**info, "computed": surface}
