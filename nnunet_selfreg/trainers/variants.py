"""Training-length variants, named and sized like nnU-Net's own ``nnUNetTrainer_Xepochs``.

For every base trainer ``B`` and every length ``N`` nnU-Net ships (1, 5, 10, 20, 50, 100, 250, 500,
750, 2000, 4000, 8000 epochs) there is ``B_1epoch`` / ``B_Nepochs``, a one-line subclass that sets
``num_epochs = N``; so each SelfReg run has a same-length stock baseline
(``nnUNetTrainer_Nepochs``) to compare with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: the lengths of nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs
NNUNET_EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)


def epochs_suffix(n: int) -> str:
    return "_1epoch" if n == 1 else f"_{n}epochs"


def derive_trainer(
    base: type[nnUNetTrainer], name: str, configure: Callable[[nnUNetTrainer], None], module: str, doc: str
) -> type[nnUNetTrainer]:
    """A subclass ``name`` of ``base`` (defined in ``module``) whose ``__init__`` calls ``configure(self)``.

    The ``__init__`` keeps nnU-Net's exact signature (nnU-Net rebuilds trainers from it), and the class
    is picklable because ``module`` exposes it under ``name``.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        configure(self)

    return type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name, "__doc__": doc})


def make_epoch_variant(base: type[nnUNetTrainer], num_epochs: int, module: str) -> type[nnUNetTrainer]:
    """A subclass of ``base`` named ``base.__name__ + epochs_suffix(num_epochs)`` defined in ``module``."""

    def configure(trainer: nnUNetTrainer) -> None:
        trainer.num_epochs = num_epochs

    name = base.__name__ + epochs_suffix(num_epochs)
    return derive_trainer(base, name, configure, module, f"{base.__name__} trained for {num_epochs} epoch(s).")


def define_epoch_variants(bases: list[type[nnUNetTrainer]], namespace: dict) -> list[str]:
    """Create every variant of ``bases`` in ``namespace`` (a module's globals); return their names."""
    names = []
    for base in bases:
        for n in NNUNET_EPOCH_VARIANTS:
            cls = make_epoch_variant(base, n, namespace["__name__"])
            namespace[cls.__name__] = cls
            names.append(cls.__name__)
    return names


#: how many runs of one trainer ``define_repeat_variants`` makes available (the original + repeats)
MAX_REPEATS = 3


def repeat_suffix(k: int) -> str:
    return f"_Rep{k}"


def define_repeat_variants(bases: list[type[nnUNetTrainer]], namespace: dict) -> list[str]:
    """``B_Rep2 … B_Rep{MAX_REPEATS}`` for each base: the same trainer under another name.

    nnU-Net training is not deterministic, and a method's effect can only be read against the
    difference between two runs of the *same* trainer (the run-to-run, A/A noise floor). nnU-Net
    keeps one results folder per trainer name (``TRAINER__PLANS__CONFIG``), so a repeated run needs
    its own name: ``nnUNetTrainer_Rep2`` trains exactly like ``nnUNetTrainer`` into its own folder.
    These are exported classes; any other ``X_Rep<k>`` is answered on demand
    (:mod:`nnunet_selfreg.trainers.on_demand`).
    """
    names = []
    for base in bases:
        for k in range(2, MAX_REPEATS + 1):
            name = base.__name__ + repeat_suffix(k)
            doc = f"{base.__name__}, unchanged: run {k} of the same trainer, in its own results folder."
            cls = derive_trainer(base, name, lambda trainer: None, namespace["__name__"], doc)
            namespace[name] = cls
            names.append(name)
    return names
