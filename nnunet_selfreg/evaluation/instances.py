"""Instance (object-level) metrics: F1 at IoU 0.5, panoptic quality (PQ = SQ · RQ) and aggregated Jaccard.

For tasks where objects matter (nuclei, lesions), a semantic Dice can be good while objects are merged
or split. Instances are the connected components (``scipy.ndimage.label``, face connectivity) of one
label in the prediction and in the reference, or the given instance maps. The matching at IoU > 0.5
(unique by construction) and PQ/SQ/RQ are MONAI's ``compute_panoptic_quality`` (Kirillov et al.,
CVPR 2019): ``RQ = TP / (TP + FP/2 + FN/2)`` is the F1 score of the matched objects, ``SQ`` the mean IoU
of the matches, ``PQ = SQ · RQ``. The aggregated Jaccard index (Kumar et al., IEEE TMI 2017), which MONAI
does not offer, is computed here: each reference object G is paired with the predicted object P* of largest
IoU with it (G is unpaired when no predicted object overlaps it),
``AJI = Σ_paired |G ∩ P*| / (Σ_paired |G ∪ P*| + Σ_unpaired |G| + Σ_unused |P|)``.

No object in either map: every metric is NaN (left out of the means, as nnU-Net does for Dice).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

INSTANCE_METRICS = ("PQ", "SQ", "RQ", "AJI")


def connected_instances(mask: np.ndarray) -> np.ndarray:
    """Instance map of a boolean mask: 0 background, 1 … N the connected components."""
    labelled, _ = ndimage.label(np.asarray(mask, dtype=bool))
    return labelled


def aggregated_jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """AJI of two instance maps (0 = background); NaN if both are empty, 0 if only one is."""
    pred_ids, pred_inv = np.unique(pred, return_inverse=True)
    ref_ids, ref_inv = np.unique(ref, return_inverse=True)
    n_pred, n_ref = len(pred_ids), len(ref_ids)
    has_pred, has_ref = bool(np.any(pred_ids)), bool(np.any(ref_ids))
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return 0.0
    joint = np.bincount(ref_inv.ravel() * n_pred + pred_inv.ravel(), minlength=n_ref * n_pred).reshape(n_ref, n_pred)
    # drop the background row / column (id 0 is the first of the sorted ids when present)
    r0, p0 = int(ref_ids[0] == 0), int(pred_ids[0] == 0)
    inter = joint[r0:, p0:].astype(float)
    ref_size = joint[r0:, :].sum(axis=1).astype(float)
    pred_size = joint[:, p0:].sum(axis=0).astype(float)
    union = ref_size[:, None] + pred_size[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    best = iou.argmax(axis=1)
    rows = np.arange(len(ref_size))
    paired = inter[rows, best] > 0
    c = inter[rows, best][paired].sum()
    u = union[rows, best][paired].sum() + ref_size[~paired].sum()
    used = np.zeros(len(pred_size), dtype=bool)
    used[best[paired]] = True
    u += pred_size[~used].sum()
    return float(c / u) if u > 0 else math.nan


def instance_metrics(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """PQ, SQ, RQ (= F1 at the IoU threshold) and AJI of two instance maps of the same shape."""
    import torch
    from monai.metrics import compute_panoptic_quality

    if pred.shape != ref.shape:
        raise ValueError(f"instance maps differ in shape: prediction {pred.shape}, reference {ref.shape}")
    if not pred.any() and not ref.any():
        return dict.fromkeys(INSTANCE_METRICS, math.nan)
    counts = compute_panoptic_quality(
        torch.from_numpy(np.ascontiguousarray(pred, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(ref, dtype=np.int64)),
        match_iou_threshold=iou_threshold,
        output_confusion_matrix=True,
    )
    tp, fp, fn, iou_sum = (float(x) for x in counts)
    rq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) > 0 else math.nan
    sq = iou_sum / tp if tp > 0 else 0.0
    return {"PQ": sq * rq, "SQ": sq, "RQ": rq, "AJI": aggregated_jaccard(pred, ref)}
