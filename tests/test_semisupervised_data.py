"""Unlabelled cases for semi-supervised training: splits, the dataset builder and ``nnunet-selfreg add-unlabeled``.

Source datasets come from :func:`make_synthetic_dataset` (2D PNG, 3D NIfTI); unlabelled images are
written here. One test runs the real ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` on a
built dataset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_selfreg.data.semisupervised import (
    README_NAME,
    SEMISUPERVISED_KEY,
    SemiSupervisedDataError,
    build_semi_supervised_dataset,
    check_semi_supervised_split,
    ignore_label_value,
    semi_supervised_splits,
    unlabeled_cases,
)
from nnunet_selfreg.data.synthetic import make_synthetic_dataset
from nnunet_selfreg.tools.main import main

SRC_ID = 11
SHAPE_2D = (48, 48)


# --------------------------------------------------------------------------- helpers


def _png(path: Path, shape: tuple[int, ...] = SHAPE_2D, seed: int = 0, rgb: bool = False) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (*shape, 3) if rgb else shape, dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=rgb), str(path))


def _nifti(path: Path, shape: tuple[int, ...], spacing, origin, direction=None, seed: int = 0) -> None:
    img = sitk.GetImageFromArray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _unlabeled_pngs(folder: Path, names: list[str], shape: tuple[int, ...] = SHAPE_2D) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        _png(folder / name, shape, seed=100 + i)
    return folder


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return tmp_path / "nnUNet_raw"


@pytest.fixture
def src2d(raw: Path) -> Path:
    """6 labelled 48x48 PNG cases."""
    return make_synthetic_dataset(raw, SRC_ID, dim=2, num_cases=6, shape=SHAPE_2D, seed=3)


def _expect_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(SemiSupervisedDataError, match=match) as info:
        build_semi_supervised_dataset(*args, **kwargs)
    return str(info.value)


def _hidden_leftovers(raw: Path) -> list[str]:
    return [p.name for p in raw.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- dataset.json helpers


def test_unlabeled_cases_and_ignore_label():
    assert unlabeled_cases({"labels": {"background": 0}}) == []
    assert unlabeled_cases({SEMISUPERVISED_KEY: {"unlabeled_cases": ["b", "a"]}}) == ["a", "b"]
    for bad in ({"unlabeled_cases": "a"}, {"unlabeled_cases": [1]}, {}, ["a"], {"unlabeled_cases": ["a", "a"]}):
        with pytest.raises(SemiSupervisedDataError, match="unlabeled_cases"):
            unlabeled_cases({SEMISUPERVISED_KEY: bad})
    assert ignore_label_value({"labels": {"background": 0, "a": 1}}) is None
    assert ignore_label_value({"labels": {"background": 0, "a": 1, "ignore": 2}}) == 2
    with pytest.raises(SemiSupervisedDataError, match="ignore"):
        ignore_label_value({"labels": {"background": 0, "ignore": [1, 2]}})


# --------------------------------------------------------------------------- splits


def test_splits_put_unlabeled_in_every_train_and_match_nnunet():
    labeled = [f"lab_{i:02d}" for i in range(12)][::-1]  # order of the input must not matter
    unlabeled = ["u_3", "u_1", "u_2", "u_0"]
    splits = semi_supervised_splits(labeled, unlabeled)
    stock = generate_crossval_split(sorted(labeled), seed=12345, n_splits=5)
    assert len(splits) == 5
    for ours, theirs in zip(splits, stock, strict=True):
        assert ours["val"] == list(theirs["val"])
        assert ours["train"] == list(theirs["train"]) + sorted(unlabeled)
        assert not set(ours["val"]) & set(unlabeled)
    assert sorted(c for s in splits for c in s["val"]) == sorted(labeled)
    assert all(type(c) is str for s in splits for k in ("train", "val") for c in s[k])
    other = semi_supervised_splits(labeled, unlabeled, n_splits=3, seed=7)
    assert [s["val"] for s in other] == [list(s["val"]) for s in generate_crossval_split(sorted(labeled), 7, 3)]


@pytest.mark.parametrize(
    ("labeled", "unlabeled", "match"),
    [
        (["a", "b", "c", "d"], ["u"], "splits_final.json"),
        (["a", "b", "c", "d", "e"], [], "no unlabelled"),
        (["a", "b", "c", "d", "e"], ["u", "c"], "both labelled and unlabelled"),
    ],
)
def test_splits_errors(labeled, unlabeled, match):
    with pytest.raises(SemiSupervisedDataError, match=match):
        semi_supervised_splits(labeled, unlabeled)


def test_check_split():
    labeled, unlabeled = [f"l{i}" for i in range(10)], [f"u{i}" for i in range(5)]
    for fold, split in enumerate(semi_supervised_splits(labeled, unlabeled)):
        check_semi_supervised_split(split, unlabeled, fold, "splits_final.json")
    # a stock trainer's splits over all cases validate on unlabelled cases in some fold
    stock = generate_crossval_split(sorted(labeled + unlabeled), seed=12345, n_splits=5)
    refused = 0
    for fold, split in enumerate(stock):
        if set(split["val"]) & set(unlabeled):
            with pytest.raises(SemiSupervisedDataError, match="stock trainer.*move it away"):
                check_semi_supervised_split(split, unlabeled, fold, "/x/splits_final.json")
            refused += 1
    assert refused > 0
    with pytest.raises(SemiSupervisedDataError, match="no labelled case"):
        check_semi_supervised_split({"train": unlabeled, "val": labeled}, unlabeled, 0, "s.json")
    with pytest.raises(SemiSupervisedDataError, match="no unlabelled case"):
        check_semi_supervised_split({"train": labeled[2:], "val": labeled[:2]}, unlabeled, "all", "s.json")


# --------------------------------------------------------------------------- building a dataset


def test_build_2d(src2d: Path, raw: Path, tmp_path: Path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    unl = _unlabeled_pngs(tmp_path / "unl", ["img_a_0000.png", "img_b_0000.png", "img_c.png", "img_d_0001.png"])
    (unl / "notes.txt").write_text("not an image")  # other endings are not images
    calls = []
    target = build_semi_supervised_dataset(src2d, unl, raw, 12, progress=lambda *a: calls.append(a))
    assert target == raw / "Dataset012_SelfRegSyntheticSemiSup"
    new = ["img_a", "img_b", "img_c", "img_d_0001"]
    assert calls[-1][:2] == (10, 10)

    src_json = json.loads((src2d / "dataset.json").read_text())
    ds = json.loads((target / "dataset.json").read_text())
    assert ds["labels"] == {**src_json["labels"], "ignore": 3}
    assert ds["numTraining"] == 10
    assert ds[SEMISUPERVISED_KEY]["unlabeled_cases"] == new
    assert ds[SEMISUPERVISED_KEY]["labeled_cases"] == 6
    assert ds[SEMISUPERVISED_KEY]["source_dataset"] == src2d.name
    assert {k: v for k, v in ds.items() if k not in (SEMISUPERVISED_KEY, "labels", "numTraining", "name")} == {
        k: v for k, v in src_json.items() if k not in ("labels", "numTraining", "name")
    }
    assert unlabeled_cases(ds) == new and ignore_label_value(ds) == 3
    assert (target / README_NAME).read_text().strip()

    for sub in ("imagesTr", "labelsTr"):  # labelled files: byte-identical copies
        for f in (src2d / sub).iterdir():
            assert (target / sub / f.name).read_bytes() == f.read_bytes()
    for case in new:
        image = _array(target / "imagesTr" / f"{case}_0000.png")
        label = _array(target / "labelsTr" / f"{case}.png")
        assert label.shape == image.shape == SHAPE_2D
        assert np.all(label == 3)
        seg, _ = NaturalImage2DIO().read_seg(str(target / "labelsTr" / f"{case}.png"))
        assert seg.shape == (1, 1, *SHAPE_2D) and np.all(seg == 3)
    source_img = next(p for p in unl.iterdir() if p.name == "img_c.png")
    assert (target / "imagesTr" / "img_c_0000.png").read_bytes() == source_img.read_bytes()
    assert len(list((target / "imagesTr").iterdir())) == 10 and len(list((target / "labelsTr").iterdir())) == 10
    assert _hidden_leftovers(raw) == []

    # the same dataset again: the target and the id are never overwritten
    before = (target / "dataset.json").read_bytes()
    _expect_error("exists already", src2d, unl, raw, 12)
    _expect_error("exists already", src2d, unl, raw, 12, name="Other")
    assert (target / "dataset.json").read_bytes() == before

    # a built dataset as source: earlier unlabelled cases stay unlabelled, its ignore label is reused
    more = _unlabeled_pngs(tmp_path / "more", ["x.png"])
    again = build_semi_supervised_dataset(target, more, raw, 13, name="Twice", prefix="m_")
    ds2 = json.loads((again / "dataset.json").read_text())
    assert ds2["labels"]["ignore"] == 3 and list(ds2["labels"]).count("ignore") == 1
    assert unlabeled_cases(ds2) == sorted([*new, "m_x"]) and ds2[SEMISUPERVISED_KEY]["labeled_cases"] == 6
    assert ds2["numTraining"] == 11 and ds2["name"] == "Twice"


def test_build_3d_nifti_keeps_geometry(raw: Path, tmp_path: Path):
    src = make_synthetic_dataset(raw, 21, dim=3, num_cases=2, shape=(6, 16, 16), spacing=(2.5, 1.0, 1.0))
    unl = tmp_path / "unl3d"
    unl.mkdir()
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    _nifti(unl / "vol_0000.nii.gz", (5, 12, 14), (0.8, 0.7, 3.0), (10.0, -4.0, 2.5), flipped)
    _nifti(unl / "other.nii.gz", (7, 10, 9), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), seed=1)
    target = build_semi_supervised_dataset(src, unl, raw, 22, name="Vol", prefix="u_")
    assert target.name == "Dataset022_Vol"
    for case in ("u_vol", "u_other"):
        image = sitk.ReadImage(str(target / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(target / "labelsTr" / f"{case}.nii.gz"))
        assert label.GetSize() == image.GetSize()
        assert np.allclose(label.GetSpacing(), image.GetSpacing())
        assert np.allclose(label.GetOrigin(), image.GetOrigin())
        assert np.allclose(label.GetDirection(), image.GetDirection())
        assert np.all(sitk.GetArrayFromImage(label) == 3)
    assert np.allclose(sitk.ReadImage(str(target / "labelsTr" / "u_vol.nii.gz")).GetDirection(), flipped)
    assert unlabeled_cases(json.loads((target / "dataset.json").read_text())) == ["u_other", "u_vol"]

    flat = tmp_path / "flat"
    flat.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 12), np.float32)), str(flat / "slice.nii.gz"))
    _expect_error(r"slice\.nii\.gz is 2D", src, flat, raw, 23)


def test_build_reuses_existing_ignore_label(src2d: Path, raw: Path, tmp_path: Path):
    ds = json.loads((src2d / "dataset.json").read_text())
    ds["labels"]["ignore"] = 3
    (src2d / "dataset.json").write_text(json.dumps(ds))
    target = build_semi_supervised_dataset(src2d, _unlabeled_pngs(tmp_path / "u", ["a.png"]), raw, 12)
    new = json.loads((target / "dataset.json").read_text())
    assert new["labels"] == ds["labels"] and np.all(_array(target / "labelsTr" / "a.png") == 3)


def test_build_refusals(src2d: Path, raw: Path, tmp_path: Path):
    unl = _unlabeled_pngs(tmp_path / "unl", ["a.png"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    _expect_error("no images ending with .png", src2d, empty, raw, 12)
    _expect_error("does not exist", src2d, tmp_path / "nowhere", raw, 12)

    # unlabelled ids that are labelled ids: suggest a prefix; with one it works
    clash = _unlabeled_pngs(tmp_path / "clash", ["case_001.png", "case_099_0000.png"])
    msg = _expect_error("already cases", src2d, clash, raw, 12)
    assert "case_001" in msg and "--prefix" in msg and "case_099" not in msg
    ok = build_semi_supervised_dataset(src2d, clash, raw, 12, prefix="unl_")
    assert unlabeled_cases(json.loads((ok / "dataset.json").read_text())) == ["unl_case_001", "unl_case_099"]

    # a dataset id in use under another name; bad names and ids
    _expect_error("Dataset011_SelfRegSynthetic exists already", src2d, unl, raw, SRC_ID, name="New")
    _expect_error("three digits", src2d, unl, raw, 1000)
    _expect_error("not usable", src2d, unl, raw, 14, name="a/b")
    _expect_error("not usable", src2d, unl, raw, 14, prefix="../")

    # both a.png and a_0000.png are case a
    dup = _unlabeled_pngs(tmp_path / "dup", ["a.png", "a_0000.png"])
    _expect_error("two images of case 'a'", src2d, dup, raw, 14)
    multi = _unlabeled_pngs(tmp_path / "multi", ["a_0000.png", "a_0001.png"])
    _expect_error("looks multi-channel", src2d, multi, raw, 14)

    # wrong channel count, unreadable file: the message names the file
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    _png(rgb / "colour.png", rgb=True)
    _expect_error(r"colour\.png has 3 channel\(s\); the dataset has 1", src2d, rgb, raw, 14)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad_0000.png").write_bytes(b"not a png at all")
    _expect_error(r"cannot read the unlabelled image bad_0000\.png", src2d, broken, raw, 14)
    assert not list(raw.glob("Dataset014_*")) and _hidden_leftovers(raw) == []


def test_build_refuses_unsupported_sources(src2d: Path, raw: Path, tmp_path: Path):
    unl = _unlabeled_pngs(tmp_path / "unl", ["a.png"])
    ds = json.loads((src2d / "dataset.json").read_text())

    def with_json(**changes) -> None:
        (src2d / "dataset.json").write_text(json.dumps({**ds, **changes}))

    with_json(labels={"background": 0, "whole": [1, 2], "core": 2})
    _expect_error("region-based", src2d, unl, raw, 12)
    with_json(dataset={"case_000": {"images": ["imagesTr/case_000_0000.png"], "label": "labelsTr/case_000.png"}})
    _expect_error('"dataset" key.*unsupported', src2d, unl, raw, 12)
    with_json(labels={"background": 0, "ellipse": 1, "box": 2, "ignore": 7})
    _expect_error("ignore", src2d, unl, raw, 12)
    with_json()
    shutil.rmtree(src2d / "labelsTr")
    _expect_error("labelsTr missing", src2d, unl, raw, 12)
    _expect_error("imagesTr, labelsTr, dataset.json missing", tmp_path / "unl", unl, raw, 12)
    assert not list(raw.glob("Dataset012_*"))


def test_build_multichannel(src2d: Path, raw: Path, tmp_path: Path):
    for f in sorted((src2d / "imagesTr").iterdir()):
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    ds = json.loads((src2d / "dataset.json").read_text())
    (src2d / "dataset.json").write_text(json.dumps({**ds, "channel_names": {"0": "a", "1": "b"}}))

    partial = _unlabeled_pngs(tmp_path / "partial", ["x_0000.png", "x_0001.png", "y_0000.png", "z_0002.png"])
    msg = _expect_error("needs the channels 0000, 0001", src2d, partial, raw, 12)
    assert "missing y_0001.png" in msg and "z_0000.png" in msg and "unexpected z_0002.png" in msg
    plain = _unlabeled_pngs(tmp_path / "plain", ["x.png"])
    _expect_error(r"need nnU-Net's naming CASE_XXXX\.png.*x\.png", src2d, plain, raw, 12)

    ok = _unlabeled_pngs(tmp_path / "ok", ["x_0000.png", "x_0001.png"])
    target = build_semi_supervised_dataset(src2d, ok, raw, 12)
    assert {p.name for p in (target / "imagesTr").glob("x_*")} == {"x_0000.png", "x_0001.png"}
    assert np.all(_array(target / "labelsTr" / "x.png") == 3)


# --------------------------------------------------------------------------- command line


@pytest.fixture
def cli_env(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, folder in (("nnUNet_raw", raw), ("nnUNet_preprocessed", tmp_path / "pre"), ("nnUNet_results", None)):
        if folder is None:
            monkeypatch.delenv(var, raising=False)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            monkeypatch.setenv(var, str(folder))
    return tmp_path / "pre"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-selfreg add-unlabeled: error: ") and "\n" not in err, err
    return err


def test_cli(src2d: Path, raw: Path, tmp_path: Path, cli_env: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    unl = _unlabeled_pngs(tmp_path / "unl", ["a.png", "b.png"])
    (cli_env / "Dataset012_Elsewhere").mkdir()  # id 12 is taken in nnUNet_preprocessed: the default skips it
    assert main(["add-unlabeled", "-d", str(SRC_ID), "-i", str(unl)]) == 0
    out = capsys.readouterr().out
    target = raw / "Dataset013_SelfRegSyntheticSemiSup"
    assert unlabeled_cases(json.loads((target / "dataset.json").read_text())) == ["a", "b"]
    assert "nnUNetv2_plan_and_preprocess -d 13 --verify_dataset_integrity" in out
    assert "nnUNetv2_train 13 CONFIGURATION FOLD -tr nnUNetTrainerSSNet" in out
    assert "-tr nnUNetTrainer_LabeledOnly" in out

    assert main(["add-unlabeled", "-d", src2d.name, "-i", str(unl), "-o", "30", "--name", "X", "--prefix", "u_"]) == 0
    assert unlabeled_cases(json.loads((raw / "Dataset030_X" / "dataset.json").read_text())) == ["u_a", "u_b"]
    capsys.readouterr()

    bad = [
        (["-d", "77", "-i", str(unl)], "not found"),
        (["-d", str(SRC_ID), "-i", str(unl), "-o", "12"], "in use"),
        (["-d", str(SRC_ID), "-i", str(unl), "-o", "13"], "in use"),
        (["-d", str(SRC_ID), "-i", str(tmp_path / "missing")], "does not exist"),
        (["-d", str(SRC_ID), "-i", str(_unlabeled_pngs(tmp_path / "c", ["case_000.png"]))], "--prefix"),
    ]
    for args, match in bad:
        assert main(["add-unlabeled", *args]) == 2, args
        assert match in _one_line_error(capsys)
    monkeypatch.delenv("nnUNet_raw")
    assert main(["add-unlabeled", "-d", str(SRC_ID), "-i", str(unl)]) == 2
    assert "nnUNet_raw is not set" in _one_line_error(capsys)
    assert sorted(p.name for p in raw.iterdir()) == [src2d.name, "Dataset013_SelfRegSyntheticSemiSup", "Dataset030_X"]


# --------------------------------------------------------------------------- nnU-Net's own preprocessing


def test_nnunet_plans_and_preprocesses_built_dataset(nnenv, semisup2d):
    """The session's semi-supervised dataset passed ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``."""
    pre = next(nnenv.preprocessed.glob(f"Dataset{semisup2d}_*"))
    ds = json.loads((pre / "dataset.json").read_text())
    unlabeled = [f"scan{i:02d}" for i in range(6)]
    assert unlabeled_cases(ds) == unlabeled and ignore_label_value(ds) == 3
    cases = {f"case_{i:03d}" for i in range(10)} | set(unlabeled)
    assert {p.stem for p in (pre / "nnUNetPlans_2d").glob("*.pkl")} == cases
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    preprocessed = nnUNetDatasetBlosc2(str(pre / "nnUNetPlans_2d"))
    for case in sorted(cases):
        data, seg, _, _ = preprocessed.load_case(case)
        seg = np.asarray(seg[:])
        assert seg.shape[1:] == data.shape[1:] and seg.size > 0, case
        if case in unlabeled:  # the whole map, after nnU-Net's cropping and resampling, is the ignore label
            assert np.unique(seg).tolist() == [3], (case, np.unique(seg))
        else:  # labelled cases keep their classes (nnU-Net marks outside-the-crop background -1)
            assert 3 not in seg and {1, 2} <= set(np.unique(seg).tolist()) <= {-1, 0, 1, 2}, (case, np.unique(seg))
