"""nnU-Net's folder conventions, in one place: environment folders, dataset, model and fold folder names,
and the names of the files nnU-Net reads and writes in them.

nnU-Net keeps its data in three folders named by environment variables (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``), datasets in ``DatasetXXX_Name`` folders, trained models in
``TRAINER__PLANS__CONFIGURATION`` folders with one ``fold_X`` folder per fold. Every tool of this package
reads or writes these folders; keeping the conventions here means one place to look when nnU-Net's change,
and the same clear error everywhere when a folder is not set. No other module spells one of the names
below: they use these constants (``tests/test_nnunet_folders.py`` checks it). Where nnU-Net has the
function itself (dataset id lookup, the model folder name) it is called rather than re-implemented.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_selfreg.errors import UserError

__all__ = [
    "BEST_CHECKPOINT",
    "CHECKPOINTS",
    "CHECKPOINT_GLOB",
    "CROSSVAL_RESULTS_PREFIX",
    "DATASET_JSON",
    "DEBUG_JSON",
    "DEFAULT_PLANS",
    "ENV_VARS",
    "FINAL_CHECKPOINT",
    "FINGERPRINT_JSON",
    "FOLD_PREFIX",
    "GT_SEGMENTATIONS",
    "IMAGES_TR",
    "IMAGES_TS",
    "LABELS_TR",
    "LATEST_CHECKPOINT",
    "MODEL_FOLDER_LAYOUT",
    "PLANS_JSON",
    "PROGRESS_PNG",
    "SPLITS_JSON",
    "SUMMARY_JSON",
    "TRAINING_LOG_GLOB",
    "VALIDATION_FOLDER",
    "dataset_folder_name",
    "dataset_folders_with_id",
    "dataset_label",
    "env_folder",
    "find_free_dataset_id",
    "fold_folder",
    "fold_folders",
    "fold_name",
    "image_file_name",
    "is_fold_folder_name",
    "model_folder_name",
    "parse_dataset_folder_name",
    "parse_fold",
    "parse_model_folder_name",
    "plans_file_name",
    "preprocessed_data_folder_name",
    "refuse_existing_dataset",
    "require_env_folder",
    "resolve_dataset",
    "training_logs",
    "unset_message",
    "validation_summary",
]

#: nnU-Net's folder variables, in the order of its documentation
ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: where a trained model folder lies (for messages)
MODEL_FOLDER_LAYOUT = "nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION"

# a raw dataset folder: images CASE_XXXX.ext (one file per channel) and labels CASE.ext
IMAGES_TR = "imagesTr"
LABELS_TR = "labelsTr"
IMAGES_TS = "imagesTs"
#: the dataset description: in the raw and the preprocessed dataset folder and in every model folder
DATASET_JSON = "dataset.json"
#: what nnUNetv2_extract_fingerprint measured (preprocessed dataset folder; copied into model folders)
FINGERPRINT_JSON = "dataset_fingerprint.json"
#: the plans identifier nnU-Net plans under by default (``-p``); its file is ``nnUNetPlans.json``
DEFAULT_PLANS = "nnUNetPlans"
#: the plans a model folder keeps of its training
PLANS_JSON = "plans.json"
#: the cross-validation folds, in the preprocessed dataset folder
SPLITS_JSON = "splits_final.json"
#: the reference segmentations nnU-Net's validation scores against, in the preprocessed dataset folder
GT_SEGMENTATIONS = "gt_segmentations"
#: a model folder holds one fold folder per fold: ``fold_0`` ... ``fold_4``, ``fold_all``
FOLD_PREFIX = "fold_"
# a fold folder: the checkpoints, the trainer's attributes, the progress plot, the training logs and the
# validation (predictions and their summary)
FINAL_CHECKPOINT = "checkpoint_final.pth"
LATEST_CHECKPOINT = "checkpoint_latest.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
#: the checkpoints ``nnUNetv2_train --c`` continues from, in the order it tries them
CHECKPOINTS = (FINAL_CHECKPOINT, LATEST_CHECKPOINT, BEST_CHECKPOINT)
CHECKPOINT_GLOB = "checkpoint_*.pth"
#: every trainer attribute, as text, written when training starts
DEBUG_JSON = "debug.json"
PROGRESS_PNG = "progress.png"
TRAINING_LOG_GLOB = "training_log_*.txt"
VALIDATION_FOLDER = "validation"
SUMMARY_JSON = "summary.json"
#: the folders nnUNetv2_find_best_configuration merges a model's validations into (``..._folds_0_1_2_3_4``)
CROSSVAL_RESULTS_PREFIX = "crossval_results_folds_"

_ENV_ROLES = {
    "nnUNet_raw": "the folder with the raw DatasetXXX_* datasets",
    "nnUNet_preprocessed": "the folder nnUNetv2_plan_and_preprocess writes to",
    "nnUNet_results": "the folder nnUNetv2_train writes to",
}
_DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_(.*)$", re.DOTALL)
_FOLD_FOLDER = re.compile(rf"^{FOLD_PREFIX}(\d+|all)$")


# --------------------------------------------------------------------------- environment folders


def env_folder(var: str) -> Path | None:
    """The folder in environment variable ``var`` (one of :data:`ENV_VARS`), None if unset or empty."""
    value = os.environ.get(var)
    return Path(value) if value else None


def unset_message(var: str) -> str:
    """What to do when ``var`` is not set (one line, for errors and ``doctor``)."""
    role = _ENV_ROLES.get(var, "an nnU-Net folder")
    return f"{var} is not set: export {var}=/path/to/{var} ({role}; see nnU-Net's documentation/setting_up_paths.md)"


def require_env_folder(var: str, error: type[Exception] = UserError) -> Path:
    """The folder in ``var``; raises ``error`` saying how to set it when it is unset."""
    folder = env_folder(var)
    if folder is None:
        raise error(unset_message(var))
    return folder


# --------------------------------------------------------------------------- datasets


def resolve_dataset(dataset: str | int, error: type[Exception] = UserError) -> str:
    """Dataset id or name -> ``DatasetXXX_Name`` (nnU-Net's own lookup in its three folders)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise error(f"dataset {dataset!r} not found: {first}") from None


def dataset_label(dataset_id: int) -> str:
    """``DatasetXXX``: how nnU-Net names dataset ``dataset_id`` (1..999); its folders are ``DatasetXXX_Name``."""
    return f"Dataset{dataset_id:03d}"


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` of id ``dataset_id`` (1..999) and ``name``."""
    return f"{dataset_label(dataset_id)}_{name}"


def image_file_name(case: str, file_ending: str, channel: int = 0) -> str:
    """``CASE_XXXX.ext``: the file of one input channel of a raw case (labels are ``CASE.ext``)."""
    return f"{case}_{channel:04d}{file_ending}"


def plans_file_name(plans_identifier: str) -> str:
    """``nnUNetPlans.json`` for ``nnUNetPlans``: the plans file in the preprocessed dataset folder."""
    return f"{plans_identifier}.json"


def preprocessed_data_folder_name(plans_identifier: str, configuration: str) -> str:
    """``nnUNetPlans_2d``: where nnU-Net preprocesses a configuration's cases (its default data identifier)."""
    return f"{plans_identifier}_{configuration}"


def parse_dataset_folder_name(folder_name: str) -> tuple[int, str] | None:
    """``DatasetXXX_Name`` -> (XXX, Name) (Name may be empty), None if it is not a dataset folder name."""
    m = _DATASET_FOLDER.match(folder_name)
    return (int(m.group(1)), m.group(2)) if m else None


def dataset_folders_with_id(root: Path | None, dataset_id: int) -> list[Path]:
    """The ``DatasetXXX_*`` entries of ``root`` with id ``dataset_id``, sorted ([] if ``root`` is no folder)."""
    if root is None or not Path(root).is_dir():
        return []
    return sorted(Path(root).glob(dataset_folder_name(dataset_id, "*")))


def find_free_dataset_id(*roots: Path | None, start: int = 950) -> int:
    """Smallest id >= ``start`` not used by a ``DatasetXXX_*`` folder in any of ``roots``."""
    used = set()
    for root in roots:
        if root is not None and Path(root).is_dir():
            used |= {parsed[0] for p in Path(root).iterdir() if (parsed := parse_dataset_folder_name(p.name))}
    for candidate in range(max(start, 1), 1000):
        if candidate not in used:
            return candidate
    raise RuntimeError(f"no free nnU-Net dataset id in [{start}, 999]")


def refuse_existing_dataset(raw_root: Path, dataset_id: int) -> None:
    """Before writing a new dataset: ``dataset_id`` must be 1..999 and unused in ``raw_root``.

    Raises ValueError for an id nnU-Net cannot name, FileExistsError (saying what to do) for a used one.
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    existing = dataset_folders_with_id(raw_root, dataset_id)
    if existing:
        raise FileExistsError(
            f"{existing[0]} exists already; nothing was written. Pick a free id "
            f"(nnunet_selfreg.nnunet_folders.find_free_dataset_id(nnUNet_raw, nnUNet_preprocessed, "
            f"nnUNet_results)) or delete that folder yourself if you mean to rebuild it."
        )


# --------------------------------------------------------------------------- model and fold folders


def model_folder_name(trainer: str, plans_identifier: str, configuration: str) -> str:
    """``TRAINER__PLANS__CONFIGURATION``, the folder ``nnUNetv2_train`` writes a model to."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    return convert_trainer_plans_config_to_identifier(trainer, plans_identifier, configuration)


def parse_model_folder_name(folder_name: str) -> tuple[str, str, str] | None:
    """``TRAINER__PLANS__CONFIGURATION`` -> its three (non-empty) parts, else None."""
    parts = folder_name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def fold_name(fold: int | str) -> str:
    """``fold_X`` (``X`` a number or ``all``): the name of a fold's folder."""
    return f"{FOLD_PREFIX}{fold}"


def fold_folder(model_folder: Path, fold: int | str) -> Path:
    """``model_folder/fold_X`` (``X`` a number or ``all``)."""
    return Path(model_folder) / fold_name(fold)


def validation_summary(fold_dir: Path) -> Path:
    """``fold_X/validation/summary.json``: nnU-Net's scores of the fold's validation cases."""
    return Path(fold_dir) / VALIDATION_FOLDER / SUMMARY_JSON


def training_logs(fold_dir: Path) -> list[Path]:
    """The fold's ``training_log_*.txt`` files (one per start of the training), oldest first."""
    if not Path(fold_dir).is_dir():
        return []
    return sorted(Path(fold_dir).glob(TRAINING_LOG_GLOB), key=lambda p: p.stat().st_mtime)


def fold_folders(model_folder: Path) -> list[Path]:
    """The ``fold_X`` folders of a model folder (``X`` a number or ``all``), sorted by name."""
    return sorted(p for p in Path(model_folder).iterdir() if p.is_dir() and _FOLD_FOLDER.match(p.name))


def parse_fold(text: str) -> int | str:
    """A fold as nnU-Net names it: a number >= 0 or ``all``; ValueError saying so otherwise."""
    if text == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold < 0:
        raise ValueError(f"fold {text!r} is neither a number nor 'all' (nnU-Net's folds are 0, 1, ... and all)")
    return fold


def is_fold_folder_name(name: str) -> bool:
    """Whether ``name`` is a fold folder's name (``fold_0``, ``fold_12``, ``fold_all``)."""
    return bool(_FOLD_FOLDER.match(name))
