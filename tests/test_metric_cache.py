"""The metric cache of ``compare``: keys from content and settings, validated reads, atomic writes, and
a comparison that recomputes only what is new (through the real command, on the hand-made result
folders of ``tests/test_compare.py``)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.evaluation.metric_cache import CACHE_FOLDER, MetricCache, entry_key, file_digest
from tests.test_compare import A, B, C, compare, prediction, results_env, write_seg  # noqa: F401

SETTINGS = {"code": "x", "labels": ["1", "2"], "nsd_tolerance_mm": 1.0, "hd95_one_empty": "image_diagonal"}
EXPECTED = {"HD95": ["1", "2"], "NSD": ["1", "2"]}
VALUES = {"HD95": {"1": 1.5, "2": math.nan}, "NSD": {"1": 0.5, "2": math.nan}}


def same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN here


def test_keys_follow_content_and_settings(tmp_path: Path) -> None:
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"abc")
    d = file_digest(f)
    f.write_bytes(b"abd")
    assert file_digest(f) != d
    tif = tmp_path / "b.tif"
    tif.write_bytes(b"x")
    d_tif = file_digest(tif)
    (tmp_path / "b.json").write_text('{"spacing": [1, 1, 1]}')  # nnU-Net's TIFF reader reads the spacing here
    assert file_digest(tif) != d_tif
    key = entry_key("p", "r", SETTINGS)
    assert key == entry_key("p", "r", dict(reversed(SETTINGS.items())))  # order of the settings does not matter
    others = [entry_key("q", "r", SETTINGS), entry_key("p", "q", SETTINGS), entry_key("r", "p", SETTINGS)]
    for name, value in (("code", "y"), ("labels", ["1"]), ("nsd_tolerance_mm", 2.0), ("hd95_one_empty", "nan")):
        others.append(entry_key("p", "r", {**SETTINGS, name: value}))
    assert len({key, *others}) == len(others) + 1


def test_round_trip_and_every_kind_of_bad_entry(tmp_path: Path) -> None:
    cache = MetricCache(tmp_path / "cache")
    assert cache.get("k", EXPECTED) is None and cache.invalid == 0  # absent is a miss, not invalid
    cache.put("k", VALUES, {"case": "c"})
    assert same(cache.get("k", EXPECTED), VALUES)
    good = cache.path("k").read_text()
    entry = json.loads(good)

    def edited(change) -> str:
        e = json.loads(good)
        change(e)
        return json.dumps(e)

    bad = {
        "truncated": good[: len(good) // 2],
        "not json": "\x00\x01",
        "value changed": edited(lambda e: e["values"]["HD95"].update({"1": 1.0})),
        "other key": edited(lambda e: e.update(key="other")),
        "old format": edited(lambda e: e.update(format=0)),
        "label missing": json.dumps({**entry, "values": {"HD95": {"1": 1.5}, "NSD": entry["values"]["NSD"]}}),
    }
    for n, (what, text) in enumerate(bad.items(), start=1):
        cache.path("k").write_text(text)
        assert cache.get("k", EXPECTED) is None, what
        assert cache.invalid == n
    # a consistent entry (checksum recomputed) whose values are not numbers is refused too
    data = {"HD95": {"1": "1.5", "2": None}, "NSD": {"1": 0.5, "2": None}}
    e = edited(lambda e: e.update(values=data))
    import hashlib

    from nnunet_selfreg.evaluation.metric_cache import _canonical  # the checksum as the cache computes it

    e = json.loads(e)
    e["checksum"] = hashlib.sha256(_canonical(data)).hexdigest()
    cache.path("k").write_text(json.dumps(e))
    assert cache.get("k", EXPECTED) is None
    assert cache.get("k", {"HD95": ["1", "2"]}) is None  # other metrics expected than stored
    cache.put("k", VALUES, {})
    assert same(cache.get("k", EXPECTED), VALUES)
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_unwritable_cache_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cache = MetricCache(tmp_path / "file" / "cache")
    cache.put("k", VALUES, {})
    assert cache.write_error is not None and cache.get("k", EXPECTED) is None


def _writer(folder: str, n: int) -> int:
    cache = MetricCache(folder)
    for _ in range(n):
        cache.put("k", VALUES, {"writer": multiprocessing.current_process().name})
    return n


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    reader = MetricCache(folder)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pending = pool.starmap_async(_writer, [(str(folder), 300)] * 3)
        seen = 0
        while not pending.ready():
            values = reader.get("k", EXPECTED)
            seen += values is not None
            assert values is None or same(values, VALUES)
        assert pending.get() == [300] * 3
    assert reader.invalid == 0 and seen > 0 and same(reader.get("k", EXPECTED), VALUES)
    assert [p.name for p in folder.iterdir()] == ["k.json"]


# --------------------------------------------------------------------------- through compare


def unique_predictions(results: Path) -> None:
    """The toy's predictions repeat across cases (and C's are B's), which the content-keyed cache rightly
    computes once: give each (model, case) one voxel of its own so that every pair is a cache entry."""
    for mi, (key, folder) in enumerate((("A", f"{A}__nnUNetPlans__2d"), ("B", f"{B}__nnUNetPlans__2d"), ("C", C))):
        for ci, case in enumerate(sorted(p.name for p in (results / folder).rglob("case_*.nii.gz"))):
            path = next((results / folder).rglob(case))
            seg = prediction(key, path.name.removesuffix(".nii.gz"))
            seg[19, ci + 6 * mi] = 1
            write_seg(path, seg)


def run(out: Path, *extra: str, trainers=(A, B)) -> dict:
    assert compare("-o", str(out), *extra, trainers=trainers, surface=True) == 0
    return json.loads((out / "results.json").read_text())


def values_of(results: dict) -> dict:
    metrics = ("HD95", "NSD")
    return {c["case"]: {m: {k: v[k] for k in metrics} for m, v in c["values"].items()} for c in results["cases"]}


def test_compare_recomputes_only_what_is_new(results_env: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    unique_predictions(results_env)
    cache_folder = results_env / CACHE_FOLDER
    first = run(tmp_path / "one")["setup"]["surface"]["cache"]
    assert first == {**first, "used": True, "folder": str(cache_folder), "pairs": 12, "from_cache": 0, "computed": 12}
    assert len(list(cache_folder.glob("*.json"))) == 12
    # one more model, a new output folder: only its 6 cases are computed
    both = run(tmp_path / "two", trainers=(A, B, C))
    assert both["setup"]["surface"]["cache"]["from_cache"] == 12 and both["setup"]["surface"]["cache"]["computed"] == 6
    fresh = run(tmp_path / "fresh", "--no-cache", trainers=(A, B, C))
    assert fresh["setup"]["surface"]["cache"] == {**fresh["setup"]["surface"]["cache"], "used": False, "computed": 18}
    assert values_of(both) == values_of(fresh)
    assert "--no-cache" in fresh["command"]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "12 of 18 (case, model) pairs read from the metric cache" in report
    # a re-predicted case and a corrupted entry are computed again; another tolerance is a new key
    pred = results_env / f"{B}__nnUNetPlans__2d" / "fold_0" / "validation" / "case_1.nii.gz"
    seg = prediction("B", "case_1")
    seg[seg == 1] = 0
    seg[3:13, 5:15] = 1  # label 1 shifted by 2 columns (1 mm)
    write_seg(pred, seg)
    inputs = {p: json.loads(p.read_text())["inputs"] for p in cache_folder.glob("*.json")}
    victim = next(p for p, i in inputs.items() if (i["model"], i["case"]) == (C, "case_0"))
    victim.write_text(victim.read_text()[:40])
    again = run(tmp_path / "three", trainers=(A, B, C))["setup"]["surface"]["cache"]
    assert again["computed"] == 2 and again["invalid_entries"] == 1
    cases = json.loads((tmp_path / "three" / "results.json").read_text())["cases"]
    assert next(c for c in cases if c["case"] == "case_1")["values"][B]["HD95"]["1"] == pytest.approx(1.0)
    tol = run(tmp_path / "four", "--nsd-tolerance", "2")["setup"]["surface"]["cache"]
    assert tol["computed"] == 12
    err = capsys.readouterr().err
    assert "12 of 12 (case, model) pairs from the cache" not in err  # the tolerance run found nothing
    assert "nothing to compute" not in err


def test_compare_with_every_pair_cached_starts_no_worker(results_env: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    unique_predictions(results_env)
    run(tmp_path / "one", "-np", "2")
    again = run(tmp_path / "two", "-np", "2")["setup"]["surface"]["cache"]
    assert again["computed"] == 0 and again["from_cache"] == 12
    err = capsys.readouterr().err
    assert "12 of 12 (case, model) pairs from the cache" in err and "nothing to compute" in err
    shutil.rmtree(results_env / CACHE_FOLDER)
    assert run(tmp_path / "three")["setup"]["surface"]["cache"]["computed"] == 12
    cases = json.loads((tmp_path / "three" / "results.json").read_text())["cases"]
    assert np.isfinite(cases[1]["values"][A]["HD95"]["1"])


def test_default_processes_follow_affinity_and_slurm(monkeypatch) -> None:
    from nnunet_selfreg.tools.compare import available_cpus

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    mine = len(os.sched_getaffinity(0))
    assert available_cpus() == mine
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(mine + 5))  # never more than this process may use
    assert available_cpus() == mine
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert available_cpus() == mine


def test_progress_gives_elapsed_time_and_eta(monkeypatch, capsys) -> None:
    from nnunet_selfreg.tools import compare as compare_tool

    now = [100.0]
    monkeypatch.setattr(compare_tool.time, "monotonic", lambda: now[0])
    progress = compare_tool._Progress()
    progress(0, 40, "")
    now[0] += 30
    progress(1, 40, "case_a")  # 30 s for the first case: 39 more to go
    now[0] += 90
    progress(4, 40, "case_d")  # 120 s for 4 cases
    now[0] += 1080
    progress(40, 40, "case_z")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[compare] surface metrics: case 1/40 (case_a), 0:30 elapsed, ETA 19:30",
        "[compare] surface metrics: case 4/40 (case_d), 2:00 elapsed, ETA 18:00",
        "[compare] surface metrics: case 40/40 (case_z), 20:00 elapsed",
    ]
