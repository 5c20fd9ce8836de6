"""Tests of the embedded DSB2018 nuclei dataset (stardist wheel -> nnU-Net v2 raw format).

The real wheel (~3 MB) is downloaded once per session into ``$NNUNET_SELFREG_CACHE`` if set, else a
session tmp folder; without a reachable registry the tests that need it are skipped. The hash and
offline tests point pip at local folders only (no network).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.data import dsb2018
from nnunet_selfreg.data.dsb2018 import (
    STARDIST_WHEEL_NAME,
    STARDIST_WHEEL_SHA256,
    WheelDownloadError,
    WheelHashError,
    fetch_stardist_wheel,
    find_free_dataset_id,
    make_dsb2018_dataset,
    read_wheel_arrays,
    semantic_labels,
    sha256_of,
    tile_slices,
    to_uint8,
)
from tests.harness import verify_with_nnunet


def _read_png(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def local_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Make pip see only a local find-links folder (returned): no config files, no index, no network."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    links = tmp_path / "find_links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return links


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("NNUNET_SELFREG_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("wheel_cache")


@pytest.fixture(scope="session")
def wheel(cache_dir: Path) -> Path:
    try:
        return fetch_stardist_wheel(cache_dir)
    except WheelDownloadError as err:
        pytest.skip(f"stardist wheel not downloadable (no package registry?): {err}")


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nnUNet_raw")


@pytest.fixture(scope="session")
def boundary_dataset(wheel: Path, cache_dir: Path, raw_root: Path) -> dsb2018.DatasetInfo:
    return make_dsb2018_dataset(raw_root, 950, cache_dir)


def test_wheel_holds_the_dsb2018_image(wheel: Path) -> None:
    assert wheel.name == STARDIST_WHEEL_NAME and sha256_of(wheel) == STARDIST_WHEEL_SHA256
    image, mask = read_wheel_arrays(wheel)
    assert image.shape == mask.shape == (512, 512)
    assert 100 <= len(np.unique(mask)) - 1 <= 150  # about 125 nuclei


def test_tile_slices_partition_the_grid_area() -> None:
    count = np.zeros((512, 512), dtype=int)
    tiles = tile_slices((512, 512), 5)
    assert len(tiles) == 25
    for _, _, ys, xs in tiles:
        assert (ys.stop - ys.start, xs.stop - xs.start) == (102, 102)
        count[ys, xs] += 1
    assert (count[:510, :510] == 1).all()  # no overlap, no gap
    assert count[510:].sum() == 0 and count[:, 510:].sum() == 0  # remainder dropped
    with pytest.raises(ValueError, match=r"grid 5 is too fine for an image of shape \(4, 4\)"):
        tile_slices((4, 4), 5)
    with pytest.raises(ValueError, match="grid must be >= 1"):
        tile_slices((512, 512), 0)


def test_tiles_rebuild_the_source_crop(boundary_dataset: dsb2018.DatasetInfo, wheel: Path) -> None:
    info = boundary_dataset
    assert (info.source, info.num_cases, info.tile_shape) == (dsb2018.SOURCE_REAL, 25, (102, 102))
    image, mask = read_wheel_arrays(wheel)
    rebuilt_img = np.zeros((510, 510), dtype=np.uint8)
    rebuilt_seg = np.zeros((510, 510), dtype=np.uint8)
    for r in range(5):
        for c in range(5):
            ys, xs = slice(r * 102, (r + 1) * 102), slice(c * 102, (c + 1) * 102)
            rebuilt_img[ys, xs] = _read_png(info.folder / "imagesTr" / f"dsb2018_r{r}_c{c}_0000.png")
            rebuilt_seg[ys, xs] = _read_png(info.folder / "labelsTr" / f"dsb2018_r{r}_c{c}.png")
    np.testing.assert_array_equal(rebuilt_img, to_uint8(image)[0][:510, :510])
    np.testing.assert_array_equal(rebuilt_img, image[:510, :510])  # 0..235 uint16: lossless cast
    np.testing.assert_array_equal(rebuilt_seg, semantic_labels(mask)[:510, :510])
    assert set(np.unique(rebuilt_seg)) == {0, 1, 2}


def test_real_dataset_files_and_nnunet_integrity(boundary_dataset: dsb2018.DatasetInfo) -> None:
    folder = boundary_dataset.folder
    assert folder.name == "Dataset950_DSB2018Nuclei"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "fluorescence"}
    assert meta["labels"] == {"background": 0, "nucleus_interior": 1, "nucleus_boundary": 2}
    assert meta["numTraining"] == 25 and meta["file_ending"] == ".png"
    assert {"name", "description", "reference", "licence"} <= meta.keys()
    readme = (folder / "README.md").read_text()
    for needle in (STARDIST_WHEEL_SHA256, STARDIST_WHEEL_NAME, "BSD-3-Clause", "CC0", "not a clinical"):
        assert needle in readme
    assert (folder / "PROVENANCE.md").is_file()
    verify_with_nnunet(folder)


def test_binary_dataset_passes_integrity(wheel: Path, cache_dir: Path, tmp_path: Path) -> None:
    info = make_dsb2018_dataset(tmp_path, 951, cache_dir, grid=4, labels="binary")
    assert (info.num_cases, info.tile_shape) == (16, (128, 128))
    meta = json.loads((info.folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "nucleus": 1}
    labels = np.stack([_read_png(p) for p in sorted((info.folder / "labelsTr").glob("*.png"))])
    assert set(np.unique(labels)) == {0, 1}
    verify_with_nnunet(info.folder)


def test_semantic_labels_by_hand() -> None:
    inst = np.zeros((5, 9), dtype=np.uint16)
    inst[1:4, 1:4] = 3  # two touching 3x3 nuclei
    inst[1:4, 4:7] = 7
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 2, 2, 2, 2, 2, 0, 0],
            [0, 2, 1, 2, 2, 1, 2, 0, 0],  # centres are interior; the shared edge is boundary on both sides
            [0, 2, 2, 2, 2, 2, 2, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(semantic_labels(inst, "boundary"), expected)
    np.testing.assert_array_equal(semantic_labels(inst, "binary"), (inst > 0).astype(np.uint8))
    diagonal = np.zeros((4, 4), dtype=np.uint16)
    diagonal[:3, :3] = 1  # corner at the image edge: the edge itself is no boundary
    assert semantic_labels(diagonal)[0, 0] == 1 and semantic_labels(diagonal)[2, 2] == 2
    with pytest.raises(ValueError, match=r"labels must be one of \['binary', 'boundary'\], got 'instances'"):
        semantic_labels(inst, "instances")


def test_to_uint8_rescales_wide_images() -> None:
    wide = np.linspace(0, 4000, 1000).astype(np.uint16)
    out, note = to_uint8(wide)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255 and "percentile" in note


def test_find_free_dataset_id_skips_all_roots(tmp_path: Path) -> None:
    raw, pre, res = (tmp_path / n for n in ("raw", "pre", "res"))
    for folder in (raw / "Dataset950_A", pre / "Dataset951_B", res / "Dataset952_C", raw / "Dataset954_D"):
        folder.mkdir(parents=True)
    (raw / "Dataset953.txt").write_text("not a dataset folder")
    assert find_free_dataset_id(raw, pre, res) == 953
    assert find_free_dataset_id(raw, pre, res, start=954) == 955
    assert find_free_dataset_id(raw, start=951) == 951
    assert find_free_dataset_id(tmp_path / "missing") == 950


def test_existing_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dataset960_SomethingElse").mkdir()
    with pytest.raises(FileExistsError, match="Pick a free id"):
        make_dsb2018_dataset(tmp_path, 960, tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset960_SomethingElse"]


def _fake_wheel(path: Path) -> None:
    """A valid-looking stardist 0.9.2 wheel with the wrong content (a tampered mirror)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("stardist/__init__.py", "")
        meta = "Metadata-Version: 2.1\nName: stardist\nVersion: 0.9.2\n"
        zf.writestr("stardist-0.9.2.dist-info/METADATA", meta)
        zf.writestr("stardist-0.9.2.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")
        zf.writestr("stardist-0.9.2.dist-info/RECORD", "")


