"""nnunet_selfreg: SelfReg-UNet, SS-Net and M2SNet as nnU-Net v2 trainers.

``from nnunet_selfreg import nnUNetTrainerSelfReg`` (or any other trainer of the package, a variant such
as ``nnUNetTrainerSelfReg_5epochs`` included) and ``from nnunet_selfreg import SelfRegMixin`` are what a
subclass in a user's own trainer folder needs.

Kept import-light on purpose: ``nnunet_selfreg._discovery`` is imported at every interpreter
start-up by the ``.pth`` file the wheel installs, so nothing here may import torch or nnU-Net. The
names above are resolved on first use (PEP 562 module ``__getattr__``).
"""

__version__ = "0.1.0"

_LAZY = {
    "SelfRegMixin": "nnunet_selfreg.trainers.selfreg",
    "TapPoints": "nnunet_selfreg.taps",
    "declare_taps": "nnunet_selfreg.taps",
}
#: every trainer of the package (and its variants) is looked up in this module
_TRAINERS = "nnunet_selfreg.trainers"


def __getattr__(name: str):
    """Import torch, nnU-Net and the trainers only when one of the names above is asked for."""
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name.startswith("nnUNet"):
        trainers = importlib.import_module(_TRAINERS)
        try:
            return getattr(trainers, name)
        except AttributeError:
            raise AttributeError(
                f"module 'nnunet_selfreg' has no trainer {name!r}; nnunet_selfreg.trainers.__all__ lists them"
            ) from None
    raise AttributeError(f"module 'nnunet_selfreg' has no attribute {name!r}")
