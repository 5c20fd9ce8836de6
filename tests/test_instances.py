"""Instance metrics (PQ, SQ, RQ = F1 at IoU 0.5, AJI) by hand, and ``compare --instances`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.evaluation.instances import aggregated_jaccard, connected_instances, instance_metrics
from tests.test_compare import A, B, compare, error_of
from tests.test_compare import results_env as results_env  # noqa: F401  (the fixture)


def two_objects() -> tuple[np.ndarray, np.ndarray]:
    """Reference: objects of 4 px (rows 0-1, cols 0-1) and 6 px (rows 4-5, cols 3-5).
    Prediction: the first exactly; the second as 4 px (row 4-5, cols 4-5); a 2 px false positive."""
    ref = np.zeros((8, 8), np.int64)
    ref[0:2, 0:2] = 1
    ref[4:6, 3:6] = 2
    pred = np.zeros((8, 8), np.int64)
    pred[0:2, 0:2] = 7
    pred[4:6, 4:6] = 3
    pred[7, 6:8] = 5
    return pred, ref


def test_instance_metrics_by_hand():
    pred, ref = two_objects()
    m = instance_metrics(pred, ref)
    # matches at IoU > 0.5: object 1 (IoU 1) and object 2 (IoU 4/6); the 2 px blob is a false positive
    tp, fp, fn = 2, 1, 0
    sq = (1 + 4 / 6) / 2
    rq = tp / (tp + fp / 2 + fn / 2)
    assert m["SQ"] == pytest.approx(sq) and m["RQ"] == pytest.approx(rq) and m["PQ"] == pytest.approx(sq * rq)
    # AJI: intersections 4 + 4, unions 4 + 6, plus the unpaired 2 px prediction
    assert m["AJI"] == pytest.approx(8 / 12)
    assert aggregated_jaccard(pred, np.zeros_like(ref)) == 0.0
    assert all(math.isnan(v) for v in instance_metrics(np.zeros_like(ref), np.zeros_like(ref)).values())


def test_a_merge_costs_recognition_and_aji():
    ref = np.zeros((6, 9), np.int64)
    ref[1:5, 1:4] = 1
    ref[1:5, 5:8] = 2
    merged = np.zeros_like(ref)
    merged[1:5, 1:8] = 1  # the two objects predicted as one (the column between them filled)
    m = instance_metrics(merged, ref)
    # IoU of the merge with each object is 12/28 < 0.5: no match, 1 FP and 2 FN -> RQ = PQ = 0
    assert m["RQ"] == 0 and m["PQ"] == 0
    # AJI: both objects pair with the merged one: (12 + 12) / (28 + 28)
    assert m["AJI"] == pytest.approx(24 / 56)


def test_connected_components_split_touching_labels_only_by_background():
    mask = np.zeros((5, 5), bool)
    mask[0, 0:2] = True
    mask[1, 1] = True  # face-connected to the first
    mask[3, 3] = True
    mask[4, 4] = True  # only diagonal to (3, 3): a separate object
    assert connected_instances(mask).max() == 3


def test_compare_instances_end_to_end(results_env: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "cmp"
    assert compare("-o", str(out), "--instances", "1") == 0
    r = json.loads((out / "results.json").read_text())
    assert {"PQ", "SQ", "RQ", "AJI"} <= set(r["setup"]["metrics"]) and "HD95" not in r["setup"]["metrics"]
    pooled = r["aggregates"]["pooled"]
    # A's label-1 square is the reference shifted by 3 of its 10 columns: IoU 70 / 130, still matched
    assert pooled[A]["PQ"]["1"] == pytest.approx(70 / 130) and pooled[A]["RQ"]["1"] == 1
    assert pooled[A]["AJI"]["1"] == pytest.approx(70 / 130)
    assert pooled[B]["PQ"]["1"] == pytest.approx(1.0)
    assert r["differences"]["pooled"][B]["PQ"]["mean_difference"] == pytest.approx(1 - 70 / 130)
    assert "instance metrics of label 1" in (out / "report.md").read_text()
    assert (out / "box_pq.png").exists()


def test_instances_on_an_unknown_or_absent_label(results_env: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    assert "not a label of Dataset042_Toy; use one of 1 (left), 2 (right)" in error_of(capsys, "--instances", "9")