def test_downloaded_wheel_with_wrong_hash_is_refused(local_pip: Path, tmp_path: Path) -> None:
    _fake_wheel(local_pip / STARDIST_WHEEL_NAME)
    cache = tmp_path / "cache"
    with pytest.raises(WheelHashError, match="sha256 mismatch"):
        fetch_stardist_wheel(cache)
    assert not (cache / STARDIST_WHEEL_NAME).exists()
    assert list(cache.iterdir()) == []  # the temporary download folder is gone too


def test_cached_wheel_with_wrong_hash_is_redownloaded(wheel: Path, local_pip: Path, tmp_path: Path) -> None:
    shutil.copy(wheel, local_pip / STARDIST_WHEEL_NAME)  # the "registry" now serves the real wheel
    cache = tmp_path / "cache"
    cache.mkdir()
    _fake_wheel(cache / STARDIST_WHEEL_NAME)
    got = fetch_stardist_wheel(cache)
    assert got == cache / STARDIST_WHEEL_NAME and sha256_of(got) == STARDIST_WHEEL_SHA256


def test_offline_fallback(local_pip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    with pytest.raises(WheelDownloadError, match="offline_fallback"):
        make_dsb2018_dataset(raw, 970, tmp_path / "cache", grid=2, offline_fallback=False)
    assert not raw.exists() or not any(raw.iterdir())
    info = make_dsb2018_dataset(raw, 970, tmp_path / "cache", grid=2)
    assert info.source == dsb2018.SOURCE_SYNTHETIC and info.num_cases == 4 and info.tile_shape == (256, 256)
    assert "SYNTHETIC" in capsys.readouterr().out
    assert "not real data" in (info.folder / "README.md").read_text()
    verify_with_nnunet(info.folder)
