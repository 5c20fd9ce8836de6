"""The per-case metric cache of ``compare``: each (case, model) is computed once per content and settings.

A comparison after one more training run should cost that run only. The surface and instance metrics of
one prediction against its reference depend on nothing but the two files and the metric settings, so
each result is stored under a key made of

* the sha256 of the prediction file and of the reference file (plus the ``.json`` spacing file nnU-Net's
  TIFF reader reads beside a ``.tif``), so a retrained or re-predicted model, or an edited reference, gets
  new keys;
* the settings (:func:`nnunet_selfreg.evaluation.metrics.metric_settings`: labels, NSD tolerance, the HD95
  rule for a label missing on one side, instance label, the reader, the version of the metric code).

The default folder is ``compare_cache`` in the dataset's ``$nnUNet_results`` folder, beside the models'
results, so it outlives every comparison output folder and serves every comparison of the dataset. One
small JSON file per entry, named by its key. Writes go to a temporary file that is then renamed over the
entry (atomic on POSIX), so concurrent ``compare`` runs never see half a file; the same key always holds
the same values, so the last writer winning is harmless. Every read is validated (format, key, a
checksum of the values, the metrics and labels expected, numbers); anything else counts as a miss and is
recomputed and rewritten. A folder that cannot be written is reported once and the comparison goes on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from nnunet_selfreg.outputs import write_file_atomically

CACHE_FOLDER = "compare_cache"
FORMAT = 1
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a segmentation file, and of the ``.json`` spacing file beside a ``.tif``/``.tiff`` if any."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if path.suffix.lower() in (".tif", ".tiff"):
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            digest.update(b"\0sidecar\0" + sidecar.read_bytes())
    return digest.hexdigest()


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_key(prediction_digest: str, reference_digest: str, settings: Mapping) -> str:
    """The cache key of one prediction against one reference under ``settings`` (JSON-able)."""
    return hashlib.sha256(
        _canonical({"prediction": prediction_digest, "reference": reference_digest, "settings": settings})
    ).hexdigest()


def _to_json(values: Mapping[str, Mapping[str, float]]) -> dict:
    """NaN -> null (JSON has no NaN)."""
    return {m: {k: (None if math.isnan(v) else float(v)) for k, v in per.items()} for m, per in values.items()}


class MetricCache:
    """Entries ``<key>.json`` in ``folder``; ``invalid`` counts entries found unreadable or inconsistent."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.invalid = 0
        self.write_error: str | None = None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str, expected: Mapping[str, list[str]]) -> dict[str, dict[str, float]] | None:
        """The values stored under ``key`` (metric -> label -> value, NaN for null), or None if absent or invalid.

        ``expected`` (metric -> labels) must match the entry exactly.
        """
        try:
            raw = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            self.invalid += 1
            return None
        values = _validated(raw, key, expected)
        if values is None:
            self.invalid += 1
        return values

    def put(self, key: str, values: Mapping[str, Mapping[str, float]], inputs: Mapping) -> None:
        """Store ``values`` under ``key`` (``inputs``: case, model and settings, kept for people reading it)."""
        if self.write_error is not None:
            return
        data = _to_json(values)
        entry = {
            "format": FORMAT,
            "key": key,
            "values": data,
            "checksum": hashlib.sha256(_canonical(data)).hexdigest(),
            "inputs": inputs,
        }
        text = json.dumps(entry, indent=1, allow_nan=False)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_file_atomically(self.path(key), lambda tmp: tmp.write_text(text))
        except OSError as e:
            self.write_error = f"{self.folder}: {e.strerror or e}"


def _validated(raw: bytes, key: str, expected: Mapping[str, list[str]]) -> dict[str, dict[str, float]] | None:
    try:
        entry = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        return None
    data = entry.get("values")
    if not isinstance(data, dict) or set(data) != set(expected):
        return None
    try:
        if entry.get("checksum") != hashlib.sha256(_canonical(data)).hexdigest():
            return None
    except (TypeError, ValueError):
        return None
    out: dict[str, dict[str, float]] = {}
    for metric, labels in expected.items():
        per = data[metric]
        if not isinstance(per, dict) or set(per) != set(labels):
            return None
        out[metric] = {}
        for label in labels:
            v = per[label]
            if v is None:
                out[metric][label] = math.nan
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[metric][label] = float(v)
            else:
                return None
    return out
