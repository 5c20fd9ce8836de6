"""The sweep's manifest: ``$nnUNet_results/DATASET/sweeps/NAME/manifest.json``.

One JSON file records what the sweep was asked to do and what it did: every invocation (command line,
executor, options), package versions, the nnU-Net environment, and per job its trainer, fold, state,
attempts, log, start and end times, scheduler ids and the last error. Jobs (on a cluster: on other
nodes) and the command that launched them update it concurrently, so every change is a
read-modify-write under an ``flock`` (``.manifest.lock``) and the file is replaced atomically (readers
never see half a file). The manifest is bookkeeping: whether a training is finished is read from
nnU-Net's files (:mod:`nnunet_selfreg.sweep.state`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.outputs import write_file_atomically
from nnunet_selfreg.report_folder import package_version
from nnunet_selfreg.sweep.locks import FileLock

__all__ = ["FORMAT", "JOB_STATES", "Manifest", "now", "package_versions"]

FORMAT = 1
#: pending: planned, not submitted; queued: waiting for a worker or the scheduler; running; done;
#: failed (re-run with --retry); interrupted: stopped with its checkpoint kept (the next call continues it)
JOB_STATES = ("pending", "queued", "running", "done", "failed", "interrupted")
#: environment variables recorded with every invocation (they decide what a training does)
RECORDED_ENV_PREFIXES = ("nnUNet_", "NNUNET_SELFREG_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str]:
    dists = ("nnunet-selfreg", "nnunetv2", "torch", "submitit", "dynamic-network-architectures")
    return {"python": platform.python_version(), **{dist: package_version(dist) for dist in dists}}


def _recorded_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)}


class Manifest:
    """``folder/manifest.json`` with locked, atomic updates."""

    FILE = "manifest.json"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.FILE
        self._lock = FileLock(self.folder / ".manifest.lock")

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict:
        return read_json(self.path)

    @contextmanager
    def editing(self) -> Iterator[dict]:
        """The manifest's content to change in place; written back atomically on leaving, under the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self.read() if self.exists() else {}
            yield data
            text = json.dumps(data, indent=1, sort_keys=False) + "\n"
            write_file_atomically(self.path, lambda tmp: tmp.write_text(text))

    def record_invocation(
        self, name: str, dataset: str, argv: list[str], executor: str, options: dict, run_options: dict, jobs: dict
    ) -> None:
        """Create or extend the manifest: a new invocation, the run options, jobs not known yet as 'pending'."""
        with self.editing() as data:
            data.setdefault("format", FORMAT)
            data.setdefault("name", name)
            data.setdefault("dataset", dataset)
            data.setdefault("created", now())
            data.setdefault("invocations", []).append(
                {
                    "time": now(),
                    "host": socket.gethostname(),
                    "command": shlex.join(argv),
                    "executor": executor,
                    "options": options,
                    "versions": package_versions(),
                    "environment": _recorded_env(),
                }
            )
            data["run_options"] = run_options
            known = data.setdefault("jobs", {})
            for key, spec in jobs.items():
                if key not in known:
                    known[key] = {**spec, "state": "pending", "attempts": 0, "history": []}

    def jobs(self) -> dict[str, dict]:
        return self.read().get("jobs", {})

    def update_job(self, key: str, **fields) -> dict:
        """Set ``fields`` of job ``key``; returns the job's record after the change."""
        with self.editing() as data:
            job = data["jobs"][key]
            job.update(fields)
            return dict(job)

    def start_attempt(self, key: str, **facts) -> int:
        """Mark ``key`` running: one more attempt with its start time, host and ``facts``; returns the attempt."""
        with self.editing() as data:
            job = data["jobs"][key]
            job["attempts"] = int(job.get("attempts", 0)) + 1
            attempt = {"attempt": job["attempts"], "started": now(), "host": socket.gethostname(), "pid": os.getpid()}
            attempt.update(facts)
            job.setdefault("history", []).append(attempt)
            job.update(state="running", started=attempt["started"], ended=None, error=None)
            return job["attempts"]

    def end_attempt(self, key: str, state: str, **facts) -> None:
        """Close the current attempt of ``key`` with ``state`` (and facts such as an error's log tail)."""
        with self.editing() as data:
            job = data["jobs"][key]
            ended = now()
            if job.get("history"):
                job["history"][-1].update(ended=ended, outcome=state, **facts)
            job.update(state=state, ended=ended)
            if "error" in facts:
                job["error"] = facts["error"]
