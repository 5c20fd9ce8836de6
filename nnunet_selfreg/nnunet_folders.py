"""nnU-Net's folder conventions, in one place: environment folders, dataset, model and fold folder names.

nnU-Net keeps its data in three folders named by environment variables (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``), datasets in ``DatasetXXX_Name`` folders, trained models in
``TRAINER__PLANS__CONFIGURATION`` folders with one ``fold_X`` folder per fold. Every tool of this package
reads or writes these folders; keeping the conventions here means one place to look when nnU-Net's change,
and the same clear error everywhere when a folder is not set. Where nnU-Net has the function itself
(dataset id lookup, the model folder name) it is called rather than re-implemented.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_selfreg.errors import UserError

__all__ = [
    "ENV_VARS",
    "MODEL_FOLDER_LAYOUT",
    "dataset_folder_name",
    "dataset_folders_with_id",
    "env_folder",
    "find_free_dataset_id",
    "fold_folder",
    "fold_folders",
    "is_fold_folder_name",
    "model_folder_name",
    "parse_dataset_folder_name",
    "parse_fold",
    "refuse_existing_dataset",
    "parse_model_folder_name",
    "require_env_folder",
    "resolve_dataset",
    "unset_message",
]

#: nnU-Net's folder variables, in the order of its documentation
ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: where a trained model folder lies (for messages)
MODEL_FOLDER_LAYOUT = "nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION"

_ENV_ROLES = {
    "nnUNet_raw": "the folder with the raw DatasetXXX_* datasets",
    "nnUNet_preprocessed": "the folder nnUNetv2_plan_and_preprocess writes to",
    "nnUNet_results": "the folder nnUNetv2_train writes to",
}
_DATASET_FOLDER = re.compile(r"^Dataset(\d{3})_(.*)$", re.DOTALL)
_FOLD_FOLDER = re.compile(r"^fold_(\d+|all)$")


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


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` of id ``dataset_id`` (1..999) and ``name``."""
    return f"Dataset{dataset_id:03d}_{name}"


def parse_dataset_folder_name(folder_name: str) -> tuple[int, str] | None:
    """``DatasetXXX_Name`` -> (XXX, Name) (Name may be empty), None if it is not a dataset folder name."""
    m = _DATASET_FOLDER.match(folder_name)
    return (int(m.group(1)), m.group(2)) if m else None


def dataset_folders_with_id(root: Path | None, dataset_id: int) -> list[Path]:
    """The ``DatasetXXX_*`` entries of ``root`` with id ``dataset_id``, sorted ([] if ``root`` is no folder)."""
    if root is None or not Path(root).is_dir():
        return []
    return sorted(Path(root).glob(f"Dataset{dataset_id:03d}_*"))


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


def fold_folder(model_folder: Path, fold: int | str) -> Path:
    """``model_folder/fold_X`` (``X`` a number or ``all``)."""
    return Path(model_folder) / f"fold_{fold}"


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
