"""Tests of the INIA19 3D dataset builder (Debian mricron-data .deb -> nnU-Net v2 raw, NIfTI).

The real .deb (16 MB) comes from ``$NNUNET_SELFREG_CACHE`` if it holds a verified copy, else from
``apt-get download`` into a session folder; only where neither is possible (no apt-get and no cached
copy) are the tests that need it skipped. A failing download with apt-get present is a failure: CI
machines have apt and Debian's archive. Hash, ar/tar and grouping tests need no download.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.data import inia19
from nnunet_selfreg.data.inia19 import (
    ATLAS_MEMBER,
    DEB_NAME,
    DEB_SHA256,
    T1_MEMBER,
    DebDownloadError,
    DebHashError,
    fetch_mricron_deb,
    group_labels,
    make_inia19_dataset,
    neighbour_face_stats,
    read_deb_files,
    select_blocks,
)
from tests.harness import verify_with_nnunet

EXPECTED_LABELS = {
    "background": 0,
    "neuromaps_055": 1,
    "neuromaps_193": 2,
    "neuromaps_002": 3,
    "neuromaps_054": 4,
    "other_neuromaps_structures": 5,
}


@pytest.fixture(scope="session")
def deb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("NNUNET_SELFREG_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("deb_cache")


@pytest.fixture(scope="session")
def deb(deb_cache: Path) -> Path:
    have_cached = (deb_cache / DEB_NAME).is_file()
    if not have_cached and shutil.which("apt-get") is None:
        pytest.skip(
            f"no apt-get and no {DEB_NAME} in {deb_cache}: cannot get the INIA19 data (set NNUNET_SELFREG_CACHE)"
        )
    return fetch_mricron_deb(deb_cache)


@pytest.fixture(scope="session")
def source(deb: Path) -> tuple[object, object]:
    """(T1, atlas) SimpleITK images straight from the .deb."""
    files = read_deb_files(deb, (T1_MEMBER, ATLAS_MEMBER))
    return inia19._read_nifti(files[T1_MEMBER]), inia19._read_nifti(files[ATLAS_MEMBER])


@pytest.fixture(scope="session")
def built(deb: Path, deb_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> inia19.DatasetInfo:
    return make_inia19_dataset(tmp_path_factory.mktemp("nnUNet_raw"), 950, deb_cache)


def _sitk():
    import SimpleITK as sitk

    return sitk


def test_deb_holds_the_inia19_template(deb: Path, source) -> None:
    assert deb.name == DEB_NAME and inia19.sha256_of(deb) == DEB_SHA256
    sitk = _sitk()
    t1, atlas = source
    for img in (t1, atlas):
        assert img.GetSize() == (168, 206, 128) and img.GetSpacing() == (0.5, 0.5, 0.5)
    atlas_arr = sitk.GetArrayFromImage(atlas)
    assert len(np.unique(atlas_arr)) == 725 and atlas_arr.dtype == np.int16
    ranking = inia19.rank_structures(atlas_arr)
    assert len(ranking) == 362 and tuple(ranking[:4]) == inia19.EXPECTED_LARGEST


def test_cases_are_disjoint_blocks_of_the_source(built: inia19.DatasetInfo, source) -> None:
    sitk = _sitk()
    t1, atlas = source
    t1_arr, atlas_arr = sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(atlas)
    expected_seg = group_labels(atlas_arr, [55, 193, 2, 54])
    images = sorted((built.folder / "imagesTr").glob("*_0000.nii.gz"))
    assert built.num_cases == len(images) == 20
    covered = np.zeros(t1_arr.shape, dtype=np.int32)
    totals = np.zeros(6, dtype=np.int64)
    for image_path in images:
        case = image_path.name.removesuffix("_0000.nii.gz")
        img = sitk.ReadImage(str(image_path))
        seg = sitk.ReadImage(str(built.folder / "labelsTr" / f"{case}.nii.gz"))
        assert img.GetSize() == seg.GetSize() == (32, 32, 32)
        for out in (img, seg):  # geometry kept: spacing and direction of the template, origin at the block
            assert out.GetSpacing() == (0.5, 0.5, 0.5) and out.GetDirection() == t1.GetDirection()
        start = t1.TransformPhysicalPointToIndex(img.GetOrigin())  # (x, y, z)
        assert np.allclose(seg.GetOrigin(), img.GetOrigin())
        z, y, x = start[2], start[1], start[0]
        assert all(s % 32 == 0 for s in start) and case == f"inia19_z{z // 32}_y{y // 32}_x{x // 32}"
        block = (slice(z, z + 32), slice(y, y + 32), slice(x, x + 32))
        covered[block] += 1
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), t1_arr[block])
        seg_arr = sitk.GetArrayFromImage(seg)
        np.testing.assert_array_equal(seg_arr, expected_seg[block])
        assert (atlas_arr[block] > 0).mean() >= 0.5  # only blocks with enough brain
        totals += np.bincount(seg_arr.ravel(), minlength=6)
    assert covered.max() == 1  # no voxel in two cases
    assert dict(zip(EXPECTED_LABELS, totals.tolist(), strict=True)) == built.voxels_per_class


def test_labels_are_the_documented_groups(built: inia19.DatasetInfo, source) -> None:
    sitk = _sitk()
    atlas_arr = sitk.GetArrayFromImage(source[1]).astype(np.int64)
    meta = json.loads((built.folder / "dataset.json").read_text())
    assert meta["labels"] == built.labels == EXPECTED_LABELS
    assert meta["channel_names"] == {"0": "T1"} and meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 20
    seg = group_labels(atlas_arr, [55, 193, 2, 54])
    for cls, ids in ((1, (55, 1055)), (2, (193, 1193)), (3, (2, 1002)), (4, (54, 1054))):
        np.testing.assert_array_equal(seg == cls, np.isin(atlas_arr, ids))
    np.testing.assert_array_equal(seg == 0, atlas_arr == 0)
    others = (atlas_arr > 0) & ~np.isin(atlas_arr, (55, 1055, 193, 1193, 2, 1002, 54, 1054))
    np.testing.assert_array_equal(seg == 5, others)
    labels = np.concatenate(
        [sitk.GetArrayFromImage(sitk.ReadImage(str(p))).ravel() for p in (built.folder / "labelsTr").iterdir()]
    )
    assert set(np.unique(labels).tolist()) == set(range(6))


def test_provenance_licence_and_nnunet_integrity(built: inia19.DatasetInfo) -> None:
    readme = (built.folder / "README.md").read_text()
    for needle in (DEB_SHA256, DEB_NAME, T1_MEMBER, ATLAS_MEMBER, "Rohlfing", "BSD-3-clause", "Files: *",
                   "not a clinical", "neighbouring", "| 1 | `neuromaps_055` | 55, 1055 | 67768 |"):  # fmt: skip
        assert needle in readme, needle
    assert (built.folder / "PROVENANCE.md").read_text() == readme
    assert "Chris Rorden" in (built.folder / "LICENSE_debian_copyright.txt").read_text()
    blocks = json.loads((built.folder / "inia19_blocks.json").read_text())
    assert len(blocks["cases"]) == 20 and blocks["face_stats"]["pairs"] == built.face_stats["pairs"] > 0
    assert 0.5 < built.face_stats["r_adjacent_mean"] <= 1 and abs(built.face_stats["r_far_mean"]) < 0.5
    verify_with_nnunet(built.folder)


def test_select_blocks_and_face_stats_by_hand() -> None:
    brain = np.zeros((4, 4, 6), dtype=bool)
    brain[:2, :2, :2] = True  # block (0, 0, 0) full
    brain[:2, :2, 2] = True  # block (0, 0, 2): one of its two x-planes = 50 %
    brain[2:, 2:, 4:] = True  # block (2, 2, 4) full; the far x remainder would not exist with block 4
    assert select_blocks(brain, 2, 0.5) == [(0, 0, 0), (0, 0, 2), (2, 2, 4)]
    assert select_blocks(brain, 2, 0.6) == [(0, 0, 0), (2, 2, 4)]
    assert select_blocks(brain, 4, 0.0) == [(0, 0, 0)]  # remainders are dropped
    with pytest.raises(ValueError):
        select_blocks(brain, 0, 0.5)
    image = np.zeros((2, 2, 4), dtype=np.float32)
    image[:, :, 1] = [[1, 2], [3, 4]]  # last x-plane of block (0, 0, 0)
    image[:, :, 2] = [[2, 4], [6, 8]]  # first x-plane of block (0, 0, 2): perfectly correlated
    image[:, :, 0] = [[4, 3], [2, 1]]  # first plane of block (0, 0, 0): anti-correlated with the neighbour's
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0, 0, 2] = 1  # one of the four positions differs across the face
    stats = neighbour_face_stats(image, labels, [(0, 0, 0), (0, 0, 2)], 2)
    assert stats["pairs"] == 1
    assert stats["r_adjacent_mean"] == pytest.approx(1.0) and stats["r_far_mean"] == pytest.approx(-1.0)
    assert stats["label_agreement_mean"] == pytest.approx(0.75)


def _ar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members.items():
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.write(data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_read_deb_files_ar_and_tar(tmp_path: Path) -> None:
    files = {"./usr/share/a.txt": b"odd", "./usr/share/b.bin": b"even"}
    for suffix, mode in ((".xz", "w:xz"), (".gz", "w:gz"), ("", "w")):
        deb = tmp_path / f"x{suffix}.deb"
        deb.write_bytes(
            _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"odd", f"data.tar{suffix}": _tar(files, mode)})
        )
        assert read_deb_files(deb, ("usr/share/a.txt", "usr/share/b.bin")) == {
            "usr/share/a.txt": b"odd",
            "usr/share/b.bin": b"even",
        }
        with pytest.raises(ValueError, match="does not contain"):
            read_deb_files(deb, ("usr/share/missing",))
    zst = tmp_path / "z.deb"
    zst.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.zst": b"\x28\xb5\x2f\xfd"}))
    with pytest.raises(ValueError, match="zstd"):
        read_deb_files(zst, ("usr/share/a.txt",))
    (tmp_path / "not.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an ar archive"):
        read_deb_files(tmp_path / "not.deb", ("x",))


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / DEB_NAME
    fake.write_bytes(_ar({"debian-binary": b"2.0\n"}))
    cache = tmp_path / "cache"
    with pytest.raises(DebHashError, match="sha256 mismatch .* the given file"):
        make_inia19_dataset(tmp_path / "raw", 960, cache, deb=fake)
    assert not (cache / DEB_NAME).exists() and not (tmp_path / "raw" / "Dataset960_INIA19").exists()


def test_bad_cache_is_removed_and_missing_sources_are_explained(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / DEB_NAME).write_bytes(b"tampered")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no apt-get
    with pytest.raises(DebDownloadError, match="apt-get is not available.*--deb"):
        fetch_mricron_deb(cache)
    assert not (cache / DEB_NAME).exists()
    with pytest.raises(DebDownloadError, match="downloading is off"):
        fetch_mricron_deb(cache, allow_download=False)
    with pytest.raises(DebDownloadError, match="no such file"):
        fetch_mricron_deb(cache, deb=tmp_path / "missing.deb")


def test_existing_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dataset961_Other").mkdir()
    with pytest.raises(FileExistsError, match="Pick a free id"):
        make_inia19_dataset(tmp_path, 961, tmp_path / "cache")


def _demo(tmp_path: Path, *extra: str):
    import subprocess

    from tests.harness import BIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    cmd = [str(BIN / "nnunet-selfreg"), "demo", "--dataset", "inia19", "--workdir", str(tmp_path / "demo"), *extra]
    return subprocess.run(cmd + ["--cache", str(tmp_path / "cache")], env=env, capture_output=True, text=True)


def test_demo_inia19_without_the_deb_is_a_clear_error(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--offline")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "downloading is off" in proc.stderr and "--deb" in proc.stderr
    fake = tmp_path / DEB_NAME
    fake.write_bytes(b"not the package")
    proc = _demo(tmp_path, "--deb", str(fake))
    assert proc.returncode == 2 and "sha256 mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert "plan: inia19 (3d_fullres)" in proc.stdout and "4 epochs x 10 iterations" in proc.stdout
