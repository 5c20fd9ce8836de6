"""The state of every job of a sweep, from nnU-Net's files, the locks, ``squeue`` and the manifest.

The manifest says what the sweep last recorded; a job can have ended since without recording it
(killed, out of memory, a node that failed). So a job is **done** when nnU-Net's files say so, and a
job the manifest calls running is running only if its lock is held (local) or SLURM still lists it;
otherwise it was **interrupted** and the next call continues it from its checkpoint.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from nnunet_selfreg.sweep.executors import squeue_states
from nnunet_selfreg.sweep.grid import Job
from nnunet_selfreg.sweep.job import lock_path
from nnunet_selfreg.sweep.locks import is_locked
from nnunet_selfreg.sweep.state import is_done, log_tail, training_progress

__all__ = ["JobStatus", "format_duration", "format_table", "job_statuses", "summary_line"]

_SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "PREEMPTED"}


@dataclass(frozen=True)
class JobStatus:
    job: Job
    state: str  # pending, queued, running, done, failed, interrupted
    detail: str  # epoch k of N, ETA, why
    attempts: int
    scheduler_id: str | None
    log: Path | None
    eta_s: float | None = None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(fold_dir: Path) -> tuple[str, float | None]:
    p = training_progress(fold_dir)
    if p is None:
        return "starting", None
    of = f" of {p.num_epochs}" if p.num_epochs is not None else ""
    eta = p.eta_s()
    return f"epoch {p.epoch}{of}" + (f", ETA {format_duration(eta)}" if eta is not None else ""), eta


def _state(record: dict, fold_dir: Path, locked: bool, squeued: str | None) -> tuple[str, str]:
    """(state, why) of one job from its manifest record and what can be observed now."""
    state = record.get("state", "pending")
    if is_done(fold_dir):
        return "done", ""
    if locked:
        return "running", ""
    if record.get("executor") == "slurm" and record.get("slurm_job_id"):
        if squeued in _SLURM_RUNNING:
            return "running", ""
        if squeued in _SLURM_QUEUED:
            requeued = (record.get("history") or [{}])[-1].get("outcome") in ("queued", "interrupted")
            return "queued", "requeued" if requeued and record.get("attempts") else ""
        if state == "queued" and int(record.get("attempts", 0)) == int(record.get("attempts_at_submit", 0)):
            return "failed", f"the SLURM job ended before the training started (see {record.get('slurm_log')})"
    if state in ("running", "queued"):
        if state == "queued" and record.get("executor") == "local":
            owner = record.get("queued_by") or {}
            if owner.get("host") == socket.gethostname() and _pid_alive(int(owner.get("pid", -1))):
                return "queued", ""
            return "pending", ""
        return "interrupted", "its process ended without a record (killed?): the next call continues it"
    if state == "done":  # recorded as done, but nnU-Net's files are gone
        return "pending", "its results are missing"
    return state, record.get("error") or ""


def job_statuses(sweep_dir: Path, data: dict, results: Path) -> list[JobStatus]:
    """The status of every job in the manifest ``data`` of the sweep in ``sweep_dir``."""
    jobs = data.get("jobs", {})
    ids = [r["slurm_job_id"] for r in jobs.values() if r.get("executor") == "slurm" and r.get("slurm_job_id")]
    queued = squeue_states(ids)
    out = []
    for record in jobs.values():
        job = Job.from_record(data["dataset"], record)
        fold_dir = job.fold_dir(results)
        locked = is_locked(lock_path(sweep_dir.parent, job.file_key))
        state, why = _state(record, fold_dir, locked, queued.get(record.get("slurm_job_id") or ""))
        eta = None
        if state == "running":
            why, eta = _progress(fold_dir)
        log = Path(record["log"]) if record.get("log") else None
        out.append(JobStatus(job, state, why, int(record.get("attempts", 0)), record.get("slurm_job_id"), log, eta))
    return out


def summary_line(statuses: list[JobStatus]) -> str:
    counts = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    order = ("done", "running", "queued", "pending", "interrupted", "failed")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) + f" (of {len(statuses)})"


def _tail_to_error(text: str, error: str, lines: int) -> str:
    """The ``lines`` lines of ``text`` that end with the recorded error (what data workers print after it is
    noise), or its last lines if the error is not in it."""
    rows = text.splitlines()
    last = error.strip().splitlines()[-1] if error.strip() else ""
    ends = [i for i, row in enumerate(rows) if last and row.strip() == last]
    end = ends[-1] + 1 if ends else len(rows)
    return "\n".join(rows[max(0, end - lines) : end])


def format_table(statuses: list[JobStatus], tail_lines: int = 10) -> str:
    """A table of every job, then the last log lines of each failed job."""
    rows = [("CONFIGURATION", "TRAINER", "FOLD", "STATE", "ATTEMPTS", "SLURM ID", "PROGRESS")]
    for s in statuses:
        rows.append(
            (
                s.job.configuration,
                s.job.trainer,
                str(s.job.fold),
                s.state,
                str(s.attempts),
                s.scheduler_id or "-",
                s.detail if s.state != "failed" else "(log below)",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.append(summary_line(statuses))
    for s in statuses:
        if s.state == "failed":
            lines.append(f"\n--- {s.job.configuration} {s.job.trainer} fold {s.job.fold} failed: {s.detail}")
            if s.log is not None:
                lines.append(f"--- last lines of {s.log}:")
                lines.append(_tail_to_error(log_tail(s.log, 200), s.detail, tail_lines))
    return "\n".join(lines)
