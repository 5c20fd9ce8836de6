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
from dataclasses import dataclass
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
#: where ``keep_labels`` puts the withheld label maps (beside nnU-Net's labelsTr, which nnU-Net reads alone)
WITHHELD_DIR = f"{LABELS_TR}_withheld"
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


@dataclass
class _Build:
    """What the new dataset holds, all checked before its first file is written."""

    source: Path
    source_json: dict
    target: Path
    name: str
    prefix: str
    ending: str
    ids: list[str]  # every case of the source, copied unchanged
    labeled: list[str]  # source cases that keep their labels
    withheld: list[str]  # source cases whose labels go to WITHHELD_DIR (keep_labels)
    previous_unlabeled: list[str]  # unlabelled cases the source had already
    new_ids: dict[str, str]  # new case id -> its name in unlabeled_images
    unlabeled_files: dict[str, dict[str, Path]]  # name in unlabeled_images -> {channel: file}
    unlabeled_images: Path | None
    labels: dict[str, int]  # the new dataset's labels, the ignore label included
    ignore: int
    reader_writer: type  # nnU-Net's reader/writer of the dataset's files
    is_2d: bool
    n_channels: int
    keep_labels: int | str | None
    keep_seed: int

    @property
    def unlabeled(self) -> list[str]:
        return sorted(set(self.previous_unlabeled) | set(self.new_ids) | set(self.withheld))


def _checked_name(source: Path, name: str | None, prefix: str) -> str:
    """The new dataset's name (``<source name>SemiSup`` by default), and a usable case-id prefix."""
    parsed = parse_dataset_folder_name(source.name)
    name = name if name is not None else f"{parsed[1] if parsed and parsed[1] else source.name}SemiSup"
    if not _SAFE_NAME.match(name):
        raise SemiSupervisedDataError(f"dataset name {name!r} is not usable: use letters, digits, '_', '-', '.'")
    if not _SAFE_PREFIX.match(prefix):
        raise SemiSupervisedDataError(f"prefix {prefix!r} is not usable: use letters, digits, '_', '-', '.'")
    return name


