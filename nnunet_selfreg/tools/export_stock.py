"""``nnunet-selfreg export-stock``: a copy of a trained model folder that stock nnU-Net predicts with.

nnU-Net's predictor reads ``trainer_name`` from each checkpoint and looks that class up by name, so a
model trained with ``nnUNetTrainerSelfReg`` needs this package wherever it is used, although its
network and weights are nnU-Net's own. This tool copies the model folder (``plans.json``,
``dataset.json``, ``dataset_fingerprint.json`` and every ``fold_*/checkpoint_*.pth``; the rest with
``--all``) into a new folder and rewrites each checkpoint's ``trainer_name`` to ``nnUNetTrainer``;
every other entry (weights, ``init_args``, logging, mirroring axes) is kept as it is. Before anything is
written, each checkpoint's weights are loaded ``strict=True`` into the network that the stock trainer
builds from ``plans.json``, so the export refuses models whose trainer changed the architecture.

Checkpoints are read with ``torch.load(weights_only=True)``; nnU-Net's NumPy scalars are allowed
explicitly (:func:`numpy_safe_globals`) and nothing else, so a file that would run code when unpickled
is refused, not loaded. The source is never modified; an existing output is refused; each file is
written to a temporary name and moved into place, and a failed export removes what it created.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    CHECKPOINT_GLOB,
    DATASET_JSON,
    FINAL_CHECKPOINT,
    FINGERPRINT_JSON,
    FOLD_PREFIX,
    PLANS_JSON,
    PROGRESS_PNG,
    VALIDATION_FOLDER,
    fold_folders,
    is_fold_folder_name,
)
from nnunet_selfreg.outputs import write_file_atomically

STOCK_TRAINER = "nnUNetTrainer"
REQUIRED_FILES = (PLANS_JSON, DATASET_JSON)
OPTIONAL_FILES = (FINGERPRINT_JSON,)
CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name")
#: plans may only name classes from these packages for the export to build the network and check the weights
SAFE_ARCH_PREFIXES = ("dynamic_network_architectures.",)
SAFE_IMPORT_PREFIXES = ("torch.nn.",)
_CHECKPOINT_FILE = re.compile(r"^checkpoint_[A-Za-z0-9_.-]+\.pth$")


class UnsafeCheckpointError(UserError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses (even with NumPy allowed)."""


