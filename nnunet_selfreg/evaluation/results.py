"""Reading nnU-Net result folders (``summary.json`` and predictions) and pairing their cases.

Two folder layouts are understood:

* ``folds``: a trainer folder ``{Trainer}__{Plans}__{config}`` with ``fold_{f}/validation/summary.json``
  and the predictions beside it (what ``nnUNetv2_train`` writes);
* ``merged``: a folder holding one ``summary.json`` and the predictions of all cases, such as
  ``ensembles/ensemble___...`` (``nnUNetv2_find_best_configuration``) or a trainer's
  ``crossval_results_folds_0_1_2_3_4``. Its cases are assigned to folds like the other models' cases
  (or by ``splits_final.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_selfreg import nnunet_folders
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.evaluation.model import Arm, CaseTable
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    CROSSVAL_RESULTS_PREFIX,
    DATASET_JSON,
    DEBUG_JSON,
    DEFAULT_PLANS,
    FINAL_CHECKPOINT,
    FOLD_PREFIX,
    GT_SEGMENTATIONS,
    PLANS_JSON,
    SPLITS_JSON,
    SUMMARY_JSON,
    env_folder,
    fold_folder,
    fold_folders,
    fold_name,
    model_folder_name,
    parse_model_folder_name,
    require_env_folder,
    validation_summary,
)

DEFAULT_FOLDS = (0, 1, 2, 3, 4)
FOLDS_LAYOUT = "folds"
MERGED_LAYOUT = "merged"
#: per-case numbers taken from summary.json (per label)
SUMMARY_METRICS = ("Dice", "IoU", "n_ref", "n_pred")
_MEAN_TOLERANCE = 1e-6
TRAINING_LENGTH_KEYS = ("num_epochs", "num_iterations_per_epoch")
#: readers of images that carry no spacing (nnU-Net gives them spacing 1): distances are in pixels
PIXEL_READERS = ("NaturalImage2DIO",)
PIXEL_FILE_ENDINGS = (".png", ".bmp")


class CompareInputError(UserError, ValueError):
    """Bad or inconsistent input; the message says what is wrong and what to do."""


@dataclass
class CaseResult:
    """One validation case of one model, as nnU-Net evaluated it."""

    case: str
    fold: int | None
    prediction_file: Path
    reference_file: str
    metrics: dict[str, dict[str, float]]


@dataclass
class ModelResults:
    """The validation results of one trainer (or ensemble) folder."""

    name: str
    folder: Path
    layout: str
    plans: dict
    dataset_json: dict
    trainer: str | None = None
    plans_identifier: str | None = None
    configuration: str | None = None
    cases: dict[str, CaseResult] = field(default_factory=dict)

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]


@dataclass
class Comparison:
    """Models whose validation cases are paired by case identifier, in ``cases`` order (fold, case)."""

    dataset: str
    configuration: str
    plans_identifier: str
    folds: list[int]
    models: list[ModelResults]
    labels: list[str]
    label_names: dict[str, str]
    cases: list[str]
    case_folds: dict[str, int]
    reader: str
    ignore_label: int | None
    results_folder: Path
    preprocessed_folder: Path | None
    notes: list[str] = field(default_factory=list)
    arms: list[Arm] = field(default_factory=list)  # empty: each model is an arm of one run

    def __post_init__(self) -> None:
        if not self.arms:
            self.arms = [Arm(m.name, [m.name]) for m in self.models]

    @property
    def baseline(self) -> ModelResults:
        return self.models[0]

    @property
    def spatial_unit(self) -> str:
        """ "px" where the images carry no spacing (2D PNG/BMP, nnU-Net's ``NaturalImage2DIO``), else "mm"."""
        ending = self.baseline.file_ending.lower()
        return "px" if self.reader in PIXEL_READERS or ending in PIXEL_FILE_ENDINGS else "mm"

    def arm_of(self, run: str) -> str:
        return next(a.name for a in self.arms if run in a.runs)

    def values(self, model: ModelResults, metric: str, label: str) -> np.ndarray:
        """Per-case values of ``metric`` for ``label`` from summary.json, in ``cases`` order."""
        return np.array([model.cases[c].metrics[label][metric] for c in self.cases], dtype=float)


# --------------------------------------------------------------------------- folders


def resolve_dataset(dataset: str) -> str:
    """Dataset id or name -> ``DatasetXXX_Name`` (nnU-Net's own lookup)."""
    return nnunet_folders.resolve_dataset(dataset, CompareInputError)


def locate_model(dataset_folder: Path, entry: str, plans_identifier: str, configuration: str) -> ModelResults:
    """Find the results folder of a ``-tr`` entry: a trainer name, or a folder under ``dataset_folder``."""
    standard = dataset_folder / model_folder_name(entry, plans_identifier, configuration)
    direct = dataset_folder / entry
    if standard.is_dir():
        folder, trainer, plans_id, config = standard, entry, plans_identifier, configuration
    elif "__" in entry or os.sep in entry or "/" in entry or Path(entry).is_absolute():
        if not direct.is_dir():
            raise CompareInputError(f"{entry!r}: no such folder {direct}{_available(dataset_folder)}")
        folder = direct
        trainer, plans_id, config = parse_model_folder_name(direct.name) or (None, None, None)
    else:
        raise CompareInputError(
            f"no results for trainer {entry!r}: {standard} does not exist. Train it with "
            f"`nnUNetv2_train {dataset_folder.name} {configuration} FOLD -tr {entry} -p {plans_identifier}`, "
            f"or give an existing folder name{_available(dataset_folder)}"
        )
    if folder == standard or fold_folders(folder):  # a trainer folder: missing folds are reported later
        layout = FOLDS_LAYOUT
    elif (folder / SUMMARY_JSON).is_file():
        layout = MERGED_LAYOUT
    else:
        raise CompareInputError(
            f"{folder} holds neither {FOLD_PREFIX}* folders nor a {SUMMARY_JSON}: not an nnU-Net results folder"
        )
    dataset_json = _load_json_file(folder / DATASET_JSON, DATASET_JSON)
    if not isinstance(dataset_json.get("file_ending"), str) or not isinstance(dataset_json.get("labels"), dict):
        raise CompareInputError(f"{folder}/{DATASET_JSON} lacks 'file_ending' or 'labels'")
    return ModelResults(
        name=entry,
        folder=folder,
        layout=layout,
        plans=_load_json_file(folder / PLANS_JSON, PLANS_JSON),
        dataset_json=dataset_json,
        trainer=trainer,
        plans_identifier=plans_id,
        configuration=config,
    )


def _available(dataset_folder: Path) -> str:
    skip = ("ensembles", "compare_", ".")
    names = sorted(p.name for p in dataset_folder.iterdir() if p.is_dir() and not p.name.startswith(skip))
    ensembles = dataset_folder / "ensembles"
    if ensembles.is_dir():
        names += sorted(f"ensembles/{p.name}" for p in ensembles.iterdir() if p.is_dir())
    return f". Existing result folders: {', '.join(names)}" if names else ""


def _load_json_file(path: Path, what: str) -> dict:
    return read_json(path, CompareInputError, missing=f"every nnU-Net results folder has its {what}")


# --------------------------------------------------------------------------- summary.json


def _bad_summary(path: Path, problem: str) -> CompareInputError:
    return CompareInputError(
        f"{path} is not a valid nnU-Net {SUMMARY_JSON}: {problem}. Do not edit it by hand; re-create it "
        f"with `nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER --val` (or nnUNetv2_evaluate_folder)"
    )


def _number(path: Path, where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_summary(path, f"{where} is {value!r}, not a number (nnU-Net writes NaN as the bare JSON token NaN)")
    if math.isinf(value):
        raise _bad_summary(path, f"{where} is infinite")
    return float(value)


def _case_metrics(path: Path, where: str, metrics: object, labels: list[str]) -> dict[str, dict[str, float]]:
    if not isinstance(metrics, dict):
        raise _bad_summary(path, f"{where}['metrics'] is missing or not an object")
    if set(metrics) != set(labels):
        raise _bad_summary(
            path, f"{where} has labels {sorted(metrics)}, but {DATASET_JSON} defines {labels} (foreground)"
        )
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        entry = metrics[label]
        if not isinstance(entry, dict):
            raise _bad_summary(path, f"{where}['metrics']['{label}'] is not an object")
        values = {}
        for key in SUMMARY_METRICS:
            if key not in entry:
                raise _bad_summary(path, f"{where}['metrics']['{label}'] lacks '{key}'")
            values[key] = _number(path, f"{where}['metrics']['{label}']['{key}']", entry[key])
        for key in ("Dice", "IoU"):
            if not math.isnan(values[key]) and not 0.0 <= values[key] <= 1.0:
                raise _bad_summary(path, f"{where}['metrics']['{label}']['{key}'] = {values[key]} is outside [0, 1]")
        empty = values["n_ref"] == 0 and values["n_pred"] == 0
        if empty != math.isnan(values["Dice"]):
            raise _bad_summary(path, f"{where}['metrics']['{label}']: Dice must be NaN exactly when n_ref = n_pred = 0")
        out[label] = values
    return out


def case_id(prediction_file: str, file_ending: str) -> str | None:
    """Case identifier from a prediction file path (any OS separator), None if the ending differs."""
    name = re.split(r"[\\/]", prediction_file)[-1]
    return name[: -len(file_ending)] if name.endswith(file_ending) and len(name) > len(file_ending) else None


def load_summary(path: Path, file_ending: str, labels: list[str], fold: int | None) -> dict[str, CaseResult]:
    """Validate an nnU-Net ``summary.json`` and return its cases by identifier."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise _bad_summary(path, f"cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise _bad_summary(path, f"invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(data, dict):
        raise _bad_summary(path, "the top level is not a JSON object")
    for key in ("metric_per_case", "mean", "foreground_mean"):
        if key not in data:
            raise _bad_summary(path, f"key '{key}' is missing")
    per_case = data["metric_per_case"]
    if not isinstance(per_case, list) or not per_case:
        raise _bad_summary(path, "'metric_per_case' is not a non-empty list")
    cases: dict[str, CaseResult] = {}
    for i, entry in enumerate(per_case):
        where = f"metric_per_case[{i}]"
        if not isinstance(entry, dict):
            raise _bad_summary(path, f"{where} is not an object")
        pred, ref = entry.get("prediction_file"), entry.get("reference_file")
        if not isinstance(pred, str) or not isinstance(ref, str):
            raise _bad_summary(path, f"{where} lacks 'prediction_file' or 'reference_file'")
        case = case_id(pred, file_ending)
        if case is None:
            raise _bad_summary(path, f"{where}['prediction_file'] = {pred!r} does not end with {file_ending!r}")
        if case in cases:
            raise _bad_summary(path, f"case {case!r} is listed twice")
        metrics = _case_metrics(path, where, entry.get("metrics"), labels)
        cases[case] = CaseResult(case, fold, path.parent / f"{case}{file_ending}", ref, metrics)
    _check_means(path, data, cases, labels)
    return cases


def _check_means(path: Path, data: dict, cases: dict[str, CaseResult], labels: list[str]) -> None:
    """The stored means must be nnU-Net's means of the per-case values (catches hand edits)."""
    means = data["mean"]
    if not isinstance(means, dict) or set(means) != set(labels):
        raise _bad_summary(path, f"'mean' must have exactly the labels {labels}")
    per_label = {}
    for label in labels:
        if not isinstance(means[label], dict):
            raise _bad_summary(path, f"'mean']['{label}'] is not an object")
        for metric in ("Dice", "IoU"):
            stored = _number(path, f"['mean']['{label}']['{metric}']", means[label].get(metric))
            values = np.array([c.metrics[label][metric] for c in cases.values()])
            computed = nan_mean(values)
            if metric == "Dice":
                per_label[label] = computed
            if not _close(stored, computed):
                raise _bad_summary(
                    path, f"['mean']['{label}']['{metric}'] = {stored} but the per-case values average {computed}"
                )
    fg = data["foreground_mean"]
    if not isinstance(fg, dict):
        raise _bad_summary(path, "'foreground_mean' is not an object")
    stored = _number(path, "['foreground_mean']['Dice']", fg.get("Dice"))
    computed = float(np.mean([per_label[label] for label in labels if label != "0"]))
    if not _close(stored, computed):
        raise _bad_summary(path, f"['foreground_mean']['Dice'] = {stored} but the per-label means average {computed}")


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= _MEAN_TOLERANCE


def nan_mean(values: np.ndarray) -> float:
    """Mean ignoring NaN (nnU-Net's ``np.nanmean``), NaN without a warning when nothing is left."""
    values = np.asarray(values, dtype=float)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


# --------------------------------------------------------------------------- labels


def label_keys(model: ModelResults) -> tuple[list[str], dict[str, str], int | None]:
    """Foreground label (or region) keys as summary.json spells them, their names, the ignore label."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        lm = PlansManager(model.plans).get_label_manager(model.dataset_json)
    except Exception as e:  # nnU-Net raises assorted errors for malformed label dicts
        raise CompareInputError(f"{model.folder}: {DATASET_JSON}/{PLANS_JSON} labels are unusable ({e})") from None
    regions = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    keys = [label_or_region_to_key(r) for r in regions]
    names = {}
    for name, value in model.dataset_json["labels"].items():
        if lm.has_regions:
            key = label_or_region_to_key(tuple(value) if isinstance(value, list) else value)
        else:
            key = label_or_region_to_key(int(value[0] if isinstance(value, (list, tuple)) else value))
        names[key] = name
    return keys, {k: names.get(k, k) for k in keys}, lm.ignore_label


# --------------------------------------------------------------------------- loading and pairing


def _has_validation(model: ModelResults, fold: int) -> bool:
    return validation_summary(fold_folder(model.folder, fold)).is_file()


def _folds_present(model: ModelResults) -> list[int]:
    numbers = [p.name.removeprefix(FOLD_PREFIX) for p in fold_folders(model.folder)]
    return sorted(int(n) for n in numbers if n.isdigit() and _has_validation(model, int(n)))


def _fold_list(folds: list[int]) -> str:
    return f"fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}"


def missing_folds_message(model: ModelResults, folds: list[int], dataset: str) -> str:
    """Which of ``folds`` ``model`` lacks, and the command that produces them."""
    fold = str(folds[0]) if len(folds) == 1 else "FOLD"
    if model.trainer is None:
        return f"{model.name} lacks {_fold_list(folds)} (no {validation_summary(fold_name('F'))} in {model.folder})"
    cmd = f"nnUNetv2_train {dataset} {model.configuration} {fold} -tr {model.trainer} -p {model.plans_identifier}"
    trained = [f for f in folds if (fold_folder(model.folder, f) / FINAL_CHECKPOINT).is_file()]
    if trained == folds:
        return f"{model.name} lacks the validation of {_fold_list(folds)}: run `{cmd} --val`"
    return f"{model.name} lacks {_fold_list(folds)}: `{cmd}` would produce {'it' if len(folds) == 1 else 'each'}"


def _check_folds(models: list[ModelResults], folds: list[int], dataset: str) -> None:
    """One short error naming what each model lacks and the folds that every model has."""
    trained = [m for m in models if m.layout == FOLDS_LAYOUT]
    lacking = {m.name: [f for f in folds if not _has_validation(m, f)] for m in trained}
    problems = [missing_folds_message(m, lacking[m.name], dataset) for m in trained if lacking[m.name]]
    if not problems:
        return
    common = sorted(set.intersection(*(set(_folds_present(m)) for m in trained)))
    hint = (
        f"folds every model has: {', '.join(map(str, common))} (compare them with -f {' '.join(map(str, common))})"
        if common
        else "no fold is complete in every model"
    )
    raise CompareInputError(f"missing folds: {'; '.join(problems)}. {hint}")


def _load_models(models: list[ModelResults], folds: list[int], labels: list[str], dataset: str) -> None:
    _check_folds(models, folds, dataset)
    for m in models:
        if m.layout == MERGED_LAYOUT:
            m.cases = load_summary(m.folder / SUMMARY_JSON, m.file_ending, labels, None)
            continue
        for f in folds:
            summary = validation_summary(fold_folder(m.folder, f))
            fold_cases = load_summary(summary, m.file_ending, labels, f)
            twice = sorted(set(fold_cases) & set(m.cases))
            if twice:
                raise CompareInputError(
                    f"{m.name}: cases {twice[:5]} are validated in more than one fold; cross-validation "
                    f"folds must not overlap (was {SPLITS_JSON} changed between folds?)"
                )
            m.cases.update(fold_cases)


def _fold_sets(model: ModelResults, folds: list[int]) -> dict[int, set[str]]:
    return {f: {c for c, r in model.cases.items() if r.fold == f} for f in folds}


def _describe(cases: set[str]) -> str:
    shown = sorted(cases)
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def read_splits(preprocessed: Path | None) -> list[set[str]] | None:
    """Validation case sets of ``splits_final.json``, None if absent or unreadable."""
    path = preprocessed / SPLITS_JSON if preprocessed else None
    if path is None or not path.is_file():
        return None
    try:
        return [set(s["val"]) for s in read_json(path, expect=list)]
    except (UserError, TypeError, KeyError):
        return None


def _fold_assignment(
    models: list[ModelResults], folds: list[int], splits: list[set[str]] | None
) -> dict[int, set[str]]:
    """Validation cases per fold: from the first fold-layout model, else from splits_final.json."""
    reference = next((m for m in models if m.layout == FOLDS_LAYOUT), None)
    if reference is not None:
        expected = _fold_sets(reference, folds)
        for m in models:
            if m.layout == FOLDS_LAYOUT and m is not reference:
                _check_same_cases(reference, m, expected, _fold_sets(m, folds))
        return expected
    if splits is None:
        raise CompareInputError(
            f"all models are merged folders (ensembles / {CROSSVAL_RESULTS_PREFIX}*): their cases are assigned to "
            f"folds by $nnUNet_preprocessed/DATASET/{SPLITS_JSON}, which cannot be read"
        )
    if max(folds) >= len(splits):
        raise CompareInputError(f"{SPLITS_JSON} has {len(splits)} folds; fold {max(folds)} does not exist")
    return {f: splits[f] for f in folds}


def _check_same_cases(
    ref: ModelResults, other: ModelResults, expected: dict[int, set[str]], got: dict[int, set[str]]
) -> None:
    problems = []
    for f, cases in expected.items():
        extra, lacking = got[f] - cases, cases - got[f]
        if extra or lacking:
            what = [f"has {_describe(extra)} which {ref.name} lacks"] if extra else []
            what += [f"lacks {_describe(lacking)}"] if lacking else []
            problems.append(f"fold {f}: {other.name} " + " and ".join(what))
    if problems:
        raise CompareInputError(
            "the validation cases differ, so the models were trained with different splits "
            f"({SPLITS_JSON}) or the validation is incomplete: {'; '.join(problems)}. Retrain with the "
            f"same {SPLITS_JSON}, or re-run the validation with `nnUNetv2_train ... --val`"
        )


def _assign_merged(model: ModelResults, expected: dict[int, set[str]], notes: list[str]) -> None:
    fold_of = {c: f for f, cases in expected.items() for c in cases}
    lacking = set(fold_of) - set(model.cases)
    if lacking:
        raise CompareInputError(
            f"{model.name} ({model.folder}) lacks {len(lacking)} of the compared cases ({_describe(lacking)}): "
            "was it built from other folds or other splits?"
        )
    outside = len(model.cases) - len(fold_of)
    if outside:
        notes.append(f"{model.name}: {outside} of its cases are not in the compared folds and were ignored.")
    model.cases = {c: r for c, r in model.cases.items() if c in fold_of}
    for c, r in model.cases.items():
        r.fold = fold_of[c]


def _configuration_identity(model: ModelResults, configuration: str) -> dict:
    """The parts of plans.json that define how ``configuration`` was trained (inheritance resolved)."""
    configs = model.plans.get("configurations")
    resolved: dict = {}
    name: str | None = configuration
    seen: list[str] = []
    while name is not None:
        if not isinstance(configs, dict) or name not in configs or name in seen:
            raise CompareInputError(
                f"{model.folder}/{PLANS_JSON} has no (resolvable) configuration {name!r}: was it trained on "
                f"configuration {configuration}?"
            )
        seen.append(name)
        resolved = {**configs[name], **resolved}
        name = configs[name].get("inherits_from")
    resolved.pop("inherits_from", None)
    keys = ("dataset_name", "image_reader_writer", "transpose_forward", "original_median_spacing_after_transp")
    return {"configuration": resolved, **{k: model.plans.get(k) for k in keys}}


def _check_plans(comparison: Comparison) -> None:
    """Models trained on -p/-c must share plans.json's resolved configuration (catches re-planning)."""
    checked = [
        m
        for m in comparison.models
        if m.layout == FOLDS_LAYOUT
        and (m.plans_identifier, m.configuration) == (comparison.plans_identifier, comparison.configuration)
    ]
    for m in comparison.models:
        if m.plans.get("dataset_name") != comparison.dataset:
            raise CompareInputError(
                f"{m.folder}/{PLANS_JSON} belongs to {m.plans.get('dataset_name')!r}, not {comparison.dataset}"
            )
        if m in checked:
            continue
        if m.layout == MERGED_LAYOUT:
            why = "is a merged folder (ensemble or collected cross-validation results)"
        else:
            why = f"uses plans {m.plans_identifier} / configuration {m.configuration}, not the -p/-c given"
        comparison.notes.append(f"{m.name} {why}: only its validation cases were checked, not its {PLANS_JSON}.")
    if len(checked) < 2:
        return
    first = _configuration_identity(checked[0], comparison.configuration)
    for m in checked[1:]:
        other = _configuration_identity(m, comparison.configuration)
        if other != first:
            differing = sorted(
                k
                for k in {**first["configuration"], **other["configuration"]}
                if first["configuration"].get(k) != other["configuration"].get(k)
            )
            differing += [k for k in first if k != "configuration" and first[k] != other[k]]
            raise CompareInputError(
                f"{m.name} and {checked[0].name} were trained with different plans for configuration "
                f"{comparison.configuration} ({PLANS_JSON} differs in: {', '.join(differing)}). Retrain both "
                "after the same nnUNetv2_plan_and_preprocess"
            )


def load_comparison(
    dataset: str,
    configuration: str,
    entries: list[str],
    plans_identifier: str = DEFAULT_PLANS,
    folds: list[int] | tuple[int, ...] = DEFAULT_FOLDS,
    arms: list[Arm] | None = None,
    allow_unequal_training: bool = False,
) -> Comparison:
    """Locate, validate and pair the validation results of ``entries`` (the first is the baseline), grouped
    into ``arms`` (default: one arm per entry); refuse runs trained for different lengths."""
    results_root = require_env_folder("nnUNet_results", CompareInputError)
    name = resolve_dataset(dataset)
    dataset_folder = results_root / name
    if not dataset_folder.is_dir():
        raise CompareInputError(f"no results for {name}: {dataset_folder} does not exist")
    preprocessed_root = env_folder("nnUNet_preprocessed")
    preprocessed = preprocessed_root / name if preprocessed_root else None
    models = [locate_model(dataset_folder, e, plans_identifier, configuration) for e in entries]
    labels, label_names, ignore_label = label_keys(models[0])
    folds = sorted(set(folds))
    _load_models(models, folds, labels, name)
    splits = read_splits(preprocessed)
    expected = _fold_assignment(models, folds, splits)
    notes: list[str] = []
    for m in models:
        if m.layout == MERGED_LAYOUT:
            _assign_merged(m, expected, notes)
    cases = [c for f in folds for c in sorted(expected[f])]
    comparison = Comparison(
        dataset=name,
        configuration=configuration,
        plans_identifier=plans_identifier,
        folds=folds,
        models=models,
        labels=labels,
        label_names=label_names,
        cases=cases,
        case_folds={c: f for f in folds for c in expected[f]},
        reader=models[0].plans.get("image_reader_writer", "SimpleITKIO"),
        ignore_label=ignore_label,
        results_folder=dataset_folder,
        preprocessed_folder=preprocessed,
        notes=notes,
        arms=list(arms or []),
    )
    _check_plans(comparison)
    _note_splits(comparison, expected, splits)
    check_training_lengths(comparison, allow_unequal_training)
    _note_mixed_trainers(comparison)
    return comparison


# --------------------------------------------------------------------------- training lengths


def training_length(model: ModelResults, fold: int) -> tuple[int, int] | None:
    """(epochs, iterations per epoch) of one fold from nnU-Net's ``debug.json``; None if it is not there."""
    path = fold_folder(model.folder, fold) / DEBUG_JSON
    try:
        data = read_json(path)
        return tuple(int(data[k]) for k in TRAINING_LENGTH_KEYS)  # type: ignore[return-value]
    except (UserError, ValueError, KeyError, TypeError):
        return None


def _describe_lengths(lengths: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{who}: {e} epochs x {i} iterations" for who, (e, i) in lengths.items())


def check_training_lengths(comparison: Comparison, allow_unequal: bool = False) -> None:
    """Runs must be trained for as long as each other: every fold of a run, every run of an arm and (unless
    ``allow_unequal``) every arm. ``*_Budget`` trainers take their length from the environment, so runs of
    different lengths can share one trainer name; nnU-Net's ``debug.json`` records the length of each fold."""
    lengths: dict[str, tuple[int, int]] = {}
    unchecked = []
    for m in comparison.models:
        per_fold = {f: training_length(m, f) for f in comparison.folds} if m.layout == FOLDS_LAYOUT else {}
        known = {f"fold {f}": n for f, n in per_fold.items() if n is not None}
        if not known:
            unchecked.append(m.name)
            continue
        if len(set(known.values())) > 1:
            raise CompareInputError(
                f"{m.name} holds folds trained for different lengths ({_describe_lengths(known)}, from "
                f"{DEBUG_JSON}): retrain the odd folds with the same budget (a *_Budget trainer reads it from "
                "NNUNET_SELFREG_BUDGET_EPOCHS / _ITERATIONS)"
            )
        lengths[m.name] = next(iter(known.values()))
    for arm in comparison.arms:
        runs = {r: lengths[r] for r in arm.runs if r in lengths}
        if len(set(runs.values())) > 1:
            raise CompareInputError(
                f"the runs of arm {arm.name} were trained for different lengths ({_describe_lengths(runs)}): "
                "repeated runs must repeat one command; retrain them with the same budget"
            )
    firsts = {a.name: lengths[r] for a in comparison.arms for r in a.runs[:1] if r in lengths}
    if len(set(firsts.values())) > 1:
        if not allow_unequal:
            raise CompareInputError(
                f"the arms were trained for different lengths ({_describe_lengths(firsts)}): a fair comparison "
                "trains each equally long; retrain, or add --allow-unequal-training if the length is what you compare"
            )
        comparison.notes.append(f"the arms were trained for different lengths: {_describe_lengths(firsts)}.")
    if unchecked:
        comparison.notes.append(
            f"training length not checked for {', '.join(unchecked)}: no readable {FOLD_PREFIX}F/{DEBUG_JSON} "
            "(merged folders and copied results lack it)."
        )


def _note_mixed_trainers(comparison: Comparison) -> None:
    from nnunet_selfreg.evaluation.replicates import repeat_of

    by_name = {m.name: m for m in comparison.models}
    for arm in comparison.arms:
        trainers = {repeat_of(by_name[r].trainer) for r in arm.runs if by_name[r].trainer is not None}
        if len(trainers) > 1:
            comparison.notes.append(
                f"arm {arm.name} holds runs of different trainers ({', '.join(sorted(trainers))}): they are "
                "treated as repeats of one command."
            )


def _note_splits(comparison: Comparison, expected: dict[int, set[str]], splits: list[set[str]] | None) -> None:
    if splits is None:
        comparison.notes.append(f"{SPLITS_JSON} not found: the folds were not checked against it.")
        return
    differing = [f for f in comparison.folds if f >= len(splits) or splits[f] != expected[f]]
    if differing:
        comparison.notes.append(
            f"the validation cases of fold(s) {differing} differ from the current {SPLITS_JSON} "
            "(all compared models agree with each other, so the pairing is valid; the splits file may have "
            "been regenerated after training)."
        )


def reference_file(comparison: Comparison, case: str) -> Path:
    """Ground truth of ``case``: nnU-Net's ``gt_segmentations``, else the path recorded in summary.json."""
    base = comparison.baseline
    candidates = []
    if comparison.preprocessed_folder is not None:
        candidates.append(comparison.preprocessed_folder / GT_SEGMENTATIONS / f"{case}{base.file_ending}")
    candidates.append(Path(base.cases[case].reference_file))
    for path in candidates:
        if path.is_file():
            return path
    raise CompareInputError(
        f"the reference segmentation of case {case} was not found (looked for {', '.join(map(str, candidates))}): "
        "set nnUNet_preprocessed, or compare Dice/IoU only (--no-surface, without --instances)"
    )


def prediction_file(model: ModelResults, case: str) -> Path:
    """Prediction of ``case``: the file beside its summary.json (where nnU-Net writes it)."""
    path = model.cases[case].prediction_file
    if path.is_file():
        return path
    raise CompareInputError(
        f"{model.name}: the prediction of case {case} is missing ({path}); re-run the validation with "
        "`nnUNetv2_train ... --val`, or compare without the metrics read from prediction files"
    )


def check_prediction_files(comparison: Comparison, surface: bool, instances: bool) -> None:
    """Before the file metrics start: every prediction they read exists, else one line that says which
    and what to change (add --no-surface for HD95/NSD, drop --instances for the instance metrics)."""
    if not (surface or instances):
        return
    for m in comparison.models:
        missing = [c for c in comparison.cases if not m.cases[c].prediction_file.is_file()]
        if not missing:
            continue
        needs = " and ".join(w for w, on in (("HD95/NSD", surface), ("the instance metrics", instances)) if on)
        fix = " and ".join(o for o, on in (("add --no-surface", surface), ("drop --instances", instances)) if on)
        raise CompareInputError(
            f"{m.name}: the prediction of case {missing[0]} is missing ({m.cases[missing[0]].prediction_file}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}), which {needs} need; re-run the "
            f"validation with `nnUNetv2_train ... --val`, or {fix} to compare Dice/IoU only"
        )


def build_table(comparison: Comparison, surface: dict | None = None) -> CaseTable:
    """Every run's per-case values (``cases`` order): Dice/IoU from summary.json, and the file-based metrics
    in ``surface`` (case -> model -> metric -> label -> value) when given: HD95/NSD per label, instance
    metrics for their one label."""
    values: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for m in comparison.models:
        values[m.name] = {
            metric: {label: comparison.values(m, metric, label) for label in comparison.labels}
            for metric in ("Dice", "IoU")
        }
        if surface is not None:
            first = surface[comparison.cases[0]][m.name]
            for metric, per_label in first.items():
                values[m.name][metric] = {
                    label: np.array([surface[c][m.name][metric][label] for c in comparison.cases], dtype=float)
                    for label in per_label
                }
    folds = np.array([comparison.case_folds[c] for c in comparison.cases])
    return CaseTable(list(comparison.cases), folds, values)


def emptiness(comparison: Comparison) -> dict[str, dict[str, dict[str, int]]]:
    """model -> label -> counts of cases whose reference and/or prediction is empty (from n_ref/n_pred)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for m in comparison.models:
        out[m.name] = {}
        for label in comparison.labels:
            ref_empty = comparison.values(m, "n_ref", label) == 0
            pred_empty = comparison.values(m, "n_pred", label) == 0
            out[m.name][label] = {
                "both_empty": int((ref_empty & pred_empty).sum()),
                "reference_empty_only": int((ref_empty & ~pred_empty).sum()),
                "prediction_empty_only": int((~ref_empty & pred_empty).sum()),
            }
    return out
