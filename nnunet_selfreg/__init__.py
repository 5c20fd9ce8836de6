"""nnunet_selfreg: SelfReg-UNet, SS-Net and M2SNet as nnU-Net v2 trainers.

Kept import-light on purpose: ``nnunet_selfreg._discovery`` is imported at every interpreter
start-up by the ``.pth`` file the wheel installs, so nothing here may import torch or nnU-Net.
"""

__version__ = "0.1.0"
