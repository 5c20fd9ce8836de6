"""Trainer variants answered by name, for any trainer nnU-Net can find, a user's own included.

nnU-Net looks a trainer up with ``hasattr(module, name)`` on every module of every ``nnUNet_extTrainer``
folder (``nnunetv2/utilities/find_class_by_name.py``), and our shim module
(``nnunet_selfreg/ext_trainers``) takes its module-level ``__getattr__`` from here. So a name nobody
defines is answered on demand when it ends in one of these suffixes:

- ``<Base>_Rep<k>`` (k >= 2): ``<Base>`` unchanged under another name, i.e. its own results folder
  (``nnunet-selfreg sweep --repeats``; ``compare`` reads ``_Rep<k>`` as another run of ``<Base>``);
- ``<Base>_1epoch`` / ``<Base>_<N>epochs`` for nnU-Net's lengths (:data:`NNUNET_EPOCH_VARIANTS`);
- ``<Base>_Budget``: epochs and iterations from the environment (:mod:`nnunet_selfreg.trainers.budget`).

``<Base>`` is resolved with nnU-Net's own lookup (its package, then every ``nnUNet_extTrainer`` folder
in order), so it may itself be such a name (``nnUNetTrainer_Rep2_100epochs``) or a class in a user's
folder (``MyTrainer_Rep3``). The subclass is made with
:func:`~nnunet_selfreg.trainers.variants.derive_trainer` (nnU-Net's ``__init__`` signature) and kept
in this module's namespace: checkpoints store only the trainer's name, and pickling (DDP workers,
multiprocessing) finds the class here again, in a fresh process by answering the name once more.

Names without such a suffix, names starting with ``_``, and bases nnU-Net cannot find raise
:class:`AttributeError` (nothing else: ``hasattr`` must stay a question); a name being answered is
never asked for again while it is answered, so a lookup cannot recurse without end.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from dataclasses import dataclass

from nnunet_selfreg.trainers.budget import make_budget_variant
from nnunet_selfreg.trainers.variants import NNUNET_EPOCH_VARIANTS, derive_trainer, make_epoch_variant

__all__ = ["VariantName", "find_trainer_class", "parse_variant_name"]

_REPEAT = re.compile(r"^(?P<base>[A-Za-z]\w*)_Rep(?P<k>\d+)$")
_EPOCHS = re.compile(r"^(?P<base>[A-Za-z]\w*)_(?:(?P<n>\d+)epochs|(?P<one>1)epoch)$")
_BUDGET = re.compile(r"^(?P<base>[A-Za-z]\w*)_Budget$")

_LOCK = threading.RLock()  # nnU-Net's lookup may ask for a base while a variant is made
_ANSWERING: set[str] = set()


@dataclass(frozen=True)
class VariantName:
    """A parsed on-demand name: ``base`` + one suffix (``kind`` 'repeat', 'epochs' or 'budget')."""

    base: str
    kind: str
    value: int | None = None


def parse_variant_name(name: str) -> VariantName | None:
    """The last suffix of ``name`` this module answers, or None (``_Rep1``, ``_7epochs`` are not)."""
    if m := _REPEAT.match(name):
        k = int(m["k"])
        return VariantName(m["base"], "repeat", k) if k >= 2 and m["k"] == str(k) else None
    if m := _EPOCHS.match(name):
        n = 1 if m["one"] else int(m["n"])
        return VariantName(m["base"], "epochs", n) if n in NNUNET_EPOCH_VARIANTS and (m["one"] or n != 1) else None
    if m := _BUDGET.match(name):
        return VariantName(m["base"], "budget")
    return None


def find_trainer_class(name: str) -> type:
    """nnU-Net's own lookup of a trainer class by name (its messages hidden); AttributeError if not found."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except Exception as e:  # RuntimeError (not found), AssertionError (no nnUNetTrainer), a user's broken module
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split(" If the trainer is located")[0].rstrip(".")  # nnU-Net's advice follows ours
        raise AttributeError(f"nnU-Net's trainer lookup cannot find {name!r}: {first}") from None


def _make(variant: VariantName, name: str, base: type) -> type:
    if variant.kind == "repeat":
        doc = f"{base.__name__}, unchanged: run {variant.value} of the same trainer, in its own results folder."
        return derive_trainer(base, name, lambda trainer: None, __name__, doc)
    if variant.kind == "epochs":
        return make_epoch_variant(base, int(variant.value), __name__)
    return make_budget_variant(base, __name__)


def __getattr__(name: str) -> type:
    variant = None if name.startswith("_") else parse_variant_name(name)
    if variant is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _LOCK:
        known = globals().get(name)
        if known is not None:
            return known
        if name in _ANSWERING:
            raise AttributeError(f"{name!r} is being answered already (a lookup that asks for itself)")
        _ANSWERING.add(name)
        try:
            cls = _make(variant, name, find_trainer_class(variant.base))
        finally:
            _ANSWERING.discard(name)
        globals()[name] = cls
        return cls