def numpy_safe_globals() -> list[Any]:
    """What nnU-Net's checkpoints need beyond torch's weights-only defaults: NumPy numeric scalars.

    The scalar reconstructor, ``numpy.dtype`` and the dtype classes of booleans, integers and floats;
    not the object dtype, so no arbitrary Python object can come back through them.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import scalar
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqBHILQefd"}
    return [scalar, np.dtype, *sorted(dtype_classes, key=str)]


def load_checkpoint_safely(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU, allowing NumPy scalars only if the plain load refuses them."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"but got (<[^>]+>)", str(e))
        if found is None:  # not a refused object but a stream the weights-only unpickler cannot parse
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            raise UserError(
                f"{path} cannot be read as a PyTorch checkpoint ({detail.group(1) if detail else 'unpickling failed'}"
                "): a damaged file, or not a checkpoint; it was not loaded any less safely either"
            ) from None
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors, plain containers and NumPy numbers (it refers to "
            f"{found.group(1)}); it was not loaded, because unpickling it could run code from the file. Export "
            "only models you trained yourself or whose source you trust, and re-save them from a trusted nnU-Net "
            "installation."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as a PyTorch checkpoint ({first})") from None


def find_checkpoints(model: Path) -> list[Path]:
    """Every regular ``fold_*/checkpoint_*.pth`` file of ``model`` (symbolic links are not followed)."""
    found = []
    for fold in fold_folders(model):
        if not fold.is_symlink():
            found += [
                f
                for f in sorted(fold.iterdir())
                if _CHECKPOINT_FILE.match(f.name) and f.is_file() and not f.is_symlink()
            ]
    return found


def _hint(folder: Path) -> str:
    """The model folders inside ``folder`` (a dataset's results folder), and what its other run folders are."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / PLANS_JSON).is_file())
    trained = [p.name for p in runs if find_checkpoints(p)]
    untrained = [p.name for p in runs if p.name not in trained]
    hint = f"; it holds the model folders {', '.join(trained)}: pass one of them" if trained else ""
    if untrained:
        hint += (
            f"; {', '.join(untrained)} {'has' if len(untrained) == 1 else 'have'} no "
            f"{FOLD_PREFIX}*/{CHECKPOINT_GLOB} (a training stopped before it saved one, or still in its first epoch): "
            "not a model to export"
        )
    return hint


def check_model_folder(model: Path) -> list[Path]:
    """Refuse anything but a trained nnU-Net model folder, with a hint; return its checkpoints."""
    if not model.exists():
        raise UserError(f"{model} does not exist")
    if not model.is_dir():
        raise UserError(f"{model} is not a folder: pass a trained model folder (Trainer__Plans__configuration)")
    if is_fold_folder_name(model.name) and (model.parent / PLANS_JSON).is_file():
        raise UserError(f"{model} is one fold of a model: pass the model folder {model.parent}")
    missing = [name for name in REQUIRED_FILES if not (model / name).is_file()]
    if missing:
        raise UserError(f"{model} is not a trained nnU-Net model folder: {', '.join(missing)} missing{_hint(model)}")
    checkpoints = find_checkpoints(model)
    if not checkpoints:
        raise UserError(
            f"{model} has no {FOLD_PREFIX}*/{CHECKPOINT_GLOB}: it is not a trained model (yet); "
            "train a fold with nnUNetv2_train first"
        )
    return checkpoints


def _inside(root: Path, path: Path) -> bool:
    root, path = root.resolve(), path.resolve()
    return path == root or root in path.parents


def check_output_folder(model: Path, output: Path) -> None:
    """The output must be new and must not lie inside the source (which is never modified)."""
    if output.exists() or output.is_symlink():
        raise UserError(f"{output} exists already: the export never writes into an existing folder; name a new one")
    if _inside(model, output):
        raise UserError(f"{output} lies inside the model folder {model}, which is never modified: choose another place")


def stock_checkpoint(checkpoint: dict, path: Path) -> dict:
    """The same checkpoint with ``trainer_name`` = ``nnUNetTrainer``; every other entry is the original object."""
    lacking = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if lacking:
        raise UserError(f"{path} is not an nnU-Net training checkpoint: it lacks {', '.join(lacking)}")
    if not isinstance(checkpoint["init_args"], dict) or "configuration" not in checkpoint["init_args"]:
        raise UserError(f"{path} is not an nnU-Net training checkpoint: init_args lacks 'configuration'")
    return {**checkpoint, "trainer_name": STOCK_TRAINER}


class StockNetworkCheck:
    """Loads weights ``strict=True`` into the network that stock nnU-Net builds from ``plans.json``."""

    def __init__(self, plans: dict, dataset_json: dict) -> None:
        self.plans = plans
        self.dataset_json = dataset_json
        self._networks: dict[str, Any] = {}
        self.skipped: set[str] = set()

    def _unsafe_names(self, configuration: str) -> list[str]:
        arch = self.plans.get("configurations", {}).get(configuration, {}).get("architecture", {})
        names = [str(arch.get("network_class_name", ""))] if "network_class_name" in arch else []
        bad = [n for n in names if not n.startswith(SAFE_ARCH_PREFIXES)]
        kwargs = arch.get("arch_kwargs", {})
        for key in arch.get("_kw_requires_import", []):
            value = kwargs.get(key)
            if value is not None and not str(value).startswith(SAFE_IMPORT_PREFIXES):
                bad.append(str(value))
        return bad

    def _network(self, configuration: str):
        if configuration not in self._networks:
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            plans_manager = PlansManager(self.plans)
            try:
                config = plans_manager.get_configuration(configuration)
            except (KeyError, RuntimeError, ValueError) as e:
                raise UserError(f"{PLANS_JSON} has no usable configuration {configuration!r} ({e})") from None
            self._networks[configuration] = nnUNetTrainer.build_network_architecture(
                plans_manager,
                config,
                determine_num_input_channels(plans_manager, config, self.dataset_json),
                plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads,
                enable_deep_supervision=False,
            )
        return self._networks[configuration]

    def __call__(self, checkpoint: dict, path: Path) -> bool:
        """True if checked, False if skipped because the plans name classes outside the safe packages."""
        configuration = str(checkpoint["init_args"]["configuration"])
        unsafe = self._unsafe_names(configuration)
        if unsafe:
            self.skipped.add(f"{configuration} (plans name {', '.join(unsafe)})")
            return False
        try:
            self._network(configuration).load_state_dict(checkpoint["network_weights"], strict=True)
        except (RuntimeError, TypeError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(
                f"{path}: its weights do not fit the network that the stock nnUNetTrainer builds from {PLANS_JSON} "
                f"({first}). Its trainer changes the architecture, so stock nnU-Net cannot predict with it."
            ) from None
        return True


def _copy(src: Path, dest: Path, output: Path) -> None:
    if not _inside(output, dest):  # cannot happen with names from os.scandir; kept as a guard
        raise UserError(f"refusing to write {dest} outside {output}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(dest, lambda tmp: shutil.copy2(src, tmp))


def _other_files(model: Path, handled: set[Path]) -> tuple[list[Path], list[Path]]:
    """Regular files under ``model`` not in ``handled`` (and no other ``.pth``), and the links skipped."""
    files, links = [], []
    for root, dirs, names in os.walk(model, followlinks=False):
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                links.append(Path(root) / d)
                dirs.remove(d)
        for name in names:
            p = Path(root) / name
            if p.is_symlink():
                links.append(p)
            elif p.is_file() and p not in handled and not name.endswith(".pth"):
                files.append(p)
    return sorted(files), sorted(links)


def export_stock(model: Path, output: Path, copy_all: bool = False, verbose: bool = True) -> list[Path]:
    """Export ``model`` into the new folder ``output``; returns the files written (relative to ``output``)."""
    model, output = Path(os.path.abspath(model)), Path(os.path.abspath(output))
    checkpoints = check_model_folder(model)
    check_output_folder(model, output)
    plans, dataset_json = read_json(model / PLANS_JSON), read_json(model / DATASET_JSON)
    check = StockNetworkCheck(plans, dataset_json)
    say = print if verbose else (lambda *a, **k: None)

    import torch

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.mkdir()
    except FileExistsError:
        raise UserError(f"{output} exists already: name a new folder") from None
    except OSError as e:
        raise UserError(f"cannot create {output} ({e.strerror})") from None
    written: list[Path] = []
    try:
        plain = [model / n for n in (*REQUIRED_FILES, *OPTIONAL_FILES) if (model / n).is_file()]
        for src in plain:
            _copy(src, output / src.name, output)
            written.append(Path(src.name))
        for src in checkpoints:
            rel = src.relative_to(model)
            original = load_checkpoint_safely(src)
            converted = stock_checkpoint(original, src)
            verified = check(converted, src)
            dest = output / rel
            if not _inside(output, dest):
                raise UserError(f"refusing to write {dest} outside {output}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(dest, lambda tmp, c=converted: torch.save(c, tmp))
            written.append(rel)
            say(
                f"  {rel}: trainer_name {original['trainer_name']} -> {STOCK_TRAINER}, epoch "
                f"{original.get('current_epoch', '?')}{'' if verified else ' (weights not checked)'}"
            )
            del original, converted
        if copy_all:
            files, links = _other_files(model, set(plain) | set(checkpoints))
            for src in files:
                rel = src.relative_to(model)
                _copy(src, output / rel, output)
                written.append(rel)
            for link in links:
                say(f"  skipped the symbolic link {link.relative_to(model)}")
    except OSError as e:
        shutil.rmtree(output, ignore_errors=True)  # we created it: leave nothing half-written
        raise UserError(f"writing {output} failed ({e}); the partial copy was removed") from None
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    if check.skipped:
        say(f"  note: weights not checked against the stock network for {'; '.join(sorted(check.skipped))}")
    return written


def predict_command(output: Path, checkpoints: list[Path]) -> str:
    """The stock command that predicts with the exported folds (``checkpoint_final.pth`` when every fold has one)."""
    names = {p.name for p in checkpoints}
    chk = FINAL_CHECKPOINT
    if not all((p.parent / chk).is_file() for p in checkpoints):
        chk = FINAL_CHECKPOINT if chk in names else sorted(names)[0]
    folds = sorted(
        {p.parent.name.removeprefix(FOLD_PREFIX) for p in checkpoints if p.name == chk},
        key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f),
    )
    extra = "" if chk == FINAL_CHECKPOINT else f" -chk {chk}"
    return f"nnUNetv2_predict_from_modelfolder -i INPUT_FOLDER -o OUTPUT_FOLDER -m {output} -f {' '.join(folds)}{extra}"


def run(args: argparse.Namespace) -> int:
    model, output = Path(args.model_folder), Path(args.output_folder)
    print(f"exporting {os.path.abspath(model)} -> {os.path.abspath(output)}")
    written = export_stock(model, output, copy_all=args.all)
    checkpoints = [output.absolute() / p for p in written if p.suffix == ".pth"]
    print(f"wrote {len(written)} files. Predict with stock nnU-Net (no nnunet-selfreg needed):")
    print(f"  {predict_command(output.absolute(), checkpoints)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-stock",
        help="copy a trained model folder so that stock nnU-Net (without this package) predicts with it",
        description=(
            f"Copy MODEL_FOLDER ({PLANS_JSON}, {DATASET_JSON}, {FINGERPRINT_JSON}, {FOLD_PREFIX}*/{CHECKPOINT_GLOB}) "
            "into the new OUTPUT_FOLDER, with each checkpoint's trainer_name set to nnUNetTrainer. Then: "
            "nnUNetv2_predict_from_modelfolder -i IN -o OUT -m OUTPUT_FOLDER -f FOLDS"
        ),
    )
    p.add_argument("model_folder", metavar="MODEL_FOLDER", help="e.g. $nnUNet_results/Dataset004_X/Trainer__Plans__2d")
    p.add_argument("output_folder", metavar="OUTPUT_FOLDER", help="a folder that does not exist yet")
    p.add_argument(
        "--all",
        action="store_true",
        help=f"also copy the other files (training logs, {PROGRESS_PNG}, {VALIDATION_FOLDER}/)",
    )
    p.set_defaults(func=run)
