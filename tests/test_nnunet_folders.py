"""nnU-Net's folder conventions (``nnunet_selfreg.nnunet_folders``): names built and parsed as nnU-Net writes
them, dataset ids resolved by nnU-Net's own lookup, and the error that says how to set an unset folder."""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

import pytest

from nnunet_selfreg import nnunet_folders
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.evaluation.results import CompareInputError
from nnunet_selfreg.nnunet_folders import (
    CHECKPOINTS,
    DEFAULT_PLANS,
    ENV_VARS,
    dataset_folder_name,
    dataset_folders_with_id,
    dataset_label,
    env_folder,
    find_free_dataset_id,
    fold_folder,
    fold_folders,
    fold_name,
    image_file_name,
    is_fold_folder_name,
    model_folder_name,
    parse_dataset_folder_name,
    parse_model_folder_name,
    plans_file_name,
    preprocessed_data_folder_name,
    require_env_folder,
    resolve_dataset,
    training_logs,
    validation_summary,
)


def test_model_folder_name_round_trip() -> None:
    name = model_folder_name("nnUNetTrainerSelfReg", "nnUNetResEncUNetMPlans", "3d_fullres")
    assert name == "nnUNetTrainerSelfReg__nnUNetResEncUNetMPlans__3d_fullres"
    assert parse_model_folder_name(name) == ("nnUNetTrainerSelfReg", "nnUNetResEncUNetMPlans", "3d_fullres")
    for not_a_model in ("crossval_results_folds_0_1_2_3_4", "A__B", "A__B__C__D", "A____2d", "__P__2d"):
        assert parse_model_folder_name(not_a_model) is None, not_a_model


def test_dataset_folder_names() -> None:
    assert dataset_folder_name(4, "Hippocampus") == "Dataset004_Hippocampus"
    assert dataset_folder_name(950, "A_B") == "Dataset950_A_B"
    assert parse_dataset_folder_name("Dataset004_Hippocampus") == (4, "Hippocampus")
    assert parse_dataset_folder_name("Dataset950_A_B") == (950, "A_B")
    assert parse_dataset_folder_name("Dataset007_") == (7, "")
    for other in ("Dataset04_X", "Dataset0004_X", "dataset004_X", "Task004_X", "Dataset004X"):
        assert parse_dataset_folder_name(other) is None, other


def test_fold_folders(tmp_path: Path) -> None:
    model = tmp_path / model_folder_name("T", "P", "2d")
    for name in ("fold_1", "fold_0", "fold_all", "fold_x", "fold_0_old", "crossval_results_folds_0_1"):
        (model / name).mkdir(parents=True)
    (model / "fold_2").write_text("a file, not a fold")
    assert fold_folder(model, 3) == model / "fold_3"
    assert fold_folder(model, "all") == model / "fold_all"
    assert [p.name for p in fold_folders(model)] == ["fold_0", "fold_1", "fold_all"]
    assert is_fold_folder_name("fold_12") and not is_fold_folder_name("fold_")


def test_dataset_ids_on_disk(tmp_path: Path) -> None:
    raw, results = tmp_path / "raw", tmp_path / "results"
    for folder in (raw / "Dataset950_A", raw / "Dataset951_B", results / "Dataset952_C", raw / "Dataset953_D"):
        folder.mkdir(parents=True)
    assert dataset_folders_with_id(raw, 951) == [raw / "Dataset951_B"]
    assert dataset_folders_with_id(raw, 952) == []
    assert dataset_folders_with_id(tmp_path / "missing", 950) == []
    assert dataset_folders_with_id(None, 950) == []
    assert find_free_dataset_id(raw, results) == 954
    assert find_free_dataset_id(raw, None, start=952) == 952


def test_resolve_dataset_by_id_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "nnUNet_raw"
    (raw / "Dataset123_Liver").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    assert resolve_dataset("123") == "Dataset123_Liver"
    assert resolve_dataset(123) == "Dataset123_Liver"
    assert resolve_dataset("Dataset123_Liver") == "Dataset123_Liver"
    with pytest.raises(UserError, match=r"^dataset '124' not found: Could not find a dataset with the ID 124"):
        resolve_dataset("124")
    with pytest.raises(CompareInputError, match="dataset 'Liver' not found"):
        resolve_dataset("Liver", CompareInputError)
    (raw / "Dataset123_Other").mkdir()
    with pytest.raises(UserError, match="More than one dataset name found for dataset id 123"):
        resolve_dataset("123")


def test_env_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ENV_VARS == ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert env_folder("nnUNet_results") == tmp_path
    assert require_env_folder("nnUNet_results") == tmp_path
    monkeypatch.setenv("nnUNet_results", "")  # set but empty: no folder, as before this module
    assert env_folder("nnUNet_results") is None
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert env_folder("nnUNet_raw") is None
    with pytest.raises(UserError) as raised:
        require_env_folder("nnUNet_raw")
    assert str(raised.value) == (
        "nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (the folder with the raw DatasetXXX_* "
        "datasets; see nnU-Net's documentation/setting_up_paths.md)"
    )
    with pytest.raises(CompareInputError, match="^nnUNet_results is not set: export nnUNet_results=/path/to/"):
        require_env_folder("nnUNet_results", CompareInputError)


def test_file_names_inside_the_folders(tmp_path: Path) -> None:
    assert image_file_name("case_007", ".nii.gz") == "case_007_0000.nii.gz"
    assert image_file_name("c", ".png", channel=12) == "c_0012.png"
    assert dataset_label(7) == "Dataset007" and plans_file_name(DEFAULT_PLANS) == "nnUNetPlans.json"
    assert preprocessed_data_folder_name(DEFAULT_PLANS, "3d_fullres") == "nnUNetPlans_3d_fullres"
    fold = fold_folder(tmp_path, "all")
    assert fold.name == fold_name("all") == "fold_all"
    assert validation_summary(fold) == fold / "validation" / "summary.json"
    assert CHECKPOINTS == ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
    assert training_logs(fold) == []
    fold.mkdir()
    old, new = fold / "training_log_2026_1_1_10_00_00.txt", fold / "training_log_2026_1_2_10_00_00.txt"
    new.write_text("later")
    old.write_text("earlier")
    os.utime(old, (1, 1))
    (fold / "debug.json").write_text("{}")
    assert training_logs(fold) == [old, new]


# nnU-Net's names as they appear in a string of code (docstrings and comments may explain with them)
NNUNET_NAMES = re.compile(
    r"checkpoint_(final|latest|best|\*)\.pth|summary\.json|splits_final\.json|debug\.json|progress\.png|"
    r"training_log_|(?<![A-Za-z])plans\.json|dataset\.json|dataset_fingerprint\.json|gt_segmentations|"
    r"crossval_results|\bfold_(?=[FX*{0-9]|all\b)|Dataset\{|\bimagesT[rs]\b|\blabelsTr\b|_0000|\bnnUNetPlans\b|"
    r"[\"']validation[\"'/]|/validation\b"
)


def _code_strings(source: str) -> list[tuple[int, str]]:
    """The string literals of ``source`` that are not docstrings, with their line numbers."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.add(first.lineno)
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.STRING and t.start[0] not in docstrings]


def test_nnunets_file_names_are_spelled_in_nnunet_folders_only() -> None:
    package = Path(nnunet_folders.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "nnunet_folders.py":
            continue
        for line, text in _code_strings(path.read_text()):
            found += [f"{path.relative_to(package)}:{line}: {m.group(0)}" for m in NNUNET_NAMES.finditer(text)]
    assert not found, "use the constants and functions of nnunet_selfreg.nnunet_folders:\n" + "\n".join(found)