def _free_target(raw_root: Path, dataset_id: int, name: str) -> Path:
    """``raw_root/DatasetXXX_name``, refused if it or another dataset with this id exists."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise SemiSupervisedDataError(f"nnU-Net dataset ids have three digits (1..999), got {dataset_id}")
    target = raw_root / dataset_folder_name(dataset_id, name)
    used = dataset_folders_with_id(raw_root, dataset_id)
    if target.exists() or used:
        raise SemiSupervisedDataError(
            f"{used[0] if used else target} exists already; nothing was written. Choose a free dataset id "
            "(this tool never overwrites a dataset)"
        )
    return target


def _labels_to_keep(labeled: list[str], keep_labels: int | str | None, seed: int) -> tuple[list[str], list[str]]:
    """(cases that keep their labels, cases whose labels are withheld): a seeded draw of ``keep_labels``."""
    if keep_labels is None:
        return labeled, []
    n_keep = keep_count(keep_labels, len(labeled))
    order = np.random.default_rng(seed).permutation(len(labeled))
    return sorted(labeled[i] for i in order[:n_keep]), sorted(labeled[i] for i in order[n_keep:])


def _new_case_ids(found: dict[str, dict[str, Path]], prefix: str, source: Path, ids: list[str]) -> dict[str, str]:
    """New case id -> unlabelled image name; an id the source uses already is refused."""
    new_ids = {f"{prefix}{case}": case for case in found}
    clash = sorted(set(new_ids) & set(ids))
    if clash:
        raise SemiSupervisedDataError(
            f"{len(clash)} unlabelled case id(s) are already cases of {source.name} ({', '.join(clash[:5])}"
            f"{', ...' if len(clash) > 5 else ''}); give them a prefix, e.g. --prefix unl_"
        )
    return new_ids


def _labels_with_ignore(source_json: dict, labels: dict[str, int]) -> tuple[dict[str, int], int]:
    """The labels with an ignore label (the source's, or a new highest one), checked by nnU-Net itself."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    ignore = ignore_label_value(source_json)
    new_labels = dict(labels)
    if ignore is None:
        ignore = max(labels.values()) + 1
        new_labels["ignore"] = ignore
    try:
        LabelManager(new_labels, regions_class_order=None)  # nnU-Net's own checks (ignore = highest label)
    except (AssertionError, ValueError, TypeError) as e:
        raise SemiSupervisedDataError(f"{DATASET_JSON} labels are not usable with an ignore label ({e})") from None
    return new_labels, ignore


def _reader_writer(source_json: dict, example: Path) -> tuple[type, bool]:
    """nnU-Net's reader/writer for the dataset's files, and whether its images are 2D (read from ``example``)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            reader_writer = determine_reader_writer_from_dataset_json(source_json, str(example), verbose=False)
            example_image, _ = reader_writer().read_images([str(example)])
    except Exception as e:  # nnU-Net raises RuntimeError or whatever the imaging library raises
        raise SemiSupervisedDataError(f"nnU-Net cannot read the labelled image {example} ({e})") from None
    return reader_writer, example_image.shape[1] == 1


def _plan_build(
    source: Path,
    unlabeled_images: Path | None,
    raw_root: Path,
    dataset_id: int,
    name: str | None,
    prefix: str,
    keep_labels: int | str | None,
    keep_seed: int,
) -> _Build:
    """Every check of the inputs, in the order a user meets them; nothing is written."""
    source_json = _read_source(source)
    ending = str(source_json["file_ending"])
    labels = _label_values(source_json["labels"])
    n_channels = _num_channels(source_json)
    name = _checked_name(source, name, prefix)
    target = _free_target(raw_root, dataset_id, name)
    ids, channels = _source_cases(source / IMAGES_TR, source / LABELS_TR, ending)
    previous_unlabeled = unlabeled_cases(source_json)
    labeled = sorted(set(ids) - set(previous_unlabeled))
    if not labeled:
        raise SemiSupervisedDataError(f"{source} has no labelled case")
    labeled, withheld = _labels_to_keep(labeled, keep_labels, keep_seed)
    found = _unlabeled_files(unlabeled_images, ending, channels) if unlabeled_images is not None else {}
    new_ids = _new_case_ids(found, prefix, source, ids)
    new_labels, ignore = _labels_with_ignore(source_json, labels)
    example = source / IMAGES_TR / f"{labeled[0]}_{channels[0]}{ending}"
    reader_writer, is_2d = _reader_writer(source_json, example)
    return _Build(
        source, source_json, target, name, prefix, ending, ids, labeled, withheld, previous_unlabeled, new_ids,
        found, unlabeled_images, new_labels, ignore, reader_writer, is_2d, n_channels, keep_labels, keep_seed,
    )  # fmt: skip


def _all_ignore(shape: tuple[int, ...], ignore: int) -> np.ndarray:
    return np.full(shape, ignore, dtype=np.uint8 if ignore < 255 else np.uint16)


def _copy_source(build: _Build, tmp: Path) -> None:
    """The source's images and labels, unchanged; withheld labels set aside and replaced by all-ignore maps."""
    (tmp / IMAGES_TR).mkdir(parents=True)
    (tmp / LABELS_TR).mkdir()
    for sub in (IMAGES_TR, LABELS_TR):
        for f in sorted((build.source / sub).iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / sub / f.name)
    if build.withheld:
        (tmp / WITHHELD_DIR).mkdir()
    for case in build.withheld:  # keep the real labels aside, train on an all-ignore map
        label_file = tmp / LABELS_TR / f"{case}{build.ending}"
        shutil.move(label_file, tmp / WITHHELD_DIR / label_file.name)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            seg, properties = build.reader_writer().read_seg(str(tmp / WITHHELD_DIR / label_file.name))
        build.reader_writer().write_seg(_all_ignore(seg.shape[1:], build.ignore), str(label_file), properties)


def _add_unlabeled_case(build: _Build, tmp: Path, new_id: str) -> str:
    """Copy one unlabelled case's images, check them with nnU-Net's reader, write its all-ignore label map.

    Returns the names of its image files (for the progress line).
    """
    case, ending, reader_writer = build.new_ids[new_id], build.ending, build.reader_writer
    files = build.unlabeled_files[case]
    copied = []
    for channel, src in sorted(files.items()):
        dest = tmp / IMAGES_TR / f"{new_id}_{channel}{ending}"
        shutil.copy2(src, dest)
        copied.append(str(dest))
    aux = build.unlabeled_images / f"{case}.json"
    if ending.lower() in _TIFF_ENDINGS and aux.is_file():  # Tiff3DIO's spacing file
        shutil.copy2(aux, tmp / IMAGES_TR / f"{new_id}.json")
    names = ", ".join(p.name for _, p in sorted(files.items()))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            image, properties = reader_writer().read_images(copied)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SemiSupervisedDataError(
            f"nnU-Net's {reader_writer.__name__} cannot read the unlabelled image {names} ({first})"
        ) from None
    if image.shape[0] != build.n_channels:
        raise SemiSupervisedDataError(
            f"unlabelled image {names} has {image.shape[0]} channel(s); the dataset has {build.n_channels}"
        )
    if (image.shape[1] == 1) != build.is_2d:
        raise SemiSupervisedDataError(
            f"unlabelled image {names} is {'2D' if image.shape[1] == 1 else '3D'}, the labelled images are "
            f"{'2D' if build.is_2d else '3D'}"
        )
    seg = _all_ignore(image.shape[1:], build.ignore)
    reader_writer().write_seg(seg, str(tmp / LABELS_TR / f"{new_id}{ending}"), properties)
    return names


def _new_dataset_json(build: _Build) -> dict:
    """The source's dataset.json with the ignore label, the new case count and name, and our entry."""
    dataset_json = copy.deepcopy(build.source_json)
    dataset_json["labels"] = build.labels
    dataset_json["numTraining"] = len(build.ids) + len(build.new_ids)
    if "name" in dataset_json:
        dataset_json["name"] = build.name
    images = build.unlabeled_images
    dataset_json[SEMISUPERVISED_KEY] = {
        "unlabeled_cases": build.unlabeled,
        "labeled_cases": len(build.labeled),
        "source_dataset": build.source.name,
        "unlabeled_source": str(images.resolve()) if images is not None else None,
        "prefix": build.prefix,
        "ignore_label": build.ignore,
    }
    if build.withheld:
        dataset_json[SEMISUPERVISED_KEY]["withheld_labels"] = {
            "folder": WITHHELD_DIR,
            "cases": build.withheld,
            "kept": build.labeled,
            "keep_labels": str(build.keep_labels),
            "seed": build.keep_seed,
        }
    return dataset_json


def _build_readme(build: _Build) -> str:
    readme = _readme(
        build.source.name, build.unlabeled_images, len(build.labeled), len(build.unlabeled), build.ignore, build.prefix
    )
    if build.withheld:
        readme += (
            f"\nLabels kept: {len(build.labeled)} case(s) (--keep-labels {build.keep_labels}, seed {build.keep_seed}); "
            f"the labels of the other {len(build.withheld)} source case(s) are in {WITHHELD_DIR}/ (not used by "
            "nnU-Net): score predictions of those cases against them, e.g. with nnUNetv2_evaluate_folder.\n"
        )
    return readme


def _write_build(build: _Build, tmp: Path, report: ProgressCallback) -> None:
    """The whole new dataset, in the folder ``tmp``."""
    total = len(build.ids) + len(build.new_ids)
    _copy_source(build, tmp)
    report(len(build.ids), total, f"copied the {len(build.ids)} cases of {build.source.name}")
    for done, new_id in enumerate(sorted(build.new_ids), start=len(build.ids) + 1):
        names = _add_unlabeled_case(build, tmp, new_id)
        report(done, total, f"added unlabelled case {new_id} ({names})")
    (tmp / DATASET_JSON).write_text(json.dumps(_new_dataset_json(build), indent=4) + "\n")
    (tmp / README_NAME).write_text(_build_readme(build))


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
    if unlabeled_images is None and keep_labels is None:
        raise SemiSupervisedDataError("give a folder of unlabelled images, or --keep-labels to strip labels")
    raw_root = Path(raw_root)
    images = Path(unlabeled_images) if unlabeled_images is not None else None
    build = _plan_build(Path(labeled_dataset), images, raw_root, dataset_id, name, prefix, keep_labels, keep_seed)
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f".{build.target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_build(build, tmp, progress or (lambda done, total, message: None))
        if build.target.exists() or dataset_folders_with_id(raw_root, dataset_id):
            raise SemiSupervisedDataError(
                f"{build.target} appeared while it was being written; nothing was overwritten"
            )
        os.rename(tmp, build.target)
    except OSError as e:
        raise SemiSupervisedDataError(f"writing {build.target} failed ({e}); nothing was left behind") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return build.target
