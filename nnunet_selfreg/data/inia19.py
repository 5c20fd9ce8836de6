"""A real, labelled 3D dataset in nnU-Net's raw format: the INIA19 macaque template, cut into blocks.

The 2D DSB2018 tiles (:mod:`nnunet_selfreg.data.dsb2018`) exercise nnU-Net's ``2d`` configuration
only. Debian's ``mricron-data`` package ships the INIA19 rhesus macaque brain template (T1-weighted,
168x206x128 voxels of 0.5 mm) together with the NeuroMaps atlas registered to it (int16, 362
structures per hemisphere). Both are real data with expert labels and come from an archive with a
stable hash, so a 3D dataset can be rebuilt bit for bit anywhere Debian's archive is reachable.

The ``.deb`` is downloaded with ``apt-get download`` (no root, nothing installed) or taken from a
file the user gives, checked against :data:`DEB_SHA256`, kept in the cache folder, and read in
Python: an ``ar`` archive whose ``data.tar.xz`` holds the two NIfTI files.

One template is one brain, so the cases are non-overlapping 32^3 blocks (16 mm) of it: no voxel is
in two cases, but neighbouring blocks are correlated across their shared faces (measured by
:func:`neighbour_face_stats`, written to the dataset's README). The 725 atlas values are grouped
into five classes by a fixed, documented rule (:func:`rank_structures`): the four largest
structures (both hemispheres merged, because nnU-Net's mirroring augmentation would contradict
left/right labels) and all other atlas structures. It is a proxy with real anatomy, not a clinical
benchmark.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_selfreg.data.downloads import DownloadError, HashMismatchError, PinnedFile, default_cache_dir
from nnunet_selfreg.data.downloads import sha256_of as sha256_of
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    IMAGES_TR,
    LABELS_TR,
    dataset_folder_name,
    find_free_dataset_id,
    image_file_name,
    refuse_existing_dataset,
)

__all__ = [
    "DebDownloadError",
    "DebHashError",
    "DatasetInfo",
    "default_cache_dir",
    "fetch_mricron_deb",
    "find_free_dataset_id",
    "make_inia19_dataset",
]

DEB_PACKAGE = "mricron-data"
DEB_VERSION = "1.2.20211006+dfsg-4"
DEB_NAME = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
DEB_SHA256 = "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f"
T1_MEMBER = "usr/share/mricron/templates/inia19-t1-brain.nii.gz"
ATLAS_MEMBER = "usr/share/mricron/templates/inia19-NeuroMaps.nii.gz"
COPYRIGHT_MEMBER = "usr/share/doc/mricron-data/copyright"
SOURCE_SHAPE_XYZ = (168, 206, 128)  # SimpleITK order; numpy arrays are (z, y, x) = (128, 206, 168)
SOURCE_SPACING = (0.5, 0.5, 0.5)
DATASET_NAME = "INIA19"
RIGHT_HEMISPHERE_OFFSET = 1000  # NeuroMaps: structure a is id a in one hemisphere, 1000 + a in the other
NUM_LARGEST = 4  # classes 1..4: the largest structures; class 5: every other atlas structure
BLOCK = 32  # voxels per block edge (16 mm)
MIN_BRAIN_FRACTION = 0.5  # a block is a case if at least this fraction of its voxels carries an atlas label
#: ``rank_structures`` on the pinned atlas gives these (structure id, voxels over both hemispheres); the
#: builder checks it, so a changed rule or file cannot silently change the classes
EXPECTED_LARGEST = ((55, 67768), (193, 49362), (2, 40947), (54, 40692))


class DebDownloadError(DownloadError):
    """``apt-get download`` could not provide the .deb (no apt, no network, no package lists, ...)."""


class DebHashError(HashMismatchError):
    """A .deb's sha256 is not :data:`DEB_SHA256`; the file must not be used."""


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`make_inia19_dataset` wrote."""

    folder: Path
    dataset_id: int
    num_cases: int
    labels: dict[str, int]
    voxels_per_class: dict[str, int]
    face_stats: dict[str, float]


MRICRON_DEB = PinnedFile(
    DEB_NAME,
    DEB_SHA256,
    "inia19",
    DebHashError,
    f"get the exact package with `apt-get download {DEB_PACKAGE}={DEB_VERSION}` (Debian bookworm) and pass it "
    "with --deb",
)


def _apt_download(folder: Path, how: str) -> Path:
    """The .deb, downloaded by ``apt-get download`` into ``folder``; :class:`DebDownloadError` saying ``how`` else."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise DebDownloadError(f"apt-get is not available here to download {DEB_NAME}: {how}")
    cmd = [apt, "download", f"{DEB_PACKAGE}={DEB_VERSION}"]
    print(f"[inia19] downloading: {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    downloaded = folder / DEB_NAME
    if proc.returncode != 0 or not downloaded.is_file():
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise DebDownloadError(
            f"apt-get download failed (exit {proc.returncode}):\n{tail}\nIf apt knows no such package, run "
            f"`apt-get update` (needs Debian's archive in the sources), or {how}."
        )
    return downloaded


def fetch_mricron_deb(cache_dir: Path, deb: Path | None = None, allow_download: bool = True) -> Path:
    """Return the verified ``mricron-data`` .deb in ``cache_dir``.

    Order: ``deb`` (a file the user gives; checked, then copied into the cache), a cached file with the
    right sha256 (a wrong one is removed), ``apt-get download mricron-data=VERSION`` in a temporary
    folder (if ``allow_download``). A file with the wrong sha256 raises :class:`DebHashError` and is
    never cached; no way of getting the file raises :class:`DebDownloadError` saying what to do.
    """
    cache_dir = Path(cache_dir)
    if deb is not None:
        if not Path(deb).is_file():
            raise DebDownloadError(f"--deb {deb}: no such file")
        return MRICRON_DEB.add(cache_dir, Path(deb))
    how = f"pass the file with --deb (from `apt-get download {DEB_PACKAGE}={DEB_VERSION}` on a Debian/Ubuntu machine)"

    def download(folder: Path) -> Path:
        if not allow_download:
            raise DebDownloadError(f"{DEB_NAME} is not in the cache {cache_dir} and downloading is off: {how}")
        return _apt_download(folder, how)

    return MRICRON_DEB.fetch(cache_dir, download)


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a .deb) by name."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar header at byte {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even length
    return members


