"""Our nnU-Net trainers. nnU-Net finds them by name through ``nnunet_selfreg/ext_trainers``."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.trainers.budget import make_budget_variant
from nnunet_selfreg.trainers.m2snet import (
    nnUNetTrainerM2SNet,
    nnUNetTrainerM2SNet_NoLossNet,
    nnUNetTrainerM2SNet_RandomLossNet,
    nnUNetTrainerM2SNet_StructureLoss,
    nnUNetTrainerMSNet,
    nnUNetTrainerMSNet_RandomLossNet,
)
from nnunet_selfreg.trainers.primus import (
    nnUNet_Primus_B_TrainerSelfReg,
    nnUNet_Primus_L_TrainerSelfReg,
    nnUNet_Primus_M_TrainerSelfReg,
    nnUNet_Primus_S_TrainerSelfReg,
)
from nnunet_selfreg.trainers.selfreg import (
    nnUNetTrainerSelfReg,
    nnUNetTrainerSelfReg_IFDOnly,
    nnUNetTrainerSelfReg_RelativeLambda,
    nnUNetTrainerSelfReg_SCROnly,
)
from nnunet_selfreg.trainers.ssnet import (
    nnUNetTrainer_LabeledOnly,
    nnUNetTrainerSSNet,
    nnUNetTrainerSSNet_FullRampup,
)
from nnunet_selfreg.trainers.variants import define_epoch_variants, define_repeat_variants

_SELFREG = [
    nnUNetTrainerSelfReg,
    nnUNetTrainerSelfReg_SCROnly,
    nnUNetTrainerSelfReg_IFDOnly,
    nnUNetTrainerSelfReg_RelativeLambda,
    nnUNet_Primus_S_TrainerSelfReg,
    nnUNet_Primus_B_TrainerSelfReg,
    nnUNet_Primus_M_TrainerSelfReg,
    nnUNet_Primus_L_TrainerSelfReg,
]
__all__ = [c.__name__ for c in _SELFREG]
__all__ += define_epoch_variants(_SELFREG, globals())
_M2SNET = [
    nnUNetTrainerM2SNet,
    nnUNetTrainerM2SNet_NoLossNet,
    nnUNetTrainerM2SNet_RandomLossNet,
    nnUNetTrainerM2SNet_StructureLoss,
    nnUNetTrainerMSNet,
    nnUNetTrainerMSNet_RandomLossNet,
]
__all__ += [c.__name__ for c in _M2SNET]
__all__ += define_epoch_variants(_M2SNET, globals())
_SSNET = [nnUNetTrainerSSNet, nnUNetTrainerSSNet_FullRampup, nnUNetTrainer_LabeledOnly]
__all__ += [c.__name__ for c in _SSNET]
__all__ += define_epoch_variants(_SSNET, globals())

# repeated runs of the baseline and of SelfReg (the run-to-run noise floor that `compare` reports)
_REPEATS = [globals()[n] for n in define_repeat_variants([nnUNetTrainer, nnUNetTrainerSelfReg], globals())]
__all__ += [c.__name__ for c in _REPEATS]

for _base in (
    nnUNetTrainer,
    *_SELFREG,
    *_M2SNET,
    *_SSNET,
    *_REPEATS,
):
    _cls = make_budget_variant(_base, __name__)
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
del _base, _cls
