"""What every method's trainer shares: weight checks, per-epoch seeds, epoch statistics, registration.

A method is a loss module plus a trainer module; the trainer module uses this one and nothing from
another method's trainer:

- :func:`validate_weight` for its loss weights, :func:`epoch_seed` for generators that must redraw the
  same numbers when a run resumes with ``--c`` (nnU-Net's checkpoint does not hold them);
- :class:`~nnunet_selfreg.epoch_stats.EpochStats` (per-term sums on the device, one DDP all-reduce per
  epoch), :func:`~nnunet_selfreg.epoch_stats.log_epoch_means` and
  :func:`~nnunet_selfreg.trainers.progress.install_extended_logger` for its logged terms;
- :func:`register_trainer` on each trainer class: ``nnunet_selfreg.trainers`` imports every module of
  the package and exports each registered class with its variants (``_Nepochs``, ``_Budget``, and on
  request ``_Rep2`` / ``_Rep3``), which is where nnU-Net finds them (docs/discovery.md; other variant
  names of any trainer are answered on demand by :mod:`nnunet_selfreg.trainers.on_demand`); a trainer
  module in a user's ``nnUNet_extTrainer`` folder ends with ``__all__ = define_trainers(globals())``;
- :func:`checkpoint_entries` for state beyond the network (heads, memories, which weights a loss used):
  it joins the checkpoint nnU-Net's own ``save_checkpoint`` writes, in that one write;
- :meth:`attach_feature_taps` and :meth:`detach_feature_taps`, by convention: a trainer whose loss reads
  forward hooks attaches them in the first (``on_train_start`` calls it before the first forward, so a
  ``torch.compile``-d network traces them) and removes them in the second (``on_train_end``); tools that
  drive ``train_step`` directly (``benchmarks/step_cost.py``) call the functions of the same names.

docs/extending.md walks through a new method written on this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from nnunet_selfreg.epoch_stats import EpochMeans, EpochStats, format_means, log_epoch_means
from nnunet_selfreg.trainers.budget import make_budget_variant
from nnunet_selfreg.trainers.progress import install_extended_logger
from nnunet_selfreg.trainers.variants import define_epoch_variants, define_repeat_variants

__all__ = [
    "EpochMeans",
    "EpochStats",
    "Registration",
    "attach_feature_taps",
    "checkpoint_entries",
    "define_trainers",
    "detach_feature_taps",
    "epoch_seed",
    "format_means",
    "install_extended_logger",
    "log_epoch_means",
    "register_trainer",
    "registered_trainers",
    "validate_weight",
]

T = TypeVar("T", bound=type)


def validate_weight(value: Any, name: str) -> float:
    """A regulariser weight must be a finite real number >= 0 (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); set it in __init__")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}; set it in your trainer's __init__")
    return float(value)


def epoch_seed(seed: int, fold: int | str, epoch: int) -> int:
    """A seed for one epoch of one fold: restarting an epoch (``--c``) redraws the same random numbers.

    ``fold`` 'all' counts as fold 0.
    """
    fold = fold if isinstance(fold, int) else 0
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(fold), int(epoch)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def attach_feature_taps(trainer) -> None:
    """Attach the trainer's forward hooks, if it has any (its ``attach_feature_taps`` method)."""
    attach: Callable[[], None] | None = getattr(trainer, "attach_feature_taps", None)
    if attach is not None:
        attach()


#: keys of the dict nnU-Net's ``save_checkpoint`` builds (2.8.1): how its checkpoint is told from other saves
_NNUNET_CHECKPOINT_KEYS = frozenset({"network_weights", "optimizer_state", "current_epoch", "trainer_name"})


@contextmanager
def checkpoint_entries(filename: str, entries: Callable[[], dict]) -> Iterator[None]:
    """Around ``super().save_checkpoint(filename)``: nnU-Net's checkpoint gains ``entries()``, written once.

    nnU-Net 2.8.1 builds its checkpoint dict and passes it to ``torch.save`` within ``save_checkpoint``,
    with no method to extend the dict. Copying that method's body would fork nnU-Net's checkpoint
    format; loading the written file and saving it again doubles the I/O of every checkpoint and leaves,
    between the two writes, a file the method cannot resume from. Instead, for the duration of the block,
    the ``torch.save`` of that dict to ``filename`` (and nothing else) adds ``entries()`` (called only
    then: not on DDP ranks > 0 or with checkpointing disabled, where nnU-Net saves nothing). A wrapper of
    the whole ``save_checkpoint`` (``sweep``'s atomic writes) still sees a single write.
    """
    save = torch.save

    def save_with_entries(obj: object, f: object, *args: Any, **kwargs: Any) -> None:
        if f == filename and isinstance(obj, dict) and _NNUNET_CHECKPOINT_KEYS <= obj.keys():
            obj = {**obj, **entries()}
        save(obj, f, *args, **kwargs)

    torch.save = save_with_entries
    try:
        yield
    finally:
        torch.save = save


