"""Unlabelled training cases for semi-supervised trainers (SS-Net) in nnU-Net's raw format.

nnU-Net has no notion of unlabelled cases. Here an unlabelled case is an ordinary training case whose
label map is entirely nnU-Net's *ignore label* (``labels["ignore"]`` in dataset.json, which nnU-Net
requires to be the highest label value), so ``nnUNetv2_plan_and_preprocess`` handles it unchanged. The
ids of the unlabelled cases are recorded in dataset.json under :data:`SEMISUPERVISED_KEY`; nnU-Net
copies dataset.json into ``nnUNet_preprocessed``, where the trainer reads it back with
:func:`unlabeled_cases`.

Cross-validation: the labelled cases are split by nnU-Net's own ``generate_crossval_split``; every
unlabelled case joins the ``train`` list of every fold and never ``val`` (:func:`semi_supervised_splits`).

The papers' protocol (keep 5 % or 10 % of the labels) is ``keep_labels``: N labelled cases (a seeded
draw) keep their labels, the others become unlabelled cases and their real label maps are withheld in
``labelsTr_withheld/`` (nnU-Net never reads that folder), so their predictions can still be scored.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np

from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    IMAGES_TR,
    IMAGES_TS,
    LABELS_TR,
    SPLITS_JSON,
    dataset_folder_name,
    dataset_folders_with_id,
    image_file_name,
    parse_dataset_folder_name,
)

SEMISUPERVISED_KEY = "nnunet_selfreg"
README_NAME = "README_semisupervised.txt"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SAFE_PREFIX = re.compile(r"^[A-Za-z0-9_.-]*$")
_TIFF_ENDINGS = (".tif", ".tiff")

ProgressCallback = Callable[[int, int, str], None]


class SemiSupervisedDataError(ValueError):
    """Bad input for semi-supervised data; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- dataset.json


