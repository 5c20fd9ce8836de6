"""Trainers whose training budget comes from environment variables (demo, benchmarks, quick trials).

nnU-Net fixes the budget by class name (``nnUNetTrainer_5epochs``); short comparisons on a CPU need
budgets in between, for the baseline and each method alike. ``<Trainer>_Budget`` is ``<Trainer>``
with only ``num_epochs``, ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` taken
from:

- ``NNUNET_SELFREG_BUDGET_EPOCHS`` (required)
- ``NNUNET_SELFREG_BUDGET_ITERATIONS`` (required, training iterations per epoch)
- ``NNUNET_SELFREG_BUDGET_VAL_ITERATIONS`` (optional, default 5)

The values are written to the training log and to ``debug.json`` (nnU-Net records every trainer
attribute). ``nnUNetTrainer_Budget`` is the stock nnU-Net trainer with that budget: the baseline.
"""

from __future__ import annotations

import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.arguments import positive_int
from nnunet_selfreg.trainers.variants import derive_trainer

ENV_EPOCHS = "NNUNET_SELFREG_BUDGET_EPOCHS"
ENV_ITERATIONS = "NNUNET_SELFREG_BUDGET_ITERATIONS"
ENV_VAL_ITERATIONS = "NNUNET_SELFREG_BUDGET_VAL_ITERATIONS"


def _positive_int_from_env(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(
                f"the *_Budget trainers take their budget from the environment: set {ENV_EPOCHS} and "
                f"{ENV_ITERATIONS} (e.g. {ENV_EPOCHS}=10 {ENV_ITERATIONS}=50), or use a fixed-length "
                "trainer such as nnUNetTrainerSelfReg_10epochs"
            )
        return default
    try:
        return positive_int(raw)
    except ValueError as e:
        raise RuntimeError(f"{name}={raw!r}: {e}") from None


def budget_from_env() -> tuple[int, int, int]:
    """(epochs, iterations, validation iterations) from the environment; RuntimeError saying what to set."""
    return (
        _positive_int_from_env(ENV_EPOCHS),
        _positive_int_from_env(ENV_ITERATIONS),
        _positive_int_from_env(ENV_VAL_ITERATIONS, 5),
    )


def apply_env_budget(trainer: nnUNetTrainer) -> None:
    epochs, iterations, val_iterations = budget_from_env()
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.print_to_log_file(
        f"Budget from the environment: {trainer.num_epochs} epochs x {trainer.num_iterations_per_epoch} "
        f"iterations (validation: {trainer.num_val_iterations_per_epoch} iterations per epoch)",
        also_print_to_console=True,
    )


def make_budget_variant(base: type[nnUNetTrainer], module: str) -> type[nnUNetTrainer]:
    """``base`` with its budget read from the environment, named ``base.__name__ + '_Budget'``.

    The class (and every subclass) has ``nnunet_selfreg_env_budget = True``, so tools know that its
    budget is the environment's (``sweep`` checks it against earlier results before training).
    """
    doc = f"{base.__name__} with the budget from ${ENV_EPOCHS} / ${ENV_ITERATIONS}."
    cls = derive_trainer(base, base.__name__ + "_Budget", apply_env_budget, module, doc)
    cls.nnunet_selfreg_env_budget = True
    return cls
