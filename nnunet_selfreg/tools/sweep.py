"""``nnunet-selfreg sweep``: train a trainer x fold x run grid with nnU-Net, on local workers or SLURM.

The command line only; the machinery is :mod:`nnunet_selfreg.sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_selfreg.arguments import positive_int
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.nnunet_folders import DEFAULT_PLANS, LATEST_CHECKPOINT

DESCRIPTION = """\
Train every (configuration, trainer, fold, run) of a grid with nnU-Net's own training entry point
(what nnUNetv2_train runs), into nnU-Net's usual folders, on local workers or as a SLURM job array
(submitit). Run k >= 2 of trainer X trains as X_Rep{k} (its own results folder; compare reads it as
another run of X). Everything is checked before anything starts; the same command again skips finished
jobs, continues interrupted ones from their checkpoint and re-runs failed ones only with --retry.
A training told to stop (SLURM's warning signal, preemption, Ctrl-C) saves a checkpoint after its
current iteration and stops; on SLURM it is requeued and continues there.

The manifest is $nnUNet_results/DATASET/sweeps/NAME/manifest.json.

  nnunet-selfreg sweep -d 4 -c 2d -tr nnUNetTrainer nnUNetTrainerSelfReg --repeats 3 --executor local
  nnunet-selfreg sweep -d 4 -c 3d_fullres -tr nnUNetTrainer nnUNetTrainerSelfReg --repeats 3 \\
      --executor slurm --partition gpu --gpus-per-job 1 --cpus-per-job 8 --mem 32G --time 24:00:00
  nnunet-selfreg sweep status default            # a table: done / running (epoch k of N, ETA) / queued / failed
"""


def _sbatch_options(items: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not key or not key.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"--sbatch {item!r}: give sbatch options as KEY=VALUE or FLAG, e.g. qos=high exclusive")
        out[key.replace("_", "-")] = value if sep else True
    return out


def _device(requested: str, executor: str, gpus_per_job: int) -> str:
    if requested != "auto":
        return requested
    if executor == "slurm":
        return "cuda" if gpus_per_job > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _executor(args: argparse.Namespace, device: str):
    from nnunet_selfreg import sweep

    if args.executor == "local":
        workers = args.workers
        if workers is None:
            workers = len(sweep.executors._visible_gpus()) if device == "cuda" else 1
        return sweep.LocalExecutor(max(1, workers), device)
    if args.time is None:
        sweep.executors.require_sbatch()
        raise UserError("--executor slurm needs --time (e.g. --time 24:00:00): jobs are warned and requeued before it")
    options = sweep.SlurmOptions(
        time_min=sweep.executors.parse_slurm_time(args.time),
        partition=args.partition,
        gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job,
        mem=args.mem,
        account=args.account,
        max_parallel=args.max_parallel,
        signal_delay_s=args.signal_delay,
        max_requeues=args.max_requeues,
        sbatch=_sbatch_options(args.sbatch),
        setup=list(args.setup),
    )
    return sweep.SlurmExecutor(options, device)


def _status(args: argparse.Namespace, name: str) -> int:
    from nnunet_selfreg.sweep.launch import find_sweep, sweep_statuses
    from nnunet_selfreg.sweep.status import format_table

    folder, results = find_sweep(name, args.dataset)
    statuses = sweep_statuses(folder, results)
    if args.wait:
        from nnunet_selfreg.sweep.launch import SweepResult, wait

        grid = _StatusGrid(results, tuple(s.job for s in statuses))
        statuses = list(wait(SweepResult(folder, grid, (), tuple(statuses)), args.poll).statuses)
    print(f"sweep {name!r} ({folder})")
    print(format_table(statuses))
    return 0 if all(s.state == "done" for s in statuses) else 1


class _StatusGrid:
    """The parts of a Grid that ``wait`` reads, for a sweep known only from its manifest."""

    def __init__(self, results: Path, jobs: tuple) -> None:
        self.results = results
        self.jobs = jobs


def run(args: argparse.Namespace) -> int:
    from nnunet_selfreg import sweep

    words = list(args.words)
    if words:
        if words[0] != "status" or len(words) != 2:
            raise UserError(
                f"unknown sweep command {' '.join(words)!r}: use `sweep -d ... -tr ...` or `sweep status NAME`"
            )
        return _status(args, words[1])
    missing = [
        flag for flag, value in (("-d", args.dataset), ("-c", args.configurations), ("-tr", args.trainers)) if not value
    ]
    if missing:
        raise UserError(f"sweep needs {', '.join(missing)} (e.g. -d 4 -c 2d -tr nnUNetTrainer nnUNetTrainerSelfReg)")
    if args.executor == "slurm":
        sweep.executors.require_sbatch()
    device = _device(args.device, args.executor, args.gpus_per_job)
    executor = _executor(args, device)
    spec = sweep.GridSpec(
        dataset=args.dataset,
        configurations=tuple(args.configurations),
        trainers=tuple(args.trainers),
        folds=tuple(args.folds),
        plans=args.plans,
        repeats=args.repeats,
    )
    options = sweep.RunOptions(npz=args.npz, device=device, save_every=args.save_every)
    argv = ["nnunet-selfreg", *getattr(args, "argv", [])]
    result = sweep.launch(spec, args.name, executor, options, argv, retry=args.retry)
    if args.executor == "slurm" and (args.wait or args.compare):
        result = sweep.wait(result, args.poll)
    from nnunet_selfreg.sweep.status import summary_line

    print(
        f"sweep {args.name!r}: {summary_line(list(result.statuses))}; status: nnunet-selfreg sweep status {args.name}"
    )
    if args.compare:
        return sweep.compare_grid(result, spec)
    if result.failed:
        return 1
    done_or_submitted = result.all_done or (args.executor == "slurm" and not args.wait)
    return 0 if done_or_submitted else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train a trainer x fold x run grid (local workers or SLURM), resumable; `sweep status NAME`",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="*", metavar="status NAME", help="show the state of sweep NAME")
    p.add_argument("-d", dest="dataset", default=None, help="dataset id or name")
    p.add_argument("-c", dest="configurations", nargs="+", default=[], help="configurations, e.g. 2d 3d_fullres")
    p.add_argument("-tr", dest="trainers", nargs="+", default=[], help="trainers; the first is compare's baseline")
    p.add_argument("-p", dest="plans", default=DEFAULT_PLANS, help=f"plans identifier (default: {DEFAULT_PLANS})")
    p.add_argument("-f", dest="folds", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default: 0 1 2 3 4)")
    p.add_argument("--repeats", type=positive_int, default=1, help="runs per trainer: X, X_Rep2, … (default: 1)")
    p.add_argument("--npz", action="store_true", help="nnU-Net's --npz: keep the validation probabilities")
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu", "mps"),
        default="auto",
        help="nnU-Net's -device (default: cuda where a GPU is there, i.e. --gpus-per-job >= 1 on slurm)",
    )
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=None,
        help=f"write {LATEST_CHECKPOINT} every N epochs (default: the trainer's, nnU-Net's 50); a stop signal "
        "saves one anyway",
    )
    p.add_argument("--name", default="default", help="the sweep's name, its manifest's folder (default: default)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="where jobs run (default: local)")
    p.add_argument("--retry", action="store_true", help="run failed jobs again")
    p.add_argument(
        "--wait", action="store_true", help="slurm and status: follow the jobs until none is queued or running"
    )
    p.add_argument("--poll", type=float, default=30.0, help="seconds between checks with --wait (default: 30)")
    p.add_argument("--compare", action="store_true", help="then run compare on the finished grid (implies --wait)")
    local = p.add_argument_group("local executor")
    local.add_argument(
        "--workers", type=positive_int, default=None, help="jobs at a time (default: one per visible GPU, else 1)"
    )
    slurm = p.add_argument_group("slurm executor (submitit job array)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--gpus-per-job", type=int, default=0, help="0 or 1 (one fold per GPU)")
    slurm.add_argument("--cpus-per-job", type=positive_int, default=None)
    slurm.add_argument("--mem", default=None, help="memory per job, e.g. 32G")
    slurm.add_argument("--time", default=None, help="time limit per job (required), e.g. 24:00:00 or 1-12:00:00")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--max-parallel", type=positive_int, default=None, help="jobs of the array running at once")
    slurm.add_argument(
        "--signal-delay",
        type=positive_int,
        default=120,
        help="seconds before the time limit at which SLURM warns a job (USR2); it saves and requeues (default: 120)",
    )
    slurm.add_argument("--max-requeues", type=int, default=10, help="requeues after time limits per job (default: 10)")
    slurm.add_argument(
        "--sbatch",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="other sbatch options, e.g. qos=high constraint=a100",
    )
    slurm.add_argument("--setup", nargs="+", default=[], metavar="CMD", help="shell lines run before each job")
    p.set_defaults(func=run)