def unlabeled_cases(dataset_json: dict) -> list[str]:
    """Sorted ids of the unlabelled cases recorded in ``dataset_json``; [] if it records none."""
    entry = dataset_json.get(SEMISUPERVISED_KEY)
    if entry is None:
        return []
    ids = entry.get("unlabeled_cases") if isinstance(entry, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise SemiSupervisedDataError(
            f'{DATASET_JSON} entry "{SEMISUPERVISED_KEY}" is malformed: it must be an object whose "unlabeled_cases" '
            "is a list of case identifiers (strings); rebuild the dataset with nnunet-selfreg add-unlabeled or fix "
            f"{DATASET_JSON} (in nnUNet_raw, then preprocess again)"
        )
    if len(set(ids)) != len(ids):
        raise SemiSupervisedDataError(
            f'{DATASET_JSON} entry "{SEMISUPERVISED_KEY}.unlabeled_cases" lists a case more than once; '
            f"fix {DATASET_JSON}"
        )
    return sorted(ids)


def ignore_label_value(dataset_json: dict) -> int | None:
    """``labels["ignore"]`` of ``dataset_json``, or None if the dataset has no ignore label."""
    value = dataset_json.get("labels", {}).get("ignore")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SemiSupervisedDataError(
            f'{DATASET_JSON} labels["ignore"] is {value!r}: nnU-Net needs one integer, the highest label value'
        )
    return value


# --------------------------------------------------------------------------- splits


def semi_supervised_splits(
    labeled: Sequence[str], unlabeled: Sequence[str], n_splits: int = 5, seed: int = 12345
) -> list[dict[str, list[str]]]:
    """nnU-Net's cross-validation split of the (sorted) labelled cases; all unlabelled cases added to every train."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    labeled_ids, unlabeled_ids = sorted(labeled), sorted(unlabeled)
    if n_splits < 2:
        raise SemiSupervisedDataError(f"n_splits must be at least 2, got {n_splits}")
    for what, ids in (("labelled", labeled_ids), ("unlabelled", unlabeled_ids)):
        if len(set(ids)) != len(ids):
            raise SemiSupervisedDataError(f"the {what} cases list a case more than once")
    if not unlabeled_ids:
        raise SemiSupervisedDataError(
            "no unlabelled cases: a semi-supervised trainer needs some; add them with nnunet-selfreg add-unlabeled"
        )
    overlap = sorted(set(labeled_ids) & set(unlabeled_ids))
    if overlap:
        raise SemiSupervisedDataError(
            f"{len(overlap)} case(s) are both labelled and unlabelled ({', '.join(overlap[:5])}"
            f"{', ...' if len(overlap) > 5 else ''}); fix the unlabeled_cases list in {DATASET_JSON}"
        )
    if len(labeled_ids) < n_splits:
        raise SemiSupervisedDataError(
            f"{len(labeled_ids)} labelled case(s) cannot be split into {n_splits} folds: add labelled cases, or "
            f"write your own {SPLITS_JSON} (into the dataset's nnUNet_preprocessed folder) with the unlabelled "
            "cases in every 'train' list and never in 'val'"
        )
    splits = generate_crossval_split(labeled_ids, seed=seed, n_splits=n_splits)
    return [{"train": [str(c) for c in s["train"]] + unlabeled_ids, "val": [str(c) for c in s["val"]]} for s in splits]


def check_semi_supervised_split(split: dict, unlabeled: Collection[str], fold: int | str, splits_file: str) -> None:
    """Refuse a fold whose val holds unlabelled cases or whose train lacks labelled or unlabelled cases."""
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val")):
        raise SemiSupervisedDataError(f"fold {fold} of {splits_file} has no 'train' and 'val' lists; fix or remove it")
    unlabeled_set = set(unlabeled)
    in_val = sorted(set(split["val"]) & unlabeled_set)
    if in_val:
        raise SemiSupervisedDataError(
            f"fold {fold} of {splits_file} validates on {len(in_val)} unlabelled case(s) ({', '.join(in_val[:3])}"
            f"{', ...' if len(in_val) > 3 else ''}), which have no labels. The file was probably written by a stock "
            "trainer that does not know about unlabelled cases: move it away so that this trainer writes "
            "semi-supervised splits, or fix it by hand (unlabelled cases belong in 'train' only)"
        )
    train = set(split["train"])
    if not train - unlabeled_set:
        raise SemiSupervisedDataError(
            f"fold {fold} of {splits_file} has no labelled case in 'train'; fix the file or move it away so that "
            "this trainer writes semi-supervised splits"
        )
    if not train & unlabeled_set:
        raise SemiSupervisedDataError(
            f"fold {fold} of {splits_file} has no unlabelled case in 'train', so a semi-supervised trainer has "
            "nothing to learn from; move the file away so that this trainer writes semi-supervised splits, or add "
            "the unlabelled cases to 'train' by hand"
        )


# --------------------------------------------------------------------------- building a dataset


def _label_values(labels: dict) -> dict[str, int]:
    """Label name -> value; refuses region-based (list/tuple) and non-integer definitions."""
    regions = sorted(k for k, v in labels.items() if isinstance(v, list | tuple))
    if regions:
        raise SemiSupervisedDataError(
            f"the dataset uses region-based labels ({', '.join(regions)}): SS-Net needs mutually exclusive softmax "
            "classes; convert the labels to plain integer classes first"
        )
    bad = sorted(k for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int))
    if bad:
        raise SemiSupervisedDataError(f"{DATASET_JSON} labels {', '.join(bad)} are not integers; fix {DATASET_JSON}")
    return dict(labels)


def _num_channels(dataset_json: dict) -> int:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise SemiSupervisedDataError(f'{DATASET_JSON} has no "channel_names"; it is not an nnU-Net v2 {DATASET_JSON}')
    return len(channels)


def _read_source(folder: Path) -> dict:
    missing = [n for n in (IMAGES_TR, LABELS_TR) if not (folder / n).is_dir()]
    missing += [] if (folder / DATASET_JSON).is_file() else [DATASET_JSON]
    if missing:
        raise SemiSupervisedDataError(
            f"{folder} is not an nnU-Net raw dataset: {', '.join(missing)} missing "
            f"(expected {IMAGES_TR}/, {LABELS_TR}/ and {DATASET_JSON})"
        )
    dataset_json = read_json(folder / DATASET_JSON, SemiSupervisedDataError)
    if "dataset" in dataset_json:
        raise SemiSupervisedDataError(
            f'{folder / DATASET_JSON} lists its files under a "dataset" key: such datasets are unsupported; '
            f"use the {IMAGES_TR}/{LABELS_TR} layout"
        )
    for key in ("labels", "file_ending"):
        if key not in dataset_json:
            raise SemiSupervisedDataError(f'{folder / DATASET_JSON} has no "{key}"; fix {DATASET_JSON}')
    if dataset_json.get("regions_class_order") is not None:
        raise SemiSupervisedDataError(
            "the dataset defines regions_class_order (region-based training): SS-Net needs softmax classes"
        )
    return dataset_json


def _split_channel(stem: str) -> tuple[str, str] | None:
    m = _CHANNEL_FILE.match(stem)
    return (m.group("case"), m.group("channel")) if m else None


def _source_cases(images: Path, labels: Path, ending: str) -> tuple[list[str], list[str]]:
    """Case ids of the source (nnU-Net's own lookup) and the channel indices its images use."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    ids = [str(i) for i in get_identifiers_from_splitted_dataset_folder(str(images), ending)]
    if not ids:
        raise SemiSupervisedDataError(f"{images} holds no images ending with {ending}")
    unnamed = sorted(f.name for f in images.glob(f"*{ending}") if not _split_channel(f.name[: -len(ending)]))
    if unnamed:
        raise SemiSupervisedDataError(
            f"{images} holds images not named CASE_XXXX{ending} as nnU-Net requires ({', '.join(unnamed[:3])})"
        )
    missing = [i for i in ids if not (labels / f"{i}{ending}").is_file()]
    if missing:
        raise SemiSupervisedDataError(
            f"{labels} lacks the label files of {len(missing)} case(s) ({', '.join(missing[:5])}); fix the source "
            "dataset (nnUNetv2_plan_and_preprocess --verify_dataset_integrity checks it)"
        )
    channels = {_split_channel(f.name[: -len(ending)])[1] for f in images.glob(f"*{ending}")}
    return ids, sorted(channels)


def _unlabeled_files(folder: Path, ending: str, channels: list[str]) -> dict[str, dict[str, Path]]:
    """Case id -> {channel: file} of the unlabelled folder; every case must have exactly ``channels``."""
    if not folder.is_dir():
        raise SemiSupervisedDataError(f"the unlabelled image folder {folder} does not exist or is not a folder")
    files = sorted(f for f in folder.iterdir() if f.name.endswith(ending) and f.name[0] != "." and f.is_file())
    if not files:
        raise SemiSupervisedDataError(f"{folder} holds no images ending with {ending} (the dataset's file_ending)")
    single = channels == ["0000"]
    cases: dict[str, dict[str, Path]] = {}
    unnamed = []
    for f in files:
        stem = f.name[: -len(ending)]
        parts = _split_channel(stem)
        if single and (parts is None or parts[1] != "0000"):
            parts = (stem, "0000")  # single channel: a file without _0000 is a case of its own
        if parts is None:
            unnamed.append(f.name)
            continue
        case, channel = parts
        if channel in cases.setdefault(case, {}):
            raise SemiSupervisedDataError(
                f"{folder} holds two images of case {case!r} ({cases[case][channel].name} and {f.name}); keep one"
            )
        cases[case][channel] = f
    if unnamed:
        raise SemiSupervisedDataError(
            f"the dataset has {len(channels)} image files per case, so unlabelled images need nnU-Net's naming "
            f"CASE_XXXX{ending} (XXXX = {', '.join(channels)}); not named so: {', '.join(unnamed[:5])}"
            f"{', ...' if len(unnamed) > 5 else ''}"
        )
    if single:
        multi = sorted(c for c in cases if (p := _split_channel(c)) and p[0] in cases)
        if multi:
            raise SemiSupervisedDataError(
                f"the dataset has one image per case, but {folder} looks multi-channel ({multi[0]}{ending} beside "
                f"{image_file_name(_split_channel(multi[0])[0], ending)}); give one image per case"
            )
        return cases
    problems = []
    for case, found in sorted(cases.items()):
        lacking = [f"{case}_{c}{ending}" for c in channels if c not in found]
        extra = [found[c].name for c in found if c not in channels]
        if lacking:
            problems.append(f"missing {', '.join(lacking)}")
        if extra:
            problems.append(f"unexpected {', '.join(extra)}")
    if problems:
        raise SemiSupervisedDataError(
            f"every unlabelled case needs the channels {', '.join(channels)} like the labelled ones: "
            f"{'; '.join(problems[:6])}{'; ...' if len(problems) > 6 else ''}"
        )
    return cases


def _readme(
    source: str, unlabeled_images: Path | None, n_labeled: int, n_unlabeled: int, ignore: int, prefix: str
) -> str:
    origin = f"from {unlabeled_images.resolve()}" if unlabeled_images is not None else "(labels stripped, see below)"
    return (
        "Semi-supervised nnU-Net dataset written by nnunet-selfreg add-unlabeled.\n\n"
        f"Source dataset: {source} ({n_labeled} labelled case(s), images and labels copied unchanged).\n"
        f"Unlabelled images: {n_unlabeled} case(s) {origin}"
        f"{f', case ids prefixed with {prefix!r}' if prefix else ''}.\n"
        f"Each unlabelled case has a label map of its image's geometry filled with the ignore label {ignore} "
        f'({DATASET_JSON} labels["ignore"]), so nnU-Net plans and preprocesses it like any case.\n'
        f'{DATASET_JSON} "{SEMISUPERVISED_KEY}"."unlabeled_cases" lists them; semi-supervised trainers '
        "(nnUNetTrainerSSNet) put them in the 'train' list of every fold and never in 'val'; the labelled cases\n"
        "are split as nnU-Net splits them. Stock nnU-Net trainers would train on them as empty (all-ignore) cases\n"
        "and could validate on them: use nnUNetTrainer_LabeledOnly for the supervised baseline.\n"
        "Note: nnU-Net's dataset fingerprint counts every voxel whose label is > 0 as foreground, so the\n"
        "unlabelled images' intensities enter its foreground statistics (used by CT normalisation only).\n"
        f"{IMAGES_TS} of the source was not copied.\n"
    )


WITHHELD_DIR = "labelsTr_withheld"


def keep_count(spec: int | str, n_labeled: int) -> int:
    """Labelled cases to keep: ``N`` or ``P%`` of ``n_labeled`` (rounded, at least 1); at least one must go."""
    text = str(spec).strip()
    try:
        n = round(float(text[:-1]) / 100 * n_labeled) if text.endswith("%") else int(text)
        if text.endswith("%"):
            n = max(n, 1)
    except ValueError:
        raise SemiSupervisedDataError(
            f"--keep-labels {spec!r}: give a number of cases (e.g. 4) or a share (10%)"
        ) from None
    if not 1 <= n < n_labeled:
        raise SemiSupervisedDataError(
            f"--keep-labels {spec}: keeps {n} of {n_labeled} labelled cases; keep at least 1 and strip at least 1"
        )
    return n


def build_semi_supervised_dataset(
    labeled_dataset: Path,
    unlabeled_images: Path | None,
    raw_root: Path,
    dataset_id: int,
    name: str | None = None,
    prefix: str = "",
    progress: ProgressCallback | None = None,
    keep_labels: int | str | None = None,
    keep_seed: int = 12345,
) -> Path:
    """Write ``raw_root/DatasetXXX_name``: the labelled dataset plus all-ignore cases for the unlabelled images.

    ``keep_labels`` (``N`` or ``P%``): only that many labelled cases (drawn with ``keep_seed``) keep their
    labels; the others become unlabelled, their label maps moved to ``labelsTr_withheld/``.
    ``unlabeled_images`` may then be None. The dataset is assembled in a hidden temporary folder beside
    the target and moved into place at the end, so a failure leaves nothing behind; an existing target or
    dataset id is never overwritten.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if unlabeled_images is None and keep_labels is None:
        raise SemiSupervisedDataError("give a folder of unlabelled images, or --keep-labels to strip labels")
    source, raw_root = Path(labeled_dataset), Path(raw_root)
    unlabeled_images = Path(unlabeled_images) if unlabeled_images is not None else None
    report = progress or (lambda done, total, message: None)
    src_json = _read_source(source)
    ending = str(src_json["file_ending"])
    labels = _label_values(src_json["labels"])
    n_channels = _num_channels(src_json)

    parsed = parse_dataset_folder_name(source.name)
    name = name if name is not None else f"{parsed[1] if parsed and parsed[1] else source.name}SemiSup"
    if not _SAFE_NAME.match(name):
        raise SemiSupervisedDataError(f"dataset name {name!r} is not usable: use letters, digits, '_', '-', '.'")
    if not _SAFE_PREFIX.match(prefix):
        raise SemiSupervisedDataError(f"prefix {prefix!r} is not usable: use letters, digits, '_', '-', '.'")
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise SemiSupervisedDataError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    target = raw_root / dataset_folder_name(dataset_id, name)
    used = dataset_folders_with_id(raw_root, dataset_id)
    if target.exists() or used:
        raise SemiSupervisedDataError(
            f"{used[0] if used else target} exists already; nothing was written. Choose a free dataset id "
            "(this tool never overwrites a dataset)"
        )

    images_src, labels_src = source / IMAGES_TR, source / LABELS_TR
    ids, channels = _source_cases(images_src, labels_src, ending)
    previous_unlabeled = unlabeled_cases(src_json)
    labeled_ids = sorted(set(ids) - set(previous_unlabeled))
    if not labeled_ids:
        raise SemiSupervisedDataError(f"{source} has no labelled case")
    withheld: list[str] = []
    if keep_labels is not None:
        n_keep = keep_count(keep_labels, len(labeled_ids))
        order = np.random.default_rng(keep_seed).permutation(len(labeled_ids))
        withheld = sorted(labeled_ids[i] for i in order[n_keep:])
        labeled_ids = sorted(labeled_ids[i] for i in order[:n_keep])
    found = _unlabeled_files(unlabeled_images, ending, channels) if unlabeled_images is not None else {}
    new_ids = {f"{prefix}{case}": case for case in found}
    clash = sorted(set(new_ids) & set(ids))
    if clash:
        raise SemiSupervisedDataError(
            f"{len(clash)} unlabelled case id(s) are already cases of {source.name} ({', '.join(clash[:5])}"
            f"{', ...' if len(clash) > 5 else ''}); give them a prefix, e.g. --prefix unl_"
        )

    ignore = ignore_label_value(src_json)
    new_labels = dict(labels)
    if ignore is None:
        ignore = max(labels.values()) + 1
        new_labels["ignore"] = ignore
    try:
        LabelManager(new_labels, regions_class_order=None)  # nnU-Net's own checks (ignore = highest label)
    except (AssertionError, ValueError, TypeError) as e:
        raise SemiSupervisedDataError(f"{DATASET_JSON} labels are not usable with an ignore label ({e})") from None

    example = images_src / f"{labeled_ids[0]}_{channels[0]}{ending}"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            reader_writer = determine_reader_writer_from_dataset_json(src_json, str(example), verbose=False)
            example_image, _ = reader_writer().read_images([str(example)])
    except Exception as e:  # nnU-Net raises RuntimeError or whatever the imaging library raises
        raise SemiSupervisedDataError(f"nnU-Net cannot read the labelled image {example} ({e})") from None
    example_is_2d = example_image.shape[1] == 1

    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    total, done = len(ids) + len(new_ids), 0
    try:
        (tmp / IMAGES_TR).mkdir(parents=True)
        (tmp / LABELS_TR).mkdir()
        for sub in (IMAGES_TR, LABELS_TR):
            for f in sorted((source / sub).iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / sub / f.name)
        if withheld:
            (tmp / WITHHELD_DIR).mkdir()
        for case in withheld:  # keep the real labels aside, train on an all-ignore map
            label_file = tmp / LABELS_TR / f"{case}{ending}"
            shutil.move(label_file, tmp / WITHHELD_DIR / label_file.name)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                seg, properties = reader_writer().read_seg(str(tmp / WITHHELD_DIR / label_file.name))
            blank = np.full(seg.shape[1:], ignore, dtype=np.uint8 if ignore < 255 else np.uint16)
            reader_writer().write_seg(blank, str(label_file), properties)
        done = len(ids)
        report(done, total, f"copied the {len(ids)} cases of {source.name}")
        for new_id, case in sorted(new_ids.items()):
            copied = []
            for channel, src in sorted(found[case].items()):
                dest = tmp / IMAGES_TR / f"{new_id}_{channel}{ending}"
                shutil.copy2(src, dest)
                copied.append(str(dest))
            aux = unlabeled_images / f"{case}.json"
            if ending.lower() in _TIFF_ENDINGS and aux.is_file():  # Tiff3DIO's spacing file
                shutil.copy2(aux, tmp / IMAGES_TR / f"{new_id}.json")
            names = ", ".join(p.name for _, p in sorted(found[case].items()))
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    image, properties = reader_writer().read_images(copied)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SemiSupervisedDataError(
                    f"nnU-Net's {reader_writer.__name__} cannot read the unlabelled image {names} ({first})"
                ) from None
            if image.shape[0] != n_channels:
                raise SemiSupervisedDataError(
                    f"unlabelled image {names} has {image.shape[0]} channel(s); the dataset has {n_channels}"
                )
            if (image.shape[1] == 1) != example_is_2d:
                raise SemiSupervisedDataError(
                    f"unlabelled image {names} is {'2D' if image.shape[1] == 1 else '3D'}, the labelled images are "
                    f"{'2D' if example_is_2d else '3D'}"
                )
            seg = np.full(image.shape[1:], ignore, dtype=np.uint8 if ignore < 255 else np.uint16)
            reader_writer().write_seg(seg, str(tmp / LABELS_TR / f"{new_id}{ending}"), properties)
            done += 1
            report(done, total, f"added unlabelled case {new_id} ({names})")

        unlabeled_ids = sorted(set(previous_unlabeled) | set(new_ids) | set(withheld))
        dataset_json = copy.deepcopy(src_json)
        dataset_json["labels"] = new_labels
        dataset_json["numTraining"] = len(ids) + len(new_ids)
        if "name" in dataset_json:
            dataset_json["name"] = name
        dataset_json[SEMISUPERVISED_KEY] = {
            "unlabeled_cases": unlabeled_ids,
            "labeled_cases": len(labeled_ids),
            "source_dataset": source.name,
            "unlabeled_source": str(unlabeled_images.resolve()) if unlabeled_images is not None else None,
            "prefix": prefix,
            "ignore_label": ignore,
        }
        if withheld:
            dataset_json[SEMISUPERVISED_KEY]["withheld_labels"] = {
                "folder": WITHHELD_DIR,
                "cases": withheld,
                "kept": labeled_ids,
                "keep_labels": str(keep_labels),
                "seed": keep_seed,
            }
        (tmp / DATASET_JSON).write_text(json.dumps(dataset_json, indent=4) + "\n")
        readme = _readme(source.name, unlabeled_images, len(labeled_ids), len(unlabeled_ids), ignore, prefix)
        if withheld:
            readme += (
                f"\nLabels kept: {len(labeled_ids)} case(s) (--keep-labels {keep_labels}, seed {keep_seed}); the "
                f"labels of the other {len(withheld)} source case(s) are in {WITHHELD_DIR}/ (not used by nnU-Net): "
                "score predictions of those cases against them, e.g. with nnUNetv2_evaluate_folder.\n"
            )
        (tmp / README_NAME).write_text(readme)
        if target.exists() or dataset_folders_with_id(raw_root, dataset_id):
            raise SemiSupervisedDataError(f"{target} appeared while it was being written; nothing was overwritten")
        os.rename(tmp, target)
    except OSError as e:
        raise SemiSupervisedDataError(f"writing {target} failed ({e}); nothing was left behind") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