def detach_feature_taps(trainer) -> None:
    """Remove the trainer's forward hooks, if it has any (its ``detach_feature_taps`` method)."""
    detach: Callable[[], None] | None = getattr(trainer, "detach_feature_taps", None)
    if detach is not None:
        detach()


#: ``timed`` of a registration: time it in ``benchmarks/step_cost.py`` by default, or with ``--variants all``
TIMED = ("default", "all")


@dataclass(frozen=True)
class Registration:
    """A trainer class and the variant families ``nnunet_selfreg.trainers`` defines for it."""

    cls: type
    epochs: bool  # ``_1epoch`` ... ``_8000epochs``, nnU-Net's training lengths
    budget: bool  # ``_Budget``: epochs and iterations from the environment (also for the repeats)
    repeats: bool  # ``_Rep2`` / ``_Rep3``: the same trainer under another name (run-to-run noise)
    export: bool  # the class itself under its own name (False for nnU-Net's stock trainer)
    timed: str | None = None  # its step cost is measured: "default", "all" (see TIMED); None: when named


_PACKAGE = __name__.rpartition(".")[0]  # nnunet_selfreg.trainers
_REGISTRY: dict[str, Registration] = {}
_DEFINED: set[str] = set()  # registrations already defined in a module's namespace


def register_trainer(
    cls: T | None = None,
    *,
    epochs: bool = True,
    budget: bool = True,
    repeats: bool = False,
    export: bool = True,
    timed: str | None = None,
) -> T | Callable[[T], T]:
    """Class decorator: make ``cls`` and its variants trainers that nnU-Net finds by name.

    ``@register_trainer`` gives the epoch variants and ``_Budget``; ``@register_trainer(repeats=True)``
    adds ``_Rep2`` / ``_Rep3``. The class is returned unchanged; :func:`define_trainers` defines it and
    its variants in a module (``nnunet_selfreg.trainers`` for the package's own trainer modules, the
    trainer module itself for one in a user's ``nnUNet_extTrainer`` folder). Two different classes
    under one name raise (nnU-Net picks trainers by name); the same module imported again (nnU-Net
    re-imports ``nnUNet_extTrainer`` modules) replaces its earlier registration. ``timed`` says which
    trainers ``benchmarks/step_cost.py`` times: ``"default"`` in every run, ``"all"`` with ``--variants
    all`` (one trainer per cost: an ablation that only changes a weight would time the same step again).
    """
    if timed not in (None, *TIMED):
        raise ValueError(f"timed must be None or one of {TIMED}, got {timed!r}")

    def decorate(c: T) -> T:
        known = _REGISTRY.get(c.__name__)
        if known is not None and known.cls is not c and known.cls.__module__ != c.__module__:
            raise ValueError(
                f"two trainers are registered as {c.__name__} ({known.cls.__module__} and {c.__module__}); "
                "nnU-Net selects trainers by class name: rename one"
            )
        _REGISTRY[c.__name__] = Registration(c, epochs, budget, repeats, export, timed)
        _DEFINED.discard(c.__name__)
        return c

    return decorate if cls is None else decorate(cls)


def registered_trainers() -> list[Registration]:
    """Every registration so far, in registration order."""
    return list(_REGISTRY.values())


def define_trainers(namespace: dict) -> list[str]:
    """Define the registered trainers not yet defined elsewhere, and their variants, in ``namespace``.

    ``namespace`` is a module's ``globals()``; returns the names defined (the module's ``__all__``).
    Variants are created with ``namespace['__name__']`` as their module, so they pickle by that path,
    and keep nnU-Net's ``__init__`` signature (:func:`~nnunet_selfreg.trainers.variants.derive_trainer`).
    """
    module = namespace["__name__"]
    if module.startswith(f"{_PACKAGE}."):
        raise RuntimeError(
            f"{module} is a module of {_PACKAGE}, which defines the trainers of all its modules itself: "
            "remove the define_trainers(globals()) call from it"
        )
    names: list[str] = []
    for reg in registered_trainers():
        if reg.cls.__name__ in _DEFINED:
            continue
        _DEFINED.add(reg.cls.__name__)
        if reg.export:
            namespace[reg.cls.__name__] = reg.cls
            names.append(reg.cls.__name__)
        if reg.epochs:
            names += define_epoch_variants([reg.cls], namespace)
        repeats = [namespace[n] for n in define_repeat_variants([reg.cls], namespace)] if reg.repeats else []
        names += [c.__name__ for c in repeats]
        if reg.budget:
            for base in (reg.cls, *repeats):
                variant = make_budget_variant(base, namespace["__name__"])
                namespace[variant.__name__] = variant
                names.append(variant.__name__)
    return names
