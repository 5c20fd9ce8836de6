"""Our nnU-Net trainers. nnU-Net finds them by name through ``nnunet_selfreg/ext_trainers``."""

from nnunet_selfreg.trainers.selfreg import (
    nnUNetTrainerSelfReg,
    nnUNetTrainerSelfReg_IFDOnly,
    nnUNetTrainerSelfReg_SCROnly,
)
from nnunet_selfreg.trainers.variants import define_epoch_variants

__all__ = ["nnUNetTrainerSelfReg", "nnUNetTrainerSelfReg_IFDOnly", "nnUNetTrainerSelfReg_SCROnly"]
__all__ += define_epoch_variants(
    [nnUNetTrainerSelfReg, nnUNetTrainerSelfReg_SCROnly, nnUNetTrainerSelfReg_IFDOnly], globals()
)
