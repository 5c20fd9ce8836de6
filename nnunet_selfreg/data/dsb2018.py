"""A real, embedded nuclei dataset in nnU-Net's raw format: one DSB2018 image, tiled.

The PyPI wheel of ``stardist==0.9.2`` ships a 512x512 fluorescence image from the 2018 Data Science
Bowl (DSB2018) with its expert nuclei instance mask (125 nuclei) as
``stardist/data/images/img2d.tif`` and ``stardist/data/images/mask2d.tif``. This module downloads that
one wheel with pip (no dependencies, one pinned platform tag), checks its sha256 against
:data:`STARDIST_WHEEL_SHA256`, reads the two TIFFs straight from the zip (no stardist / tensorflow
import) and writes them as ``grid x grid`` non-overlapping tiles in nnU-Net v2's raw format.

It is a single-image proxy with real expert labels for quick, honest experiments; it is not a
clinical benchmark. Without a reachable package registry it can fall back to
:func:`nnunet_selfreg.data.synthetic.make_synthetic_dataset`, loudly.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_selfreg.data.downloads import DownloadError, HashMismatchError, PinnedFile
from nnunet_selfreg.data.downloads import default_cache_dir as default_cache_dir
from nnunet_selfreg.data.downloads import sha256_of as sha256_of

# default_cache_dir, sha256_of and find_free_dataset_id are re-exported: they were defined here first
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    IMAGES_TR,
    LABELS_TR,
    dataset_folder_name,
    image_file_name,
    refuse_existing_dataset,
)
from nnunet_selfreg.nnunet_folders import find_free_dataset_id as find_free_dataset_id

STARDIST_VERSION = "0.9.2"
STARDIST_PLATFORM = "manylinux_2_28_x86_64"  # one pinned tag; the data files are the same in every wheel
STARDIST_WHEEL_NAME = "stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
STARDIST_WHEEL_SHA256 = "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023"
WHEEL_IMAGE_PATH = "stardist/data/images/img2d.tif"
WHEEL_MASK_PATH = "stardist/data/images/mask2d.tif"
WHEEL_LICENSE_PATH = "stardist-0.9.2.dist-info/licenses/LICENSE.txt"
SOURCE_SHAPE = (512, 512)
SOURCE_REAL = f"stardist-{STARDIST_VERSION} wheel (DSB2018)"
SOURCE_SYNTHETIC = "synthetic fallback"
DATASET_NAME = "DSB2018Nuclei"
FALLBACK_NAME = "SyntheticFallbackNuclei"
LABEL_MODES = {
    "boundary": {"background": 0, "nucleus_interior": 1, "nucleus_boundary": 2},
    "binary": {"background": 0, "nucleus": 1},
}


class WheelDownloadError(DownloadError):
    """pip could not download the wheel (no registry reachable, pip missing, ...)."""


class WheelHashError(HashMismatchError):
    """A wheel's sha256 is not the expected one; the file must not be used."""


STARDIST_WHEEL = PinnedFile(
    STARDIST_WHEEL_NAME, STARDIST_WHEEL_SHA256, "dsb2018", WheelHashError, "check your package index / mirror"
)


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`make_dsb2018_dataset` wrote."""

    folder: Path
    dataset_id: int
    source: str
    num_cases: int
    tile_shape: tuple[int, int]


def _pip_download_command(dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", f"stardist=={STARDIST_VERSION}",
        "--no-deps", "--only-binary", ":all:", "--platform", STARDIST_PLATFORM,
        "--python-version", "3.11", "--implementation", "cp", "-d", str(dest),
        "--retries", "2", "--timeout", "30",  # fall back within about a minute when offline
    ]  # fmt: skip


def _pip_download(folder: Path) -> Path:
    """The wheel, downloaded by pip into ``folder``; :class:`WheelDownloadError` if pip fails."""
    cmd = _pip_download_command(folder)
    print(f"[dsb2018] downloading stardist=={STARDIST_VERSION} ({STARDIST_PLATFORM}): {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise WheelDownloadError(f"pip download failed (exit {proc.returncode}):\n{tail}")
    downloaded = folder / STARDIST_WHEEL_NAME
    if not downloaded.is_file():
        raise WheelDownloadError(f"pip did not produce {STARDIST_WHEEL_NAME}; it wrote {sorted(os.listdir(folder))}")
    return downloaded


def fetch_stardist_wheel(cache_dir: Path) -> Path:
    """Return the verified stardist wheel in ``cache_dir``, downloading it with pip if needed.

    A cached file is reused only if its sha256 matches; a mismatching one is removed and downloaded
    again. A downloaded file with the wrong sha256 raises :class:`WheelHashError` and is deleted;
    pip failing (e.g. no registry reachable) raises :class:`WheelDownloadError`.
    """
    return STARDIST_WHEEL.fetch(Path(cache_dir), _pip_download)


def read_wheel_arrays(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the DSB2018 image and instance mask from the wheel (zip + tifffile, no stardist import)."""
    import tifffile

    with zipfile.ZipFile(wheel) as zf:
        image = tifffile.imread(io.BytesIO(zf.read(WHEEL_IMAGE_PATH)))
        mask = tifffile.imread(io.BytesIO(zf.read(WHEEL_MASK_PATH)))
    if image.shape != mask.shape or image.ndim != 2:
        raise ValueError(f"unexpected shapes in wheel: image {image.shape}, mask {mask.shape}")
    return image, mask


