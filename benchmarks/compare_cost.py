"""What ``nnunet-selfreg compare`` costs against cases, voxels and classes, before and after; the cached rerun.

Builds synthetic nnU-Net result trees (``$nnUNet_results/DATASET/TRAINER__nnUNetPlans__3d_fullres/fold_F/
validation/*.nii.gz`` with the ``summary.json`` that nnU-Net's own ``compute_metrics_on_folder`` writes,
``plans.json`` and ``dataset.json`` beside them, and ``$nnUNet_preprocessed/DATASET/gt_segmentations`` with
``splits_final.json``), then runs the real command in a child process with the code of ``--before`` and/or
``--after`` first on ``PYTHONPATH`` and records the CPU time (user + system) of its whole process tree, the
wall time and the peak resident memory of its largest process (``os.wait4``: the pool workers are waited
for, so their time is included). The machine may be shared: CPU time is the quantity to compare; the load
average is recorded beside every run.

References are ``K`` ellipsoids, one per class, on a jittered grid; each model's prediction paints the
same ellipsoids moved by up to 2 voxels and scaled by 0.9-1.1, and misses a class with probability 2 %.

Sections (``--sections``, default all but ``tiny``):

* ``grid``: voxels (64³, 128³, 200×256×256 at 8 classes, 4 cases), classes (2, 8, 20 at 128³), cases
  (4, 8, 16 at 64³), 2 models, before and after (after with ``--no-cache``: everything computed);
* ``big``: 200×256×256, 20 classes, 3 models: after on ``--big-cases`` cases, before on
  ``--big-before-cases``; each also with ``--no-surface`` to separate the file metrics from the rest;
  then the incremental sequence (after): a cold cache, the same comparison again into a new folder, and a
  2-model comparison followed by the 3-model one (one model added);
* ``stats``: ``--no-surface`` on ``--stats-cases`` cases (summary.json and statistics only, which do not
  depend on the image size), to extrapolate the big case to 300 cases: file-metric CPU per case (measured)
  × 300 + the rest measured at 300 cases;
* ``startup``: CPU time per spawned worker until its first case is done (a 2-process pool on a tiny case);
* ``tiny``: one 16³ point and the incremental sequence, after only (what the tests run).

Example: ``python benchmarks/compare_cost.py --before /path/to/old/checkout --json cost.json --figure cost.png``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSelfReg", "nnUNetTrainerSSNet")
CONFIG = "3d_fullres"
SPACING = (2.0, 0.8, 0.8)  # mm per axis, in array order (z, y, x)


@dataclass(frozen=True)
class TreeSpec:
    """One synthetic dataset with its cross-validation results."""

    cases: int
    shape: tuple[int, int, int]
    classes: int
    models: int = 2
    seed: int = 0
    miss_probability: float = 0.02

    @property
    def folds(self) -> int:
        return min(5, self.cases)

    @property
    def name(self) -> str:
        z, y, x = self.shape
        return f"c{self.cases}_v{z}x{y}x{x}_k{self.classes}_m{self.models}"


# --------------------------------------------------------------------------- synthetic trees


def blobs(shape: tuple[int, ...], classes: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centre, radii) in voxels of one ellipsoid per class, on a jittered grid filling the image."""
    per_axis = math.ceil(classes ** (1 / len(shape)))
    cell = np.array(shape, dtype=float) / per_axis
    slots = rng.permutation(per_axis ** len(shape))[:classes]
    out = []
    for slot in slots:
        index = np.array(np.unravel_index(slot, (per_axis,) * len(shape)), dtype=float)
        centre = (index + 0.5 + rng.uniform(-0.1, 0.1, len(shape))) * cell
        out.append((centre, cell * rng.uniform(0.25, 0.45, len(shape))))
    return out


def paint(shape: tuple[int, ...], params: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    for label, (centre, radii) in enumerate(params, start=1):
        if radii is None:
            continue  # a missed class
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, shape)
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1
        seg[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))][inside] = label
    return seg


