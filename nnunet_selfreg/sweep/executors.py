"""Where sweep jobs run: ``local`` (N worker processes on this machine) or ``slurm`` (a submitit job array).

Both run the same job (:mod:`nnunet_selfreg.sweep.job`). The SLURM side is submitit's: one job array
per call (``map_array``), its sbatch options, its pickling of the callable, its warning-signal
handler and requeue. Job states are read with ``squeue``: submitit reads them with ``sacct``, which
needs SLURM's accounting database, and clusters without one report every state as UNKNOWN.

The local executor is a small pool of its own rather than submitit's ``LocalExecutor``, which starts
every submitted job at once: here at most ``workers`` jobs run, each in a new process (a fresh
interpreter per training, as ``nnUNetv2_train`` has) with one GPU (``CUDA_VISIBLE_DEVICES``) or an
equal share of the CPU threads. Ctrl-C stops the running jobs at their next safe point (their
checkpoints are kept; the next call continues them), a second Ctrl-C kills them.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.sweep.grid import Job
from nnunet_selfreg.sweep.job import EXIT_INTERRUPTED, THREADS_ENV, SweepTask, job_log
from nnunet_selfreg.sweep.manifest import Manifest, now
from nnunet_selfreg.sweep.state import checkpoint_to_continue, log_tail

__all__ = ["LocalExecutor", "SlurmExecutor", "SlurmOptions", "parse_slurm_time", "squeue_states"]


class Reporter:
    """What an executor tells the user; ``sweep`` prints it, the demo words it its own way."""

    def say(self, message: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def job_started(self, job: Job, index: int, total: int, continuing: bool) -> None:
        verb = "continuing" if continuing else "starting"
        self.say(f"[{index}/{total}] {job.configuration} {job.trainer} fold {job.fold}: {verb}")

    def job_skipped(self, job: Job, index: int, total: int, reason: str) -> None:
        self.say(f"[{index}/{total}] {job.configuration} {job.trainer} fold {job.fold}: {reason}")

    def job_line(self, job: Job, text: str) -> None:
        """One line of a local job's output (nnU-Net's timestamp removed)."""
        if re.fullmatch(r"Epoch \d+", text) or text.startswith(("Mean Validation Dice", "nnunet-selfreg sweep:")):
            print(f"    {job.trainer} fold {job.fold}: {text}", flush=True)

    def job_ended(self, job: Job, state: str, log: Path) -> None:
        if state == "failed":
            self.say(f"{job.configuration} {job.trainer} fold {job.fold} FAILED; log {log}:\n{log_tail(log)}")
        else:
            self.say(f"{job.configuration} {job.trainer} fold {job.fold}: {state}")


# --------------------------------------------------------------------------------------------- local


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Running:
    job: Job
    index: int
    proc: subprocess.Popen
    reader: threading.Thread
    log: Path


class LocalExecutor:
    """Run jobs in at most ``workers`` processes on this machine, until all ended (or Ctrl-C)."""

    name = "local"

    def __init__(
        self,
        workers: int = 1,
        device: str = "cpu",
        log_path: Callable[[Job], Path] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.device = device
        self.log_path = log_path
        self.environ = dict(os.environ if environ is None else environ)
        self.gpus: list[str] = []
        if device == "cuda":
            self.gpus = _visible_gpus()
            if not self.gpus:
                raise UserError("--device cuda, but no GPU is visible here: use --device cpu or run on a GPU machine")
            if workers > len(self.gpus):
                raise UserError(f"--workers {workers} needs {workers} GPUs, {len(self.gpus)} visible: one per worker")

    def options(self) -> dict:
        return {"workers": self.workers, "gpus": self.gpus}

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(self.environ)
        env["PYTHONUNBUFFERED"] = "1"
        cpus = len(os.sched_getaffinity(0))
        share = max(1, cpus // self.workers)
        env.setdefault("nnUNet_n_proc_DA", str(share))
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        else:
            env[THREADS_ENV] = str(share)
            env.setdefault("OMP_NUM_THREADS", str(share))
        return env

    def _start(self, sweep_dir: Path, job: Job, index: int, slot: int, reporter: Reporter) -> _Running:
        log = self.log_path(job) if self.log_path else job_log(sweep_dir, job.file_key)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "nnunet_selfreg.sweep.job", str(sweep_dir), job.key]
        proc = subprocess.Popen(
            cmd,
            env=self._env(slot),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # Ctrl-C reaches the sweep, which stops the jobs in order
        )

        def copy_output() -> None:
            with open(log, "a") as fh:
                fh.write(f"$ {' '.join(cmd)}\n")
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    reporter.job_line(job, line.split(": ", 1)[-1].strip())

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        return _Running(job, index, proc, reader, log)

    def run(self, sweep_dir: Path, jobs: list[tuple[int, Job]], total: int, reporter: Reporter) -> None:
        """Run ``jobs`` ((index, job) pairs, index 1-based within ``total``); raises KeyboardInterrupt on Ctrl-C."""
        manifest = Manifest(sweep_dir)
        for _, job in jobs:
            manifest.update_job(
                job.key, state="queued", executor="local", queued_by={"host": socket.gethostname(), "pid": os.getpid()}
            )
        waiting = deque(jobs)
        running: dict[int, _Running] = {}
        try:
            with _sigterm_as_interrupt():
                while waiting or running:
                    for slot in range(self.workers):
                        if slot not in running and waiting:
                            index, job = waiting.popleft()
                            results = Path(self.environ["nnUNet_results"])
                            continuing = checkpoint_to_continue(job.fold_dir(results)) is not None
                            reporter.job_started(job, index, total, continuing)
                            running[slot] = self._start(sweep_dir, job, index, slot, reporter)
                    time.sleep(0.2)
                    for slot, r in list(running.items()):
                        if r.proc.poll() is not None:
                            del running[slot]
                            self._finished(manifest, r, reporter)
        except KeyboardInterrupt:
            for _, job in waiting:
                manifest.update_job(job.key, state="pending")
            self._stop(running, manifest, reporter)
            raise

    def _finished(self, manifest: Manifest, r: _Running, reporter: Reporter) -> None:
        r.reader.join(timeout=10)
        record = manifest.jobs()[r.job.key]
        state = record["state"]
        code = r.proc.returncode
        if state == "running":  # the job process ended without recording it (killed, out of memory)
            state = "interrupted" if code == EXIT_INTERRUPTED else "failed"
            manifest.end_attempt(r.job.key, state, error=f"the job process ended with exit code {code}")
        elif state == "queued" and code == 0:  # its lock was held: another process trains this fold
            state = "left to the process that trains it now"
        manifest.update_job(r.job.key, log=str(r.log))
        reporter.job_ended(r.job, state, r.log)

    def _stop(self, running: dict[int, _Running], manifest: Manifest, reporter: Reporter) -> None:
        if not running:
            return
        reporter.say(
            f"Ctrl-C: {len(running)} running job(s) stop after their current iteration and keep a checkpoint "
            "(the same command continues them); Ctrl-C again kills them"
        )
        for r in running.values():
            _signal(r.proc, signal.SIGINT)
        try:
            with _sigterm_as_interrupt():
                for r in running.values():
                    r.proc.wait()
        except KeyboardInterrupt:
            for r in running.values():
                _signal(r.proc, signal.SIGKILL, group=True)
            for r in running.values():
                r.proc.wait()
        for r in running.values():
            self._finished(manifest, r, reporter)


def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


class _sigterm_as_interrupt:  # noqa: N801
    """SIGTERM to the sweep process (a killed terminal, a batch system) is handled like Ctrl-C."""

    def __enter__(self) -> None:
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        self._previous = signal.signal(signal.SIGTERM, interrupt)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------------------------- slurm

_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_slurm_time(text: str) -> int:
    """SLURM's ``--time`` formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (rounded up)."""
    m = _TIME.match(text.strip())
    if not m:
        raise UserError(f"--time {text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days = int(m["d"] or 0)
    parts = [int(x) for x in (m["a"], m["b"], m["c"]) if x is not None]
    if m["d"] is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, mi, s = parts
    else:  # M or M:S
        h, mi, s = 0, parts[0], parts[1] if len(parts) == 2 else 0
    seconds = ((days * 24 + h) * 60 + mi) * 60 + s
    if seconds <= 0:
        raise UserError(f"--time {text!r} must be positive")
    return -(-seconds // 60)


@dataclass
class SlurmOptions:
    """The sbatch side of a sweep; ``sbatch`` passes any other option through (``KEY=VALUE`` or ``FLAG``)."""

    time_min: int
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem: str | None = None
    account: str | None = None
    max_parallel: int | None = None
    signal_delay_s: int = 120
    max_requeues: int = 10
    sbatch: dict[str, str | bool] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def require_sbatch() -> None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise UserError(
            "--executor slurm needs SLURM's sbatch and squeue on PATH (not found here): run the sweep on the "
            "cluster's login node, or use --executor local"
        )


class SlurmExecutor:
    """Submit jobs as one SLURM job array through submitit; returns at once (``--wait`` polls)."""

    name = "slurm"

    def __init__(self, options: SlurmOptions, device: str = "cuda") -> None:
        require_sbatch()
        if options.gpus_per_job > 1:
            raise UserError(
                "--gpus-per-job > 1: a sweep job trains one fold on one GPU (nnU-Net's default); folds and runs "
                "already train in parallel as separate jobs"
            )
        if device == "cuda" and options.gpus_per_job < 1:
            raise UserError("--device cuda on SLURM needs --gpus-per-job 1 (or --device cpu for CPU nodes)")
        bad = [k for k in options.sbatch if k in ("array", "output", "error", "signal", "open-mode")]
        if bad:
            raise UserError(f"--sbatch {bad[0]} is set by the sweep itself (the signal by --signal-delay)")
        self.options = options
        self.device = device

    def _parameters(self, name: str, n_jobs: int) -> dict:
        o = self.options
        params: dict = {
            "time": o.time_min,
            "signal_delay_s": o.signal_delay_s,
            "job_name": f"sweep-{name}",
            "stderr_to_stdout": True,
            "array_parallelism": o.max_parallel or n_jobs,
            "additional_parameters": dict(o.sbatch),
        }
        for key, value in (
            ("partition", o.partition),
            ("cpus_per_task", o.cpus_per_job),
            ("mem", o.mem),
            ("account", o.account),
            ("gpus_per_node", o.gpus_per_job or None),
            ("setup", o.setup or None),
        ):
            if value is not None:
                params[key] = value
        return params

    def options_dict(self) -> dict:
        return self.options.as_dict()

    def submit(self, sweep_dir: Path, jobs: list[Job], name: str) -> dict[str, str]:
        """Submit ``jobs`` as one array; returns job key -> SLURM id (``ARRAY_TASK``)."""
        import submitit

        executor = submitit.SlurmExecutor(folder=sweep_dir / "slurm", max_num_timeout=self.options.max_requeues)
        try:
            executor.update_parameters(**self._parameters(name, len(jobs)))
            submitted = executor.map_array(SweepTask(), [str(sweep_dir)] * len(jobs), [j.key for j in jobs])
        except (subprocess.CalledProcessError, ValueError, RuntimeError) as e:
            first = (str(getattr(e, "stderr", None) or e).strip().splitlines() or ["?"])[-1]
            raise UserError(f"sbatch refused the job array: {first}") from None
        ids = {job.key: s.job_id for job, s in zip(jobs, submitted, strict=True)}
        manifest = Manifest(sweep_dir)
        with manifest.editing() as data:
            for job, s in zip(jobs, submitted, strict=True):
                record = data["jobs"][job.key]
                record.update(
                    state="queued",
                    executor="slurm",
                    slurm_job_id=s.job_id,
                    submitted=now(),
                    attempts_at_submit=int(record.get("attempts", 0)),
                    log=str(job_log(sweep_dir, job.file_key)),
                    slurm_log=str(s.paths.stdout),
                )
        return ids


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM job id (``123`` or ``123_4``) -> squeue state (PENDING, RUNNING, …) for the ids still queued.

    ``squeue`` lists pending and running jobs (and recently ended ones for a few minutes, in an ended
    state); an id it does not list has left the queue. {} if squeue cannot be run.
    """
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    wanted = set(job_ids)
    states = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in wanted:
            states[job_id] = state
    return states