def read_deb_files(deb: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Read files (paths as in the package, without ``./``) from a .deb's data archive, in Python.

    Handles ``data.tar``, ``data.tar.gz``, ``.bz2`` and ``.xz`` (the pinned package uses xz);
    ``data.tar.zst`` needs a zstandard decoder that Python's ``tarfile`` does not have.
    """
    members = _ar_members(Path(deb).read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"{deb} has no data.tar* member (members: {sorted(members)})")
    if data_name.endswith(".zst"):
        raise ValueError(f"{deb} stores {data_name}: zstd is not readable by Python's tarfile; use {DEB_NAME}")
    wanted, found = {n.lstrip("./") for n in names}, {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for info in tar:
            name = info.name.removeprefix("./")
            if name in wanted and info.isfile():
                found[name] = tar.extractfile(info).read()
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"{deb} does not contain {sorted(missing)}")
    return found


def _read_nifti(blob: bytes):
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="inia19_") as tmp:
        path = Path(tmp) / "image.nii.gz"
        path.write_bytes(blob)
        return sitk.ReadImage(str(path))


def rank_structures(atlas: np.ndarray) -> list[tuple[int, int]]:
    """``(structure id, voxel count)`` of every NeuroMaps structure, largest first.

    A structure is an atlas id modulo :data:`RIGHT_HEMISPHERE_OFFSET`: ids ``a`` and ``1000 + a`` are
    the same structure in the two hemispheres. Ties are broken by the smaller id.
    """
    ids = atlas[atlas > 0].astype(np.int64) % RIGHT_HEMISPHERE_OFFSET
    values, counts = np.unique(ids, return_counts=True)
    order = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda vc: (-vc[1], vc[0]))
    return order


def class_table(largest: list[tuple[int, int]]) -> dict[str, int]:
    """nnU-Net's ``labels`` entry: background, one class per largest structure, then every other structure."""
    labels = {"background": 0}
    labels.update({f"neuromaps_{sid:03d}": i for i, (sid, _) in enumerate(largest, 1)})
    labels["other_neuromaps_structures"] = len(largest) + 1
    return labels


def group_labels(atlas: np.ndarray, structures: list[int]) -> np.ndarray:
    """uint8 classes: 0 outside the atlas, ``i`` for ``structures[i - 1]`` (either hemisphere), else ``len + 1``."""
    out = np.zeros(atlas.shape, dtype=np.uint8)
    out[atlas > 0] = len(structures) + 1
    base = atlas.astype(np.int64) % RIGHT_HEMISPHERE_OFFSET
    for i, sid in enumerate(structures, 1):
        out[(atlas > 0) & (base == sid)] = i
    return out


def select_blocks(brain: np.ndarray, block: int, min_fraction: float) -> list[tuple[int, int, int]]:
    """Start indices ``(z, y, x)`` of the ``block^3`` grid cells (grid from voxel 0) with enough brain.

    The grid tiles the array from index 0 in steps of ``block``; the remainder at the far end of each
    axis is dropped. Cells never overlap.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    starts = [range(0, n - block + 1, block) for n in brain.shape]
    return [
        (z, y, x)
        for z in starts[0]
        for y in starts[1]
        for x in starts[2]
        if brain[z : z + block, y : y + block, x : x + block].mean() >= min_fraction
    ]


def neighbour_face_stats(
    image: np.ndarray, labels: np.ndarray, blocks: list[tuple[int, int, int]], block: int
) -> dict[str, float]:
    """How much two face-adjacent cases share: statistics over all pairs of selected blocks touching by a face.

    ``r_adjacent``: Pearson correlation of the intensities on the two voxel planes that touch across the
    shared face (0.5 mm apart), over positions where both voxels are inside the brain (intensity > 0).
    ``r_far``: the same for the first plane of each block (one block, ``block`` voxels, apart), for
    comparison. ``label_agreement``: fraction of positions on the touching planes with the same class.
    """
    chosen = set(blocks)
    r_adj, r_far, agree = [], [], []
    for start in blocks:
        for axis in range(3):
            nb = tuple(s + block * (a == axis) for a, s in enumerate(start))
            if nb not in chosen:
                continue

            def plane(origin: tuple[int, ...], offset: int, arr: np.ndarray, axis: int = axis) -> np.ndarray:
                idx = [slice(o, o + block) for o in origin]
                idx[axis] = origin[axis] + offset
                return arr[tuple(idx)].ravel()

            a_last, b_first, a_first = plane(start, block - 1, image), plane(nb, 0, image), plane(start, 0, image)
            inside = (a_last > 0) & (b_first > 0)
            if inside.sum() > 2:
                r_adj.append(float(np.corrcoef(a_last[inside], b_first[inside])[0, 1]))
            inside_far = (a_first > 0) & (b_first > 0)
            if inside_far.sum() > 2:
                r_far.append(float(np.corrcoef(a_first[inside_far], b_first[inside_far])[0, 1]))
            agree.append(float((plane(start, block - 1, labels) == plane(nb, 0, labels)).mean()))
    return {
        "pairs": len(agree),
        "r_adjacent_mean": float(np.mean(r_adj)) if r_adj else float("nan"),
        "r_adjacent_min": float(np.min(r_adj)) if r_adj else float("nan"),
        "r_adjacent_max": float(np.max(r_adj)) if r_adj else float("nan"),
        "r_far_mean": float(np.mean(r_far)) if r_far else float("nan"),
        "label_agreement_mean": float(np.mean(agree)) if agree else float("nan"),
    }


def _case_name(start: tuple[int, int, int], block: int) -> str:
    z, y, x = (s // block for s in start)
    return f"inia19_z{z}_y{y}_x{x}"


def _readme(info: dict, copyright_text: str) -> str:
    rows = "\n".join(
        f"| {cid} | `{name}` | {info['atlas_ids'][name]} | {info['voxels_atlas'][name]} | "
        f"{info['voxels_cases'][name]} | {info['cases_with_class'][name]} |"
        for name, cid in info["labels"].items()
    )
    fs = info["face_stats"]
    return f"""# INIA19 macaque template in {info["block"]}^3 blocks (nnU-Net v2 raw format)

**One real brain template with real expert atlas labels, cut into blocks: a proxy, not a clinical
benchmark.** All {info["num_cases"]} cases come from ONE population-average T1 template; they are not
independent subjects.

## Source
- Debian package `{DEB_NAME}` (bookworm, `apt-get download {DEB_PACKAGE}={DEB_VERSION}`),
  sha256 `{DEB_SHA256}` (checked before use).
- Files read from its `data.tar.xz`: `{T1_MEMBER}` (T1-weighted brain, float32) and
  `{ATLAS_MEMBER}` (NeuroMaps atlas, int16, 725 values incl. background), both 168x206x128 voxels of
  0.5 mm, same geometry.
- What it is: the INIA19 template, a minimum-deformation average of T1-weighted MR images of 19 rhesus
  macaques, with the NeuroMaps atlas labels. Reference: Rohlfing T, Kroenke CD, Sullivan EV, Dubach MF,
  Bowden DM, Grant KA, Pfefferbaum A, "The INIA19 template and NeuroMaps atlas for primate brain image
  parcellation and spatial normalization", Front. Neuroinform. 6:27 (2012), doi:10.3389/fninf.2012.00027.

## Conversion
- Blocks: the volume is tiled from voxel (0, 0, 0) into {info["block"]}^3-voxel cells ({info["block"] // 2} mm);
  the remainder at the far end of each axis (no atlas label lies there) is dropped. A cell is a case if at
  least {info["min_fraction"]:.0%} of its voxels carry an atlas label: {info["num_cases"]} of
  {info["num_cells"]} cells. Cells never overlap: no voxel is in two cases. Case `inia19_z{{k}}_y{{j}}_x{{i}}`
  is the cell at block index (k, j, i) along the array axes (z, y, x) = NIfTI axes (2, 1, 0); its NIfTI
  origin is the physical position of its first voxel, so spacing ({", ".join(map(str, SOURCE_SPACING))}) mm and
  direction are the template's.
- Image: the T1 intensities unchanged (float32; 0 outside the brain mask of the template).
- Labels (uint8): NeuroMaps ids `a` and `{RIGHT_HEMISPHERE_OFFSET} + a` are structure `a` in the two
  hemispheres (all 362 structures have both; the ids below {RIGHT_HEMISPHERE_OFFSET} lie on one side of the
  midline). Hemispheres are merged (nnU-Net mirrors patches during training, which would contradict
  left/right labels). The {NUM_LARGEST} structures with the most voxels in the whole atlas are classes
  1-{NUM_LARGEST}; every other atlas structure is class {NUM_LARGEST + 1}; voxels without an atlas label are
  background (0), including {info["unlabelled_brain"]} voxels of the T1 brain mask without an atlas label.
  The package ships no structure names, so classes are named by NeuroMaps id.

| class | name | NeuroMaps ids | voxels in the atlas | voxels in the cases | cases containing it |
|---|---|---|---|---|---|
{rows}

## Correlation between neighbouring cases
{fs["pairs"]} pairs of cases touch by a face. Pearson correlation of the T1 intensities on the two voxel
planes touching across the face (inside the brain): mean {fs["r_adjacent_mean"]:.3f} (min
{fs["r_adjacent_min"]:.3f}, max {fs["r_adjacent_max"]:.3f}); for planes one block ({info["block"] // 2} mm) apart:
mean {fs["r_far_mean"]:.3f}. The class label is the same on both sides of the face at
{fs["label_agreement_mean"]:.1%} of positions. Cross-validation folds therefore hold strongly correlated
neighbours: fold results say how well a model fills in other parts of the same brain, not how it
generalises to new animals.

## Licences
- The Debian copyright file of the package (`{COPYRIGHT_MEMBER}`, copied below) has no entry for the
  templates: its catch-all `Files: *` stanza says "Copyright 2006-2010, Chris Rorden", BSD-3-clause, and it
  names neither INIA19 nor NeuroMaps nor their authors. The template and atlas were made by Rohlfing et al.
  and are distributed by them on NITRC (project `inia19`) under their own terms, which were not checked
  here. This is our reading, not legal advice: check the upstream terms before redistributing the data,
  and cite Rohlfing et al. 2012.

### Debian copyright file of {DEB_NAME}
```
{copyright_text.strip()}
```
"""


def _read_template(files: dict[str, bytes]):
    """The T1 template and the atlas as SimpleITK images, their geometry checked against the pinned file's."""
    t1_img, atlas_img = _read_nifti(files[T1_MEMBER]), _read_nifti(files[ATLAS_MEMBER])
    for img in (t1_img, atlas_img):
        if img.GetSize() != SOURCE_SHAPE_XYZ or not np.allclose(img.GetSpacing(), SOURCE_SPACING):
            raise ValueError(f"unexpected INIA19 geometry: size {img.GetSize()}, spacing {img.GetSpacing()}")
    return t1_img, atlas_img


def _largest_structures(atlas: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(every structure ranked, the NUM_LARGEST largest), the latter checked against EXPECTED_LARGEST."""
    ranking = rank_structures(atlas)
    largest = ranking[:NUM_LARGEST]
    if tuple(largest) != EXPECTED_LARGEST:
        raise ValueError(f"the {NUM_LARGEST} largest NeuroMaps structures are {largest}, not {EXPECTED_LARGEST}")
    return ranking, largest


def _write_cases(folder: Path, t1_out, seg_img, seg: np.ndarray, blocks, block: int, n_labels: int):
    """One image and one label file per block; returns per class its voxels in the cases and its cases."""
    import SimpleITK as sitk

    (folder / IMAGES_TR).mkdir(parents=True)
    (folder / LABELS_TR).mkdir()
    in_cases = np.zeros(n_labels, dtype=np.int64)
    cases_with = np.zeros(n_labels, dtype=np.int64)
    for z, y, x in blocks:
        case = _case_name((z, y, x), block)
        crop = (slice(x, x + block), slice(y, y + block), slice(z, z + block))  # SimpleITK indexes (x, y, z)
        sitk.WriteImage(t1_out[crop], str(folder / IMAGES_TR / image_file_name(case, ".nii.gz")))
        sitk.WriteImage(seg_img[crop], str(folder / LABELS_TR / f"{case}.nii.gz"))
        counts = np.bincount(seg[z : z + block, y : y + block, x : x + block].ravel(), minlength=n_labels)
        in_cases += counts
        cases_with += counts > 0
    return in_cases, cases_with


def _dataset_json(folder: Path, labels: dict[str, int], n_blocks: int, block: int) -> dict:
    return {
        "channel_names": {"0": "T1"},
        "labels": labels,
        "numTraining": n_blocks,
        "file_ending": ".nii.gz",
        "name": folder.name.split("_", 1)[1],
        "description": (
            f"INIA19 rhesus macaque T1 template with NeuroMaps atlas labels (Debian {DEB_NAME}), cut into "
            f"{n_blocks} non-overlapping {block}^3 blocks of 0.5 mm voxels; classes: the {NUM_LARGEST} largest "
            "NeuroMaps structures (hemispheres merged) and all other structures. One template: a proxy, not a "
            "clinical benchmark."
        ),
        "reference": "Rohlfing et al., Front. Neuroinform. 6:27 (2012), doi:10.3389/fninf.2012.00027",
        "licence": "not stated for the templates in the Debian package; see README.md and the upstream NITRC terms",
        "source": f"{DEB_NAME} sha256 {DEB_SHA256}",
    }


def _write_dataset(folder: Path, deb: Path, block: int, min_fraction: float) -> dict:
    import SimpleITK as sitk

    files = read_deb_files(deb, (T1_MEMBER, ATLAS_MEMBER, COPYRIGHT_MEMBER))
    t1_img, atlas_img = _read_template(files)
    t1 = sitk.GetArrayFromImage(t1_img).astype(np.float32)
    atlas = sitk.GetArrayFromImage(atlas_img)
    ranking, largest = _largest_structures(atlas)
    structures = [sid for sid, _ in largest]
    labels = class_table(largest)
    seg = group_labels(atlas, structures)
    blocks = select_blocks(atlas > 0, block, min_fraction)
    if len(blocks) < 5:
        raise ValueError(
            f"only {len(blocks)} blocks of {block}^3 with >= {min_fraction:.0%} brain: too few for 5 folds"
        )
    seg_img = sitk.GetImageFromArray(seg)
    seg_img.CopyInformation(atlas_img)
    t1_out = sitk.GetImageFromArray(t1)
    t1_out.CopyInformation(t1_img)
    in_cases, cases_with = _write_cases(folder, t1_out, seg_img, seg, blocks, block, len(labels))
    atlas_counts = np.bincount(seg.ravel(), minlength=len(labels))
    names = list(labels)
    other_ids = f"the other {len(ranking) - NUM_LARGEST} structures (both hemispheres)"
    info = {
        "block": block,
        "min_fraction": min_fraction,
        "num_cases": len(blocks),
        "num_cells": int(np.prod([n // block for n in atlas.shape])),
        "labels": labels,
        "atlas_ids": {
            "background": "none (0)",
            **{f"neuromaps_{s:03d}": f"{s}, {s + RIGHT_HEMISPHERE_OFFSET}" for s in structures},
            "other_neuromaps_structures": other_ids,
        },
        "voxels_atlas": {n: int(c) for n, c in zip(names, atlas_counts, strict=True)},
        "voxels_cases": {n: int(c) for n, c in zip(names, in_cases, strict=True)},
        "cases_with_class": {n: int(c) for n, c in zip(names, cases_with, strict=True)},
        "unlabelled_brain": int(((t1 > 0) & (atlas == 0)).sum()),
        "face_stats": neighbour_face_stats(t1, seg, blocks, block),
        "cases": {_case_name(b, block): list(b) for b in blocks},
    }
    (folder / DATASET_JSON).write_text(json.dumps(_dataset_json(folder, labels, len(blocks), block), indent=2))
    copyright_text = files[COPYRIGHT_MEMBER].decode("utf-8", errors="replace")
    readme = _readme(info, copyright_text)
    (folder / "README.md").write_text(readme)
    (folder / "PROVENANCE.md").write_text(readme)
    (folder / "LICENSE_debian_copyright.txt").write_text(copyright_text)
    (folder / "inia19_blocks.json").write_text(json.dumps(info, indent=2))
    return info


def make_inia19_dataset(
    raw_root: Path,
    dataset_id: int,
    cache_dir: Path | None = None,
    deb: Path | None = None,
    allow_download: bool = True,
    block: int = BLOCK,
    min_fraction: float = MIN_BRAIN_FRACTION,
) -> DatasetInfo:
    """Write ``DatasetXXX_INIA19`` (nnU-Net v2 raw, NIfTI) under ``raw_root`` from the verified .deb.

    ``deb``: a local copy of the package (checked against :data:`DEB_SHA256`); otherwise the cached copy
    or ``apt-get download`` (see :func:`fetch_mricron_deb`). Raises ``FileExistsError`` if ``raw_root``
    holds a ``DatasetXXX_*`` with this id; never leaves a half-written folder behind.
    """
    raw_root = Path(raw_root)
    refuse_existing_dataset(raw_root, dataset_id)
    path = fetch_mricron_deb(Path(cache_dir) if cache_dir else default_cache_dir(), deb, allow_download)
    folder = raw_root / dataset_folder_name(dataset_id, DATASET_NAME)
    try:
        info = _write_dataset(folder, path, block, min_fraction)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    print(f"[inia19] wrote {info['num_cases']} cases ({block}^3 voxels, {len(info['labels'])} labels) to {folder}")
    return DatasetInfo(folder, dataset_id, info["num_cases"], info["labels"], info["voxels_cases"], info["face_stats"])