def semantic_labels(instances: np.ndarray, mode: str = "boundary") -> np.ndarray:
    """Instance mask -> uint8 semantic labels.

    ``"boundary"``: 0 background, 1 nucleus interior, 2 nucleus boundary (pixels of an instance whose
    4-neighbourhood holds another value: background or another instance; image edges do not count).
    ``"binary"``: 0 background, 1 nucleus.
    """
    from skimage.segmentation import find_boundaries

    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {sorted(LABEL_MODES)}, got {mode!r}")
    out = (instances > 0).astype(np.uint8)
    if mode == "boundary":
        out[find_boundaries(instances, connectivity=1, mode="inner") & (instances > 0)] = 2
    return out


def to_uint8(image: np.ndarray) -> tuple[np.ndarray, str]:
    """8-bit image plus a note on how it was made.

    Integer images whose values already lie in [0, 255] are cast losslessly (the DSB2018 image is
    uint16 with values 0..235); anything else is rescaled from its 0.5-99.5 percentiles and clipped.
    """
    if image.dtype == np.uint8:
        return image, "stored as uint8, unchanged"
    if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() <= 255:
        return image.astype(np.uint8), f"{image.dtype} with values in [0, 255], cast to uint8 losslessly"
    lo, hi = np.percentile(image.astype(np.float64), [0.5, 99.5])
    scaled = np.clip((image - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255)
    return np.round(scaled).astype(np.uint8), f"{image.dtype} rescaled to uint8 from 0.5-99.5 percentiles"


def tile_slices(shape: tuple[int, int], grid: int) -> list[tuple[int, int, slice, slice]]:
    """``(row, col, ys, xs)`` of ``grid x grid`` non-overlapping tiles of size ``floor(dim / grid)``.

    Remainder pixels at the bottom/right are dropped (512 px with grid 5: 102 px tiles, 510 px used).
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    th, tw = shape[0] // grid, shape[1] // grid
    if th < 1 or tw < 1:
        raise ValueError(f"grid {grid} is too fine for an image of shape {shape}")
    return [(r, c, slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw)) for r in range(grid) for c in range(grid)]


def _write_png(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8)), str(path))


def _readme(wheel_sha: str, grid: int, tile: tuple[int, int], used: tuple[int, int], labels: str,
            intensity_note: str, n_instances: int, licence: str) -> str:  # fmt: skip
    label_text = {
        "boundary": "0 background, 1 nucleus interior, 2 nucleus boundary: pixels of an instance whose "
        "4-neighbourhood contains another value (background or another nucleus), from "
        '`skimage.segmentation.find_boundaries(mode="inner", connectivity=1)`, computed on the '
        "full image before tiling (so tile edges do not create boundary pixels).",
        "binary": "0 background, 1 nucleus (any instance id > 0).",
    }[labels]
    return f"""# DSB2018 nuclei, one image tiled (nnU-Net v2 raw format)

**A single-image proxy with real expert labels, not a clinical benchmark.** All {grid * grid} cases
are tiles of ONE fluorescence image; they are not independent samples, and nuclei cut by a tile border
are split between neighbouring tiles (and so may fall into different cross-validation folds).

## Source
- File: `{STARDIST_WHEEL_NAME}` from PyPI (`stardist=={STARDIST_VERSION}`, platform `{STARDIST_PLATFORM}`),
  sha256 `{wheel_sha}` (checked before use).
- Paths in the wheel: `{WHEEL_IMAGE_PATH}` (image), `{WHEEL_MASK_PATH}` (instance mask,
  {n_instances} nuclei).
- What it is: one real 512x512 fluorescence microscopy image from the 2018 Data Science Bowl with its
  expert nucleus instance annotation, as shipped by StarDist (`stardist.data.test_image_nuclei_2d`, whose
  docstring names the DSB2018 challenge; which DSB2018 case it is was not traced). References: Caicedo et
  al., "Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl", Nature Methods 16,
  1247-1253 (2019); Schmidt et al., "Cell Detection with Star-convex Polygons", MICCAI 2018.

## Conversion
- Intensities: {intensity_note}; written as 8-bit PNG (nnU-Net's `NaturalImage2DIO`).
- Tiling: {grid}x{grid} non-overlapping tiles of {tile[0]}x{tile[1]} px (floor(512/{grid})); only the top-left
  {used[0]}x{used[1]} px are used, the remainder rows/columns at the bottom/right are dropped. Tiles
  never overlap, so no pixel is shared between cross-validation folds. Case `dsb2018_r{{row}}_c{{col}}`
  is the tile at grid row/column (0-based).
- Labels ({labels}): {label_text}

## Licences
- StarDist (the wheel): BSD-3-Clause (wheel METADATA `License: BSD-3-Clause`; `{WHEEL_LICENSE_PATH}`).
  Its licence text is copied below.
- Image and annotation: the DSB2018 stage 1 training data are released as BBBC038 under CC0 1.0, as
  published by the Broad Bioimage Benchmark Collection (https://bbbc.broadinstitute.org/BBBC038).
  This is our best knowledge, not legal advice: users should verify the terms themselves. Please cite
  Caicedo et al. 2019 and the BBBC (Ljosa et al., Nature Methods 9, 637 (2012)).

### StarDist licence text
```
{licence.strip()}
```
"""


def _write_real_dataset(folder: Path, wheel: Path, grid: int, labels: str) -> tuple[int, tuple[int, int]]:
    image, instances = read_wheel_arrays(wheel)
    image8, intensity_note = to_uint8(image)
    seg = semantic_labels(instances, labels)
    tiles = tile_slices(image8.shape, grid)
    tile = (tiles[0][2].stop - tiles[0][2].start, tiles[0][3].stop - tiles[0][3].start)
    (folder / IMAGES_TR).mkdir(parents=True)
    (folder / LABELS_TR).mkdir()
    for r, c, ys, xs in tiles:
        case = f"dsb2018_r{r}_c{c}"
        _write_png(image8[ys, xs], folder / IMAGES_TR / image_file_name(case, ".png"))
        _write_png(seg[ys, xs], folder / LABELS_TR / f"{case}.png")
    with zipfile.ZipFile(wheel) as zf:
        licence = zf.read(WHEEL_LICENSE_PATH).decode("utf-8", errors="replace")
    dataset_json = {
        "channel_names": {"0": "fluorescence"},
        "labels": LABEL_MODES[labels],
        "numTraining": len(tiles),
        "file_ending": ".png",
        "name": folder.name.split("_", 1)[1],
        "description": (
            f"One real DSB2018 fluorescence image (512x512, {len(np.unique(instances)) - 1} expert-annotated "
            f"nuclei) from the stardist {STARDIST_VERSION} wheel, cut into {grid}x{grid} non-overlapping "
            f"{tile[0]}x{tile[1]} tiles; labels: {labels}. A single-image proxy, not a clinical benchmark."
        ),
        "reference": "Caicedo et al., Nat. Methods 16:1247 (2019); BBBC038; Schmidt et al., MICCAI 2018",
        "licence": "image/labels: CC0 1.0 as published by the BBBC (BBBC038), please verify; stardist: BSD-3-Clause",
        "source": f"{STARDIST_WHEEL_NAME} sha256 {STARDIST_WHEEL_SHA256}",
    }
    (folder / DATASET_JSON).write_text(json.dumps(dataset_json, indent=2))
    used = (tile[0] * grid, tile[1] * grid)
    n_instances = len(np.unique(instances)) - 1
    readme = _readme(STARDIST_WHEEL_SHA256, grid, tile, used, labels, intensity_note, n_instances, licence)
    (folder / "README.md").write_text(readme)
    (folder / "PROVENANCE.md").write_text(readme)
    return len(tiles), tile


def _write_fallback(raw_root: Path, dataset_id: int, grid: int, tile: tuple[int, int]) -> DatasetInfo:
    from nnunet_selfreg.data.synthetic import make_synthetic_dataset

    bar = "!" * 78
    print(f"{bar}\n[dsb2018] WARNING: the stardist wheel could not be downloaded (no package registry?).\n"
          f"[dsb2018] WARNING: writing a SYNTHETIC dataset instead ({FALLBACK_NAME}); it is NOT real data\n"
          f"[dsb2018] WARNING: and its labels are ellipse/box, not nuclei.\n{bar}")  # fmt: skip
    folder = make_synthetic_dataset(raw_root, dataset_id, name=FALLBACK_NAME, dim=2, num_cases=grid * grid, shape=tile)
    (folder / "README.md").write_text(
        f"# {FALLBACK_NAME}: SYNTHETIC fallback, not real data\n\nWritten by "
        "`nnunet_selfreg.data.dsb2018.make_dsb2018_dataset` because the stardist wheel holding the "
        "DSB2018 image could not be downloaded. Labels are 1 ellipse / 2 box on generated scenes.\n"
    )
    return DatasetInfo(folder, dataset_id, SOURCE_SYNTHETIC, grid * grid, tile)


def make_dsb2018_dataset(
    raw_root: Path,
    dataset_id: int,
    cache_dir: Path,
    grid: int = 5,
    labels: str = "boundary",
    offline_fallback: bool = True,
) -> DatasetInfo:
    """Write ``DatasetXXX_DSB2018Nuclei`` (nnU-Net v2 raw) under ``raw_root`` from the stardist wheel.

    The 512x512 image is cut into ``grid x grid`` non-overlapping tiles of ``floor(512 / grid)`` px;
    remainder pixels at the bottom/right are dropped (grid 5: 102x102 tiles covering 510x510).
    Overlapping tiles are never used: they would leak pixels between cross-validation folds.
    ``labels`` is ``"boundary"`` (0 bg / 1 interior / 2 boundary) or ``"binary"`` (0 bg / 1 nucleus).
    Images are 8-bit PNG read by nnU-Net's ``NaturalImage2DIO`` (simplest 2D reader, no spacing
    sidecar files needed; the source is uint16 with values 0..235, so the cast is lossless).

    Raises ``FileExistsError`` if ``raw_root`` already holds a ``DatasetXXX_*`` with this id. If pip
    cannot download the wheel and ``offline_fallback`` is true, a synthetic dataset is written instead
    (``source == "synthetic fallback"``); otherwise :class:`WheelDownloadError` is raised.
    """
    raw_root = Path(raw_root)
    refuse_existing_dataset(raw_root, dataset_id)
    semantic_labels(np.zeros((1, 1), np.uint8), labels)  # validate mode and grid before any download
    _, _, ys, xs = tile_slices(SOURCE_SHAPE, grid)[0]
    tile = (ys.stop - ys.start, xs.stop - xs.start)
    try:
        wheel = fetch_stardist_wheel(cache_dir)
    except WheelDownloadError as err:
        if not offline_fallback:
            raise WheelDownloadError(
                f"{err}\nCould not download stardist=={STARDIST_VERSION} from the package index. Check the "
                "network / pip configuration, put the verified wheel in the cache folder, or pass "
                "offline_fallback=True to get a synthetic dataset instead."
            ) from err
        print(f"[dsb2018] pip error: {err}")
        return _write_fallback(raw_root, dataset_id, grid, tile)
    folder = raw_root / dataset_folder_name(dataset_id, DATASET_NAME)
    try:
        num_cases, tile = _write_real_dataset(folder, wheel, grid, labels)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never leave a half-written dataset behind
        raise
    print(f"[dsb2018] wrote {num_cases} cases ({tile[0]}x{tile[1]}, labels={labels}) to {folder}")
    return DatasetInfo(folder, dataset_id, SOURCE_REAL, num_cases, tile)
