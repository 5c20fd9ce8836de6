"""The grid of a sweep (configuration x trainer x fold x run), checked in full before any job starts.

Every check uses nnU-Net's own code where it has one: the dataset id lookup, the plans file and
``PlansManager``, the trainer lookup (``recursive_find_trainer_class_by_name``, which also answers our
on-demand names such as ``X_Rep2``), and nnU-Net's own ``do_split`` for the cross-validation split
(created here, once, before parallel jobs could race to write it). A mistake is one line
(:class:`~nnunet_selfreg.errors.UserError`) that says what to do, raised before anything runs.

Run ``k`` >= 2 of trainer ``X`` trains as ``X_Rep{k}``: nnU-Net keeps one results folder per trainer
name, and ``compare`` reads ``_Rep{k}`` as another run of ``X``
(:func:`nnunet_selfreg.evaluation.stats.repeat_of`).
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import (
    DATASET_JSON,
    DEFAULT_PLANS,
    FINGERPRINT_JSON,
    FOLD_PREFIX,
    SPLITS_JSON,
    model_folder_name,
    parse_fold,
    plans_file_name,
    require_env_folder,
    resolve_dataset,
)

__all__ = ["Grid", "GridSpec", "Job", "check_trainer_names", "plan_grid", "run_name"]

BUDGET_HINT = "set NNUNET_SELFREG_BUDGET_EPOCHS/_ITERATIONS to that budget, or use another nnUNet_results"
_TRAINER_NAME = re.compile(r"^[A-Za-z]\w*$")


def run_name(trainer: str, run: int) -> str:
    """The trainer name run ``run`` (1-based) of ``trainer`` trains under: ``X``, ``X_Rep2``, ``X_Rep3`` …"""
    return trainer if run == 1 else f"{trainer}_Rep{run}"


@dataclass(frozen=True)
class Job:
    """One training: nnU-Net's ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS``."""

    dataset: str
    configuration: str
    trainer: str  # the name trained under (``X`` or ``X_Rep{k}``)
    base_trainer: str  # ``X``
    run: int
    fold: int | str
    plans: str

    @property
    def model_folder(self) -> str:
        return model_folder_name(self.trainer, self.plans, self.configuration)

    @property
    def key(self) -> str:
        """Unique within a dataset's results: ``TRAINER__PLANS__CONFIGURATION/fold_X``."""
        return f"{self.model_folder}/{FOLD_PREFIX}{self.fold}"

    @property
    def file_key(self) -> str:
        """:attr:`key` as a file name (logs, locks)."""
        return self.key.replace("/", "__")

    def fold_dir(self, results: Path) -> Path:
        return Path(results) / self.dataset / self.model_folder / f"{FOLD_PREFIX}{self.fold}"

    def record(self) -> dict:
        """The job's fixed facts, as the manifest stores them."""
        return {
            "configuration": self.configuration,
            "trainer": self.trainer,
            "base_trainer": self.base_trainer,
            "run": self.run,
            "fold": self.fold,
            "plans": self.plans,
            "output_folder": f"{self.dataset}/{self.key}",
        }

    @classmethod
    def from_record(cls, dataset: str, record: dict) -> Job:
        return cls(
            dataset,
            record["configuration"],
            record["trainer"],
            record["base_trainer"],
            int(record["run"]),
            record["fold"],
            record["plans"],
        )


@dataclass(frozen=True)
class GridSpec:
    """What the user asked for, before any check."""

    dataset: str
    configurations: tuple[str, ...]
    trainers: tuple[str, ...]
    folds: tuple[str, ...] = ("0", "1", "2", "3", "4")
    plans: str = DEFAULT_PLANS
    repeats: int = 1


@dataclass(frozen=True)
class Grid:
    """A checked grid: the dataset's folder name, nnU-Net's folders, the jobs in launch order."""

    dataset: str
    preprocessed: Path
    results: Path
    jobs: tuple[Job, ...]
    env_budget: tuple[int, int, int] | None  # from the environment, if a *_Budget trainer is in the grid

    @property
    def sweeps_folder(self) -> Path:
        return self.results / self.dataset / "sweeps"


def _parse_fold(text: str) -> int | str:
    try:
        return parse_fold(text)
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_plans(preprocessed: Path, dataset: str, plans: str) -> dict:
    path = preprocessed / dataset / plans_file_name(plans)
    if not path.is_file():
        have = sorted(
            p.stem
            for p in (preprocessed / dataset).glob("*.json")
            if p.name not in (DATASET_JSON, SPLITS_JSON, FINGERPRINT_JSON)
        )
        raise UserError(
            f"no plans {plans!r} for {dataset} ({path} is missing; plans there: {', '.join(have) or 'none'}): run "
            f"nnUNetv2_plan_and_preprocess -d {dataset} first, or pass -p with one of those"
        )
    return read_json(path)


