"""``add-unlabeled --keep-labels``: the papers' N-labelled protocol on a real nnU-Net raw dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_selfreg.data.semisupervised import (
    WITHHELD_DIR,
    SemiSupervisedDataError,
    build_semi_supervised_dataset,
    keep_count,
)
from nnunet_selfreg.data.synthetic import make_synthetic_dataset
from nnunet_selfreg.tools.main import main


def _read(path: Path) -> np.ndarray:
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    return NaturalImage2DIO().read_seg(str(path))[0]


def test_keep_count():
    assert keep_count(3, 10) == 3 and keep_count("10%", 40) == 4 and keep_count("5%", 10) == 1
    for spec, match in (("0", "keep at least 1"), ("10", "strip at least 1"), ("many", "a number of cases")):
        with pytest.raises(SemiSupervisedDataError, match=match):
            keep_count(spec, 10)


def test_keep_labels_strips_and_withholds(tmp_path: Path):
    raw = tmp_path / "nnUNet_raw"
    src = make_synthetic_dataset(raw, 31, dim=2, num_cases=8, shape=(32, 32), seed=4)
    target = build_semi_supervised_dataset(src, None, raw, 32, keep_labels="25%", keep_seed=7)
    entry = json.loads((target / "dataset.json").read_text())["nnunet_selfreg"]
    ignore = entry["ignore_label"]
    withheld = entry["withheld_labels"]
    assert entry["labeled_cases"] == 2 and len(withheld["kept"]) == 2 and len(withheld["cases"]) == 6
    assert sorted(withheld["kept"] + withheld["cases"]) == sorted(p.name[:-4] for p in (src / "labelsTr").iterdir())
    assert entry["unlabeled_cases"] == withheld["cases"]
    for case in withheld["cases"]:  # training label: all ignore; the real one is kept aside, unchanged
        assert np.all(_read(target / "labelsTr" / f"{case}.png") == ignore)
        original = _read(src / "labelsTr" / f"{case}.png")
        assert np.array_equal(_read(target / WITHHELD_DIR / f"{case}.png"), original) and original.any()
    for case in withheld["kept"]:
        assert np.array_equal(_read(target / "labelsTr" / f"{case}.png"), _read(src / "labelsTr" / f"{case}.png"))
    again = build_semi_supervised_dataset(src, None, raw, 33, name="Again", keep_labels=2, keep_seed=7)
    assert (
        json.loads((again / "dataset.json").read_text())["nnunet_selfreg"]["withheld_labels"]["kept"]
        == (withheld["kept"])
    )  # the same seed draws the same cases


def test_cli_needs_images_or_keep_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    raw = tmp_path / "nnUNet_raw"
    make_synthetic_dataset(raw, 41, dim=2, num_cases=6, shape=(32, 32), seed=5)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert main(["add-unlabeled", "-d", "41"]) == 2
    assert "give -i UNLABELED_FOLDER, or --keep-labels N" in capsys.readouterr().err
    assert main(["add-unlabeled", "-d", "41", "--keep-labels", "0"]) == 2  # checked before anything is announced
    captured = capsys.readouterr()
    assert "keep at least 1" in captured.err and captured.out == ""
    assert main(["add-unlabeled", "-d", "41", "--keep-labels", "3", "-o", "42"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "adding no new images to Dataset041_SelfRegSynthetic, keeping the labels of 3 cases as dataset 42"
    )
    assert "\n  3 cases lost their labels" in out
    # 3 labelled cases: nnU-Net's 5 folds cannot be made, so only fold 'all' is suggested
    assert "5-fold cross-validation needs at least 5" in out and "FOLD" not in out
    assert "nnUNetv2_train 42 CONFIGURATION all -tr nnUNetTrainerSSNet" in out
    assert main(["add-unlabeled", "-d", "41", "--keep-labels", "10%", "-o", "43"]) == 0
    out = capsys.readouterr().out
    assert "keeping the labels of 10% of its labelled cases as dataset 43" in out and "note: 1 case with labels:" in out
    assert main(["add-unlabeled", "-d", "41", "--keep-labels", "5", "-o", "44"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_train 44 CONFIGURATION FOLD -tr nnUNetTrainerSSNet" in out and " all -tr" not in out
