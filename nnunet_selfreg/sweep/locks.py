"""Advisory file locks (``flock``): one training per fold folder at a time, one manifest writer at a time.

``flock`` locks belong to an open file and vanish with the process that holds them, so a job that is
killed, preempted or requeued never leaves a stale lock behind (no lock files to clean up). On a
cluster the lock files must live on a file system whose ``flock`` is seen by every node (local disks
and NFSv4 are; some parallel file systems need a ``flock`` mount option).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["FileLock", "is_locked"]


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if another process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """Whether another process holds the lock on ``path`` now."""
    if not Path(path).exists():
        return False
    probe = FileLock(path)
    if probe.acquire(blocking=False):
        probe.release()
        return False
    return True