def write_seg(path: Path, seg: np.ndarray) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(seg)
    img.SetSpacing(tuple(reversed(SPACING)))
    sitk.WriteImage(img, str(path), useCompression=True)


def plans(dataset: str, shape: tuple[int, ...]) -> dict:
    return {
        "dataset_name": dataset,
        "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "label_manager": "LabelManager",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": list(SPACING),
        "original_median_shape_after_transp": list(shape),
        "configurations": {
            CONFIG: {"data_identifier": f"nnUNetPlans_{CONFIG}", "patch_size": [64, 64, 64], "spacing": list(SPACING)}
        },
    }


def nnunet_summary(gt: Path, folder: Path, labels: list[int]) -> None:
    """nnU-Net's own ``compute_metrics_on_folder`` writes ``folder/summary.json`` (its pool forked: nothing
    here has used torch, and a fork needs no fresh interpreter per folder)."""
    import multiprocessing

    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    get_context = multiprocessing.get_context
    evaluate_predictions.multiprocessing.get_context = lambda method=None: get_context("fork")
    try:
        evaluate_predictions.compute_metrics_on_folder(
            str(gt), str(folder), str(folder / "summary.json"), SimpleITKIO(), ".nii.gz", labels, num_processes=2
        )
    finally:
        evaluate_predictions.multiprocessing.get_context = get_context


def build_tree(root: Path, spec: TreeSpec, dataset_id: int = 950) -> str:
    """The nnU-Net folders of ``spec`` under ``root`` (kept if complete); returns the dataset name."""
    dataset = f"Dataset{dataset_id:03d}_CompareCost"
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == asdict(spec):
        return dataset
    shutil.rmtree(root, ignore_errors=True)
    raw, pre, res = (root / v / dataset for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    gt = pre / "gt_segmentations"
    for p in (raw, gt, res):
        p.mkdir(parents=True)
    cases = [f"case_{i:04d}" for i in range(spec.cases)]
    folds = [cases[f :: spec.folds] for f in range(spec.folds)]
    labels = list(range(1, spec.classes + 1))
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class_{k}": k for k in labels}},
        "numTraining": spec.cases,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / "splits_final.json").write_text(
        json.dumps([{"train": [c for c in cases if c not in v], "val": v} for v in folds])
    )
    params = {}
    for i, case in enumerate(cases):
        params[case] = blobs(spec.shape, spec.classes, np.random.default_rng([spec.seed, i]))
        write_seg(gt / f"{case}.nii.gz", paint(spec.shape, params[case]))
    for m, trainer in enumerate(TRAINERS[: spec.models]):
        folder = res / f"{trainer}__nnUNetPlans__{CONFIG}"
        for f, fold_cases in enumerate(folds):
            val = folder / f"fold_{f}" / "validation"
            val.mkdir(parents=True)
            for case in fold_cases:
                rng = np.random.default_rng([spec.seed, m + 1, int(case[5:])])
                moved = [
                    (c + rng.uniform(-2, 2, c.shape), r * rng.uniform(0.9, 1.1, r.shape))
                    if rng.random() >= spec.miss_probability
                    else (c, None)
                    for c, r in params[case]
                ]
                write_seg(val / f"{case}.nii.gz", paint(spec.shape, moved))
            nnunet_summary(gt, val, labels)
        (folder / "plans.json").write_text(json.dumps(plans(dataset, spec.shape)))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    done.write_text(json.dumps(asdict(spec)))
    return dataset


# --------------------------------------------------------------------------- measuring


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """CPU (user + system, the whole process tree), wall time and peak RSS of the largest process."""
    load = loadavg()
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{log.read_text()[-3000:]}")
    return {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "loadavg_before": load,
    }


