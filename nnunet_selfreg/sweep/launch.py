"""Plan, check, launch and follow a sweep; the same command again continues it.

:func:`launch` checks the whole grid first (:func:`~nnunet_selfreg.sweep.grid.plan_grid`), records
the invocation in the manifest, and hands the jobs that need work to an executor: finished jobs are
skipped (nnU-Net's files), running or queued ones are left alone, interrupted ones continue from their
checkpoint (``--c``), failed ones run again only with ``retry``. :func:`wait` follows a SLURM sweep until
nothing is queued or running; :func:`compare_grid` runs ``compare`` on a finished grid, every run of a
trainer (``X``, ``X_Rep2`` …) beside the others.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.sweep.executors import LocalExecutor, Reporter, SlurmExecutor
from nnunet_selfreg.sweep.grid import BUDGET_HINT, Grid, GridSpec, plan_grid, run_name
from nnunet_selfreg.sweep.manifest import Manifest
from nnunet_selfreg.sweep.status import JobStatus, job_statuses, summary_line

__all__ = ["RunOptions", "SweepResult", "compare_grid", "find_sweep", "launch", "sweep_statuses", "wait"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class RunOptions:
    """How each training runs: nnU-Net's ``--npz`` and ``-device``, and the checkpoint cadence."""

    npz: bool = False
    device: str = "cuda"
    save_every: int | None = None

    def as_dict(self) -> dict:
        return {"npz": self.npz, "device": self.device, "save_every": self.save_every}


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    grid: Grid
    started: tuple[str, ...]  # keys of the jobs launched by this call
    statuses: tuple[JobStatus, ...]  # of the grid's jobs when the call returned

    @property
    def all_done(self) -> bool:
        return all(s.state == "done" for s in self.statuses)

    @property
    def failed(self) -> list[JobStatus]:
        return [s for s in self.statuses if s.state == "failed"]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"sweep name {name!r}: use letters, digits and . _ + - (it names a folder)")
    return name


def sweep_statuses(sweep_dir: Path, results: Path, keys: list[str] | None = None) -> list[JobStatus]:
    statuses = job_statuses(sweep_dir, Manifest(sweep_dir).read(), results)
    if keys is None:
        return statuses
    by_key = {s.job.key: s for s in statuses}
    return [by_key[k] for k in keys]


