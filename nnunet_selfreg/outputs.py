"""Writing results without ever leaving a half-written file or folder behind.

Shared by ``compare`` and ``analyze`` (report folders, the metric cache), ``export-stock`` (checkpoint
copies), ``sweep`` (its manifest) and the SS-Net trainer (the splits file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file_atomically(dest: str | Path, write: Callable[[Path], object]) -> None:
    """``write(temporary_path)``, then move it to ``dest`` (same folder, so the move is atomic)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_folder(folder: Path, overwrite: bool, error: type[Exception]) -> None:
    """Raise ``error`` for an output that is not a folder, or a non-empty folder without ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise error(f"output {folder} exists and is not a folder: choose another -o")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise error(f"output folder {folder} already exists: pass --overwrite to replace it, or use -o")


def write_folder_atomically(folder: Path, fill: Callable[[Path], object]) -> None:
    """``fill(temporary_folder)`` beside ``folder``, then put it in place of ``folder`` as a whole.

    On any error the temporary folder is removed and an existing ``folder`` is left as it was.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private; a report folder is a normal folder
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