def code_env(code: Path, root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": "PASSIVE"}
    env.update({v: str(root / v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    return env


def run_compare(
    code: Path, root: Path, dataset: str, spec: TreeSpec, out: Path, models: int | None = None, *extra: str
) -> dict:
    """One ``compare`` of the first ``models`` trainers (default all) with the code in ``code``."""
    trainers = TRAINERS[: models or spec.models]
    folds = [str(f) for f in range(spec.folds)]
    cmd = [sys.executable, "-m", "nnunet_selfreg.tools.main", "compare", "-d", dataset, "-c", CONFIG]
    cmd += ["-tr", *trainers, "-f", *folds, "-o", str(out), "-np", "2", *extra]
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_measured(cmd, code_env(code, root), out.with_suffix(".log"))
    surface = json.loads((out / "results.json").read_text())["setup"]["surface"]
    result["cache"] = surface.get("cache")
    result["models"] = len(trainers)
    return result


STARTUP_CHILD = """
import json, multiprocessing, resource, sys, time
from nnunet_selfreg.evaluation import metrics
kwargs = {}
if "reader_class" in metrics.SurfaceJob.__dataclass_fields__:  # what compare passes to its workers
    kwargs = {"regions": ((1,),), "reader_class": "nnunetv2.imageio.simpleitk_reader_writer:SimpleITKIO"}
job = metrics.SurfaceJob("c", sys.argv[1], (("m", sys.argv[2]),), ("1",), "SimpleITKIO", 1.0, **kwargs)
t0 = time.perf_counter()
with multiprocessing.get_context("spawn").Pool(2, initializer=metrics._init_worker) as pool:
    pool.map(metrics.evaluate_case, [job, job], chunksize=1)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"cpu_s_per_worker": (usage.ru_utime + usage.ru_stime) / 2, "wall_s": wall}))
"""


def worker_startup(code: Path, work: Path, repeats: int = 3) -> dict:
    """CPU time per spawned worker, start to first (tiny) case done, median of ``repeats`` pools."""
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:6, 2:6, 2:6] = 1
    work.mkdir(parents=True, exist_ok=True)
    write_seg(work / "ref.nii.gz", seg)
    write_seg(work / "pred.nii.gz", np.roll(seg, 1, axis=2))
    runs = []
    for _ in range(repeats):
        load = loadavg()
        proc = subprocess.run(
            [sys.executable, "-c", STARTUP_CHILD, str(work / "ref.nii.gz"), str(work / "pred.nii.gz")],
            env={**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": "PASSIVE"},
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "loadavg_before": load})
    cpu = sorted(r["cpu_s_per_worker"] for r in runs)
    return {"median_cpu_s_per_worker": cpu[len(cpu) // 2], "runs": runs}


# --------------------------------------------------------------------------- sections


GRID = {
    "voxels": [TreeSpec(4, s, 8) for s in ((64, 64, 64), (128, 128, 128), (200, 256, 256))],
    "classes": [TreeSpec(4, (128, 128, 128), k) for k in (2, 8, 20)],
    "cases": [TreeSpec(n, (64, 64, 64), 8) for n in (4, 8, 16)],
}
BIG_SHAPE, BIG_CLASSES, BIG_MODELS, TARGET_CASES = (200, 256, 256), 20, 3, 300


_MEASURED: dict[tuple, dict] = {}


def measure_point(codes: dict[str, Path], spec: TreeSpec, work: Path) -> dict:
    """Every version's ``compare`` of one tree (each point once per run: the grid's axes share points)."""
    memo = (spec, tuple(codes.items()))
    if memo in _MEASURED:
        return _MEASURED[memo]
    root = work / "trees" / spec.name
    dataset = build_tree(root, spec)
    row: dict = {"spec": asdict(spec)}
    for version, code in codes.items():
        extra = ("--no-cache",) if version == "after" else ()
        row[version] = run_compare(code, root, dataset, spec, work / "out" / f"{spec.name}_{version}", None, *extra)
        print(f"  {spec.name} {version}: {row[version]['cpu_s']:.1f} CPU-s", flush=True)
    _MEASURED[memo] = row
    return row


def incremental(code: Path, spec: TreeSpec, work: Path) -> dict:
    """Cold cache; the same comparison again (new output folder); 2 models then 3 (one model added)."""
    root = work / "trees" / spec.name
    dataset = build_tree(root, spec)
    cache = root / "nnUNet_results" / dataset / "compare_cache"
    out = work / "out" / f"{spec.name}_incremental"
    shutil.rmtree(cache, ignore_errors=True)
    seq = {"cold": run_compare(code, root, dataset, spec, out / "cold")}
    seq["again"] = run_compare(code, root, dataset, spec, out / "again")
    shutil.rmtree(cache)
    seq["without_last_model"] = run_compare(code, root, dataset, spec, out / "fewer", spec.models - 1)
    seq["one_model_added"] = run_compare(code, root, dataset, spec, out / "added")
    for name, r in seq.items():
        print(f"  {spec.name} {name}: {r['cpu_s']:.1f} CPU-s, cache {r['cache']}", flush=True)
    return seq


def big(codes: dict[str, Path], work: Path, cases: int, before_cases: int) -> dict:
    out: dict = {}
    for version, code in codes.items():
        n = cases if version == "after" else before_cases
        spec = TreeSpec(n, BIG_SHAPE, BIG_CLASSES, BIG_MODELS)
        root = work / "trees" / spec.name
        dataset = build_tree(root, spec)
        extra = ("--no-cache",) if version == "after" else ()
        full = run_compare(code, root, dataset, spec, work / "out" / f"big_{version}", None, *extra)
        rest = run_compare(code, root, dataset, spec, work / "out" / f"big_{version}_nosurface", None, "--no-surface")
        out[version] = {
            "spec": asdict(spec),
            "full": full,
            "no_surface": rest,
            "file_metrics_cpu_s_per_case": (full["cpu_s"] - rest["cpu_s"]) / n,
        }
        print(f"  big {version}: {full['cpu_s']:.1f} CPU-s on {n} cases ({rest['cpu_s']:.1f} without surface)")
    if "after" in codes:
        out["incremental"] = incremental(codes["after"], TreeSpec(cases, BIG_SHAPE, BIG_CLASSES, BIG_MODELS), work)
    return out


def stats_point(codes: dict[str, Path], work: Path, cases: int) -> dict:
    spec = TreeSpec(cases, (24, 24, 24), BIG_CLASSES, BIG_MODELS)
    root = work / "trees" / spec.name
    dataset = build_tree(root, spec)
    out = {"spec": asdict(spec)}
    for version, code in codes.items():
        out[version] = run_compare(code, root, dataset, spec, work / "out" / f"stats_{version}", None, "--no-surface")
        print(f"  {cases} cases, --no-surface, {version}: {out[version]['cpu_s']:.1f} CPU-s", flush=True)
    return out


def extrapolate(result: dict) -> dict:
    """The 300-case / 200x256x256 / 20-class / 3-model comparison from the measured parts."""
    out = {}
    for version in ("before", "after"):
        if version in result.get("big", {}) and version in result.get("stats", {}):
            per_case = result["big"][version]["file_metrics_cpu_s_per_case"]
            rest = result["stats"][version]["cpu_s"]
            out[version] = {
                "file_metrics_cpu_s_per_case": per_case,
                "rest_cpu_s_at_target": rest,
                "cpu_minutes": (per_case * TARGET_CASES + rest) / 60,
                "how": f"measured: file metrics per case x {TARGET_CASES}, plus the rest at {TARGET_CASES} cases",
            }
    return out


def tiny(code: Path, work: Path) -> dict:
    spec = TreeSpec(3, (16, 16, 16), 2, models=3)
    point = measure_point({"after": code}, spec, work)
    return {"point": point, "incremental": incremental(code, spec, work)}


# --------------------------------------------------------------------------- figure


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result.get("grid", {})
    panels = [
        ("voxels", "voxels per image", lambda s: np.prod(s["shape"])),
        ("classes", "classes", lambda s: s["classes"]),
        ("cases", "cases", lambda s: s["cases"]),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8))
    for ax, (key, label, x_of) in zip(axes, panels, strict=False):
        rows = grid.get(key, [])
        for version, style in (("before", "o--"), ("after", "s-")):
            pts = [(x_of(r["spec"]), r[version]["cpu_s"]) for r in rows if version in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=version)
        ax.set_xlabel(label)
        ax.set_ylabel("compare, CPU s")
        ax.set_xscale("log" if key == "voxels" else "linear")
        ax.set_yscale("log")
        fixed = {"voxels": "4 cases, 8 classes", "classes": "4 cases, 128³", "cases": "8 classes, 64³"}[key]
        ax.set_title(f"against {label} ({fixed})", fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[3]
    rows = grid.get("voxels", [])
    for version, style in (("before", "o--"), ("after", "s-")):
        pts = [(np.prod(r["spec"]["shape"]), r[version]["peak_rss_mib"]) for r in rows if version in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=version)
    ax.set_xscale("log")
    ax.set_xlabel("voxels per image")
    ax.set_ylabel("peak RSS of one process, MiB")
    ax.set_title("memory against voxels (4 cases, 8 classes)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[4]
    extra = result.get("extrapolated", {})
    versions = [v for v in ("before", "after") if v in extra]
    if versions:
        minutes = [extra[v]["cpu_minutes"] for v in versions]
        ax.bar(versions, minutes, color=["tab:blue", "tab:orange"][: len(versions)])
        for i, m in enumerate(minutes):
            ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(15, color="grey", ls=":", lw=1)
    ax.set_ylabel("CPU minutes")
    title = f"{TARGET_CASES} cases, 200x256x256, 20 classes, 3 models\n(extrapolated from measured parts)"
    ax.set_title(title, fontsize=9)
    fig.suptitle("nnunet-selfreg compare with HD95/NSD, -np 2 (2 models on the first four panels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, default=None, help="checkout of the code before (its root folder)")
    ap.add_argument("--after", type=Path, default=REPO, help="checkout of the code after (default: this one)")
    ap.add_argument("--sections", nargs="+", default=["startup", "grid", "big", "stats"])
    ap.add_argument("--big-cases", type=int, default=6)
    ap.add_argument("--big-before-cases", type=int, default=2)
    ap.add_argument("--stats-cases", type=int, default=TARGET_CASES)
    ap.add_argument("--work", type=Path, default=None, help="where the trees go (kept; default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None)
    ap.add_argument("--replot", type=Path, default=None, help="draw --figure from this JSON of an earlier run")
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        figure(result, args.figure)
        return result
    work = args.work or Path(tempfile.mkdtemp(prefix="compare_cost_"))
    codes = {"before": args.before, "after": args.after} if args.before else {"after": args.after}
    codes = {k: v.resolve() for k, v in codes.items()}
    result: dict = {
        "command": " ".join([sys.executable, *(argv if argv is not None else sys.argv)]),
        "code": {k: str(v) for k, v in codes.items()},
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    if "startup" in args.sections:
        result["startup"] = {v: worker_startup(c, work / "startup") for v, c in codes.items()}
        print(f"worker start-up: {json.dumps({v: r['median_cpu_s_per_worker'] for v, r in result['startup'].items()})}")
    if "grid" in args.sections:
        result["grid"] = {key: [measure_point(codes, s, work) for s in specs] for key, specs in GRID.items()}
    if "big" in args.sections:
        result["big"] = big(codes, work, args.big_cases, args.big_before_cases)
    if "stats" in args.sections:
        result["stats"] = stats_point(codes, work, args.stats_cases)
    if "tiny" in args.sections:
        result["tiny"] = tiny(codes["after"], work)
    result["extrapolated"] = extrapolate(result)
    result["loadavg_end"] = loadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.figure and "grid" in result:
        figure(result, args.figure)
    if result["extrapolated"]:
        print(json.dumps(result["extrapolated"], indent=1))
    return result


if __name__ == "__main__":
    main()
