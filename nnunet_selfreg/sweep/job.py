"""One sweep job: nnU-Net's own training entry point for one (configuration, trainer, fold), resumable.

The same function runs on every executor: the local executor starts it as
``python -m nnunet_selfreg.sweep.job SWEEP_FOLDER JOB_KEY``, the SLURM executor through submitit
(:class:`SweepTask`, a ``submitit.helpers.Checkpointable``). It

1. takes the job's lock (one training per fold folder, across sweeps; a second copy exits at once),
2. does nothing if nnU-Net's files say the training is finished (never overwritten),
3. calls ``nnunetv2.run.run_training.run_training`` (what ``nnUNetv2_train`` runs) with ``--c`` when a
   checkpoint exists, ``--npz`` and ``-device`` as the sweep was asked, and the safe-point hooks of
   :mod:`nnunet_selfreg.sweep.preemption`,
4. records the attempt in the manifest: done, failed (with the log's last lines), or interrupted.

On SLURM, submitit registers its own handler for the warning signal (USR2: checkpoint the callable and
``scontrol requeue``) and bypasses SIGTERM. While nnU-Net trains, our flag handler replaces both, so the
requeue waits for a safe point; afterwards submitit's handler is called as it would have been, and
requeues the job (its ``max_num_timeout`` applies). After SIGTERM the job does not requeue itself:
SLURM requeues preempted jobs on its own, and a cancelled job must stay cancelled. Either way the next
run continues from the checkpoint saved at the safe point.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

import submitit

from nnunet_selfreg.nnunet_folders import validation_summary
from nnunet_selfreg.sweep.locks import FileLock
from nnunet_selfreg.sweep.manifest import Manifest
from nnunet_selfreg.sweep.preemption import (
    StopControl,
    StopRequested,
    hooks_on_new_trainers,
    install_trainer_hooks,
    save_after_failure,
)
from nnunet_selfreg.sweep.state import checkpoint_to_continue, is_done

__all__ = ["EXIT_INTERRUPTED", "SweepTask", "job_log", "lock_path", "run_job"]

#: exit status of a local job that stopped with its checkpoint kept (EX_TEMPFAIL: try again later)
EXIT_INTERRUPTED = 75
#: CPU threads for torch in a job (the local executor splits the machine's cores between its workers)
THREADS_ENV = "NNUNET_SELFREG_SWEEP_THREADS"


def lock_path(sweeps_folder: Path, file_key: str) -> Path:
    """The lock of one fold folder, shared by every sweep of the dataset."""
    return Path(sweeps_folder) / ".locks" / f"{file_key}.lock"


def job_log(sweep_dir: Path, file_key: str) -> Path:
    return Path(sweep_dir) / "logs" / f"{file_key}.log"


def _slurm_facts() -> dict:
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    array = env.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"]
    return {"slurm_job_id": job_id, "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", "0"))}


def _set_threads(device: str) -> None:
    """torch threads as ``nnUNetv2_train`` sets them, but within this job's share of the CPUs."""
    import torch

    if device == "cpu":
        threads = os.environ.get(THREADS_ENV) or os.environ.get("SLURM_CPUS_PER_TASK")
        torch.set_num_threads(int(threads) if threads else len(os.sched_getaffinity(0)))
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    # nnU-Net sizes its augmentation workers from os.cpu_count(), which on a cluster node counts every CPU
    # of the node rather than this job's allocation
    if "nnUNet_n_proc_DA" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
        os.environ["nnUNet_n_proc_DA"] = os.environ["SLURM_CPUS_PER_TASK"]


def _train(job: dict, dataset: str, options: dict, continuing: bool, control: StopControl, on_resume) -> None:
    import torch
    from nnunetv2.run.run_training import run_training

    fold = job["fold"]

    def install(trainer) -> None:
        install_trainer_hooks(trainer, control, options.get("save_every"), on_resume)

    with hooks_on_new_trainers(install):
        run_training(
            dataset,
            job["configuration"],
            fold,
            job["trainer"],
            job["plans"],
            export_validation_probabilities=bool(options.get("npz")),
            continue_training=continuing,
            device=torch.device(options.get("device", "cuda")),
        )


def _requeue_with_submitit(control: StopControl) -> None:
    """Call submitit's warning handler (checkpoint the callable, ``scontrol requeue``, exit) if it is installed."""
    handler = control.previous.get(submitit.JobEnvironment._usr_sig())
    if isinstance(getattr(handler, "__self__", None), submitit.core.job_environment.SignalHandler):
        handler(control.signum, None)  # raises SystemExit after requeueing, or an error if it may not