def _check_configurations(plans: dict, configurations: tuple[str, ...], preprocessed: Path, spec: GridSpec) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    available = manager.available_configurations
    if not configurations:
        raise UserError("no configuration given: pass -c with one or more of " + ", ".join(available))
    for name in configurations:
        if name not in available:
            raise UserError(f"configuration {name!r} is not in plans {spec.plans!r}; available: {', '.join(available)}")
        config = manager.get_configuration(name)
        data = preprocessed / config.data_identifier
        if not data.is_dir() or not any(data.iterdir()):
            raise UserError(
                f"configuration {name!r} is not preprocessed ({data} is missing or empty): run "
                f"nnUNetv2_preprocess -d {spec.dataset} -plans_name {spec.plans} -c {name}"
            )
        previous = config.previous_stage_name
        if previous is not None and previous in configurations:
            raise UserError(
                f"{name} needs the predictions of {previous}: train {previous} in one sweep, then {name} in another"
            )


def _splits(preprocessed: Path, data_folder: Path) -> list:
    """nnU-Net's ``splits_final.json``, created by nnU-Net's own ``do_split`` if missing (5 folds, seed 12345)."""
    path = preprocessed / SPLITS_JSON
    if not path.is_file():
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        stand_in = types.SimpleNamespace(  # do_split reads only these attributes
            dataset_class=None,
            fold=0,
            preprocessed_dataset_folder=str(data_folder),
            preprocessed_dataset_folder_base=str(preprocessed),
            folder_with_segs_from_previous_stage=None,
            print_to_log_file=lambda *args, **kwargs: None,
        )
        nnUNetTrainer.do_split(stand_in)
    return read_json(path, expect=list)


def _check_folds(folds: list[int | str], splits: list) -> None:
    if not folds:
        raise UserError("no fold given: pass -f with fold numbers (e.g. -f 0 1 2 3 4) or 'all'")
    if len(set(folds)) != len(folds):
        raise UserError(f"folds repeat: {' '.join(map(str, folds))}")
    for fold in folds:
        if fold != "all" and fold >= len(splits):
            raise UserError(
                f"fold {fold} is not in {SPLITS_JSON} ({len(splits)} splits: folds 0-{len(splits) - 1}); nnU-Net "
                "would train it on a random 80:20 split instead. Use those folds or add splits to the file"
            )


def check_trainer_names(names: list[str]) -> dict[str, type]:
    """Resolve every name with nnU-Net's lookup; returns name -> class, or raises one UserError."""
    from nnunet_selfreg.trainers.on_demand import find_trainer_class

    if len(set(names)) != len(names):
        raise UserError(f"a trainer is listed twice: {' '.join(names)}")
    out = {}
    for name in names:
        if not _TRAINER_NAME.match(name) or "__" in name:
            raise UserError(f"{name!r} is not a trainer class name (letters, digits and single underscores)")
        try:
            out[name] = find_trainer_class(name)
        except AttributeError as e:
            raise UserError(
                f"{e}. Is the folder with it listed in nnUNet_extTrainer? (`nnunet-selfreg doctor` checks the lookup)"
            ) from None
    return out


def _env_budget() -> tuple[int, int, int]:
    from nnunet_selfreg.trainers import budget

    try:
        return budget.budget_from_env()
    except RuntimeError as e:
        raise UserError(f"a *_Budget trainer is in the grid: {e}") from None


def plan_grid(spec: GridSpec, budget_hint: str = BUDGET_HINT) -> Grid:
    """Check ``spec`` against nnU-Net's folders and lookup; the jobs, configuration-major, run and fold inner.

    Results of a ``*_Budget`` trainer trained with another budget than the environment's are refused
    (``budget_hint`` says what to do instead): they are never continued or overwritten.
    """
    if spec.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {spec.repeats}")
    if not spec.trainers:
        raise UserError("no trainer given: pass -tr with one or more trainer names (e.g. -tr nnUNetTrainer)")
    preprocessed_root = require_env_folder("nnUNet_preprocessed")
    results = require_env_folder("nnUNet_results")
    dataset = resolve_dataset(spec.dataset)
    preprocessed = preprocessed_root / dataset
    plans = _load_plans(preprocessed_root, dataset, spec.plans)
    configurations = tuple(dict.fromkeys(spec.configurations))
    _check_configurations(plans, configurations, preprocessed, spec)
    folds = [_parse_fold(f) for f in spec.folds]
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    first = PlansManager(plans).get_configuration(configurations[0]).data_identifier
    _check_folds(folds, _splits(preprocessed, preprocessed / first))

    names = [run_name(t, k) for t in spec.trainers for k in range(1, spec.repeats + 1)]
    classes = check_trainer_names(names)
    env_budget = (
        _env_budget() if any(getattr(c, "nnunet_selfreg_env_budget", False) for c in classes.values()) else None
    )
    jobs = tuple(
        Job(dataset, configuration, run_name(trainer, k), trainer, k, fold, spec.plans)
        for configuration in configurations
        for fold in folds
        for trainer in spec.trainers
        for k in range(1, spec.repeats + 1)
    )
    if env_budget is not None:
        from nnunet_selfreg.sweep.state import check_budget

        for job in jobs:
            if getattr(classes[job.trainer], "nnunet_selfreg_env_budget", False):
                check_budget(job.fold_dir(results), env_budget[0], env_budget[1], budget_hint)
    return Grid(dataset, preprocessed, results, jobs, env_budget)