def launch(
    spec: GridSpec,
    name: str,
    executor: LocalExecutor | SlurmExecutor,
    run_options: RunOptions,
    argv: list[str],
    retry: bool = False,
    reporter: Reporter | None = None,
    budget_hint: str = BUDGET_HINT,
) -> SweepResult:
    """Check the grid, then run (local: until the jobs end) or submit (slurm) the jobs that need work."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    grid = plan_grid(spec, budget_hint)
    sweep_dir = grid.sweeps_folder / check_name(name)
    manifest = Manifest(sweep_dir)
    options = executor.options_dict() if isinstance(executor, SlurmExecutor) else executor.options()
    manifest.record_invocation(
        name, grid.dataset, argv, executor.name, options, run_options.as_dict(), {j.key: j.record() for j in grid.jobs}
    )
    keys = [j.key for j in grid.jobs]
    statuses = sweep_statuses(sweep_dir, grid.results, keys)
    reporter.say(f"sweep {name!r}: {len(grid.jobs)} jobs; manifest {manifest.path}")
    todo = []
    for index, (job, status) in enumerate(zip(grid.jobs, statuses, strict=True), 1):
        if status.state == "done":
            manifest.update_job(job.key, state="done")
            reporter.job_skipped(job, index, len(grid.jobs), "done, skipped")
        elif status.state in ("running", "queued"):
            reporter.job_skipped(job, index, len(grid.jobs), f"{status.state} already, left alone")
        elif status.state == "failed" and not retry:
            reporter.job_skipped(job, index, len(grid.jobs), "failed before: pass --retry to run it again")
        else:
            todo.append((index, job))
    planning_s = time.perf_counter() - t0
    reporter.say(f"{len(todo)} to run ({executor.name}); planned and checked in {planning_s:.1f} s")
    if todo and isinstance(executor, SlurmExecutor):
        t1 = time.perf_counter()
        ids = executor.submit(sweep_dir, [job for _, job in todo], name)
        reporter.say(f"submitted {len(ids)} jobs as SLURM array {next(iter(ids.values())).split('_')[0]} "
                     f"in {time.perf_counter() - t1:.2f} s")  # fmt: skip
    elif todo:
        executor.run(sweep_dir, todo, len(grid.jobs), reporter)
    return SweepResult(
        sweep_dir, grid, tuple(j.key for _, j in todo), tuple(sweep_statuses(sweep_dir, grid.results, keys))
    )


def wait(result: SweepResult, poll_s: float = 30.0, reporter: Reporter | None = None) -> SweepResult:
    """Follow the grid until no job is queued or running; prints a line when anything changes."""
    reporter = reporter or Reporter()
    keys = [j.key for j in result.grid.jobs]
    last = None
    reported_failures: set[str] = set()
    while True:
        statuses = sweep_statuses(result.sweep_dir, result.grid.results, keys)
        running = [s for s in statuses if s.state == "running"]
        line = summary_line(statuses)
        if running:
            line += "; " + "; ".join(f"{s.job.trainer} fold {s.job.fold}: {s.detail}" for s in running)
        if line != last:
            reporter.say(line)
            last = line
        for s in statuses:
            if s.state == "failed" and s.job.key not in reported_failures:
                reported_failures.add(s.job.key)
                reporter.job_ended(s.job, "failed", s.log or result.sweep_dir)
        if not any(s.state in ("running", "queued") for s in statuses):
            return SweepResult(result.sweep_dir, result.grid, result.started, tuple(statuses))
        time.sleep(poll_s)


def find_sweep(name: str, dataset: str | None = None) -> tuple[Path, Path]:
    """(sweep folder, nnUNet_results) of sweep ``name``: of ``dataset``, or the one dataset that has it."""
    from nnunet_selfreg.nnunet_folders import require_env_folder, resolve_dataset

    results = require_env_folder("nnUNet_results")
    check_name(name)
    if dataset is not None:
        folder = results / resolve_dataset(dataset) / "sweeps" / name
        if not (folder / Manifest.FILE).is_file():
            raise UserError(f"no sweep {name!r} for {dataset} (no {folder / Manifest.FILE})")
        return folder, results
    found = sorted(p.parent for p in results.glob(f"Dataset*/sweeps/{name}/{Manifest.FILE}"))
    if not found:
        raise UserError(f"no sweep named {name!r} under {results} (sweeps live in DATASET/sweeps/NAME)")
    if len(found) > 1:
        raise UserError(
            f"several datasets have a sweep {name!r}: pass -d ({', '.join(p.parents[1].name for p in found)})"
        )
    return found[0], results


def compare_grid(result: SweepResult, spec: GridSpec, reporter: Reporter | None = None) -> int:
    """``nnunet-selfreg compare`` per configuration, every run of each trainer in ``-tr`` (baseline first)."""
    from nnunet_selfreg.tools.main import main as cli

    reporter = reporter or Reporter()
    if not result.all_done:
        reporter.say(f"not comparing: {summary_line(list(result.statuses))}; compare needs every job done")
        return 1
    trainers = [run_name(t, k) for t in spec.trainers for k in range(1, spec.repeats + 1)]
    if len(trainers) < 2:
        reporter.say("not comparing: compare needs two trainers or two runs (--repeats 2)")
        return 1
    folds = sorted({str(j.fold) for j in result.grid.jobs}, key=lambda f: (not f.isdigit(), f.zfill(4)))
    code = 0
    for configuration in dict.fromkeys(j.configuration for j in result.grid.jobs):
        out = result.sweep_dir / f"compare_{configuration}"
        n = 2
        while out.exists():
            out = result.sweep_dir / f"compare_{configuration}_{n}"
            n += 1
        argv = ["compare", "-d", result.grid.dataset, "-c", configuration, "-p", spec.plans, "-tr", *trainers]
        argv += ["-f", *folds, "-o", str(out)]
        reporter.say("nnunet-selfreg " + " ".join(argv))
        sys.stdout.flush()
        code = max(code, int(cli(argv) or 0))
    return code