def _log_to(path: Path) -> None:
    """Send this process's output (and its children's) to ``path`` as well: SLURM jobs log to their sweep."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Attempt:
    """One attempt of a job in the manifest: its time in training and the sweep's own time around it."""

    def __init__(self, manifest: Manifest, key: str, entered: float) -> None:
        self.manifest, self.key, self.entered = manifest, key, entered
        self.resumed: dict = {}  # the epoch nnU-Net continued at, from the load_checkpoint hook
        self.train_start = self.train_end = None

    def end(self, state: str, **facts) -> None:
        end = time.perf_counter()
        train_end = self.train_end or end
        if self.train_start is not None:
            facts["seconds"] = round(train_end - self.train_start, 1)
            # lock, manifest reads and writes, checks (not the interpreter start, which nnUNetv2_train pays too)
            facts["overhead_s"] = round((self.train_start - self.entered) + (end - train_end), 3)
        if "epoch" in self.resumed:
            facts["resumed_from_epoch"] = self.resumed["epoch"]
        self.manifest.end_attempt(self.key, state, **facts)


def run_job(sweep_dir: str | Path, key: str) -> str:
    """Run job ``key`` of the sweep in ``sweep_dir``; returns its state ('done', 'interrupted', 'busy').

    Raises on failure (so that the scheduler sees a failed job) after recording it in the manifest.
    """
    import torch  # noqa: F401  (imported first: nnUNetv2_train pays for it too, it is not the sweep's overhead)

    entered = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    manifest = Manifest(sweep_dir)
    info = manifest.read()
    job, dataset, options = info["jobs"][key], info["dataset"], info.get("run_options", {})
    fold_dir = Path(os.environ["nnUNet_results"]) / job["output_folder"]
    file_key = key.replace("/", "__")
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # submitit's own log keeps its lines
        _log_to(job_log(sweep_dir, file_key))
    lock = FileLock(lock_path(sweep_dir.parent, file_key))
    if not lock.acquire(blocking=False):
        print(f"{key}: another process trains this fold now (its lock is held); nothing to do", flush=True)
        return "busy"
    try:
        if is_done(fold_dir):
            print(f"{key}: finished already ({fold_dir}); nothing to do", flush=True)
            manifest.update_job(key, state="done")
            return "done"
        continuing = checkpoint_to_continue(fold_dir) is not None
        number = manifest.start_attempt(key, continued=continuing, **_slurm_facts())
        print(
            f"== nnunet-selfreg sweep job {key} (attempt {number}, {socket.gethostname()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}): {'continuing' if continuing else 'starting'}",
            flush=True,
        )
        _set_threads(options.get("device", "cuda"))
        return _run_attempt(_Attempt(manifest, key, entered), job, dataset, options, continuing, fold_dir)
    finally:
        lock.release()


def _run_attempt(attempt: _Attempt, job: dict, dataset: str, options: dict, continuing: bool, fold_dir: Path) -> str:
    control = StopControl()
    attempt.train_start = time.perf_counter()
    try:
        with control.installed():
            _train(job, dataset, options, continuing, control, lambda epoch: attempt.resumed.update(epoch=epoch))
    except StopRequested:
        attempt.train_end = time.perf_counter()
        return _interrupted(attempt, control)
    except BaseException as e:
        attempt.train_end = time.perf_counter()
        if isinstance(e, KeyboardInterrupt):  # before the handlers were installed: nothing to save
            attempt.end("interrupted")
            raise
        if save_after_failure(control):
            return _interrupted(attempt, control)
        attempt.end("failed", error="".join(traceback.format_exception_only(type(e), e)).strip()[-2000:])
        raise
    attempt.train_end = time.perf_counter()
    if not is_done(fold_dir):
        message = f"nnU-Net's training ended without {validation_summary(fold_dir)}"
        attempt.end("failed", error=message)
        raise RuntimeError(message)
    attempt.end("done")
    return "done"


def _interrupted(attempt: _Attempt, control: StopControl) -> str:
    """Record a stopped attempt; after the scheduler's warning on SLURM, let submitit requeue the job."""
    requeue = control.warning and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    attempt.end("queued" if requeue else "interrupted", signal=control.signal_name)
    if requeue:
        try:
            _requeue_with_submitit(control)
        except SystemExit:
            raise
        except BaseException as e:  # submitit refused (too many time-outs) or scontrol failed
            attempt.manifest.update_job(attempt.key, state="interrupted", error=f"not requeued: {e}")
            raise
    return "interrupted"


class SweepTask(submitit.helpers.Checkpointable):
    """The callable submitit runs on the cluster: ``SweepTask()(sweep_dir, key)``.

    ``Checkpointable``'s ``checkpoint`` resubmits the same call, which is all a requeued job needs: the
    training continues from nnU-Net's files.
    """

    def __call__(self, sweep_dir: str, key: str) -> str:
        return run_job(sweep_dir, key)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m nnunet_selfreg.sweep.job SWEEP_FOLDER JOB_KEY", file=sys.stderr)
        return 2
    try:
        state = run_job(argv[0], argv[1])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return 1
    return EXIT_INTERRUPTED if state == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
