"""nnunet_selfreg: SelfReg-UNet, SS-Net and M2SNet as nnU-Net v2 trainers.

Kept import-light on purpose: ``nnunet_selfreg._discovery`` is imported at every interpreter
start-up by the ``.pth`` file the wheel installs, so nothing here may import torch or nnU-Net.
"""

__version__ = "0.1.0"

_LAZY = {
    "SelfRegMixin": "nnunet_selfreg.trainers.selfreg",
    "TapPoints": "nnunet_selfreg.taps",
    "declare_taps": "nnunet_selfreg.taps",
}


def __getattr__(name: str):
    """``from nnunet_selfreg import SelfRegMixin`` imports torch and nnU-Net only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnunet_selfreg' has no attribute {name!r}")
