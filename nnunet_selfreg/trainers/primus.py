"""SelfReg on nnU-Net's Primus transformers (``nnUNet_Primus_{S,B,M,L}_Trainer``, 3D only).

Each trainer is the SelfReg mixin on nnU-Net's own Primus trainer, with λ = 0.010, the paper's value
for its transformer (Swin-Unet). What is tapped (``nnunet_selfreg.taps``): the outputs of the EVA blocks
at a quarter, half and three quarters of the depth are the students, the last block (the encoder output
before Primus's final norm and patch decoder) is the teacher; tokens are reshaped to the 3D token grid,
exactly as Primus does before its decoder. docs/method.md says why.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import (
    nnUNet_Primus_B_Trainer,
    nnUNet_Primus_L_Trainer,
    nnUNet_Primus_M_Trainer,
    nnUNet_Primus_S_Trainer,
)

from nnunet_selfreg.trainers.core import register_trainer
from nnunet_selfreg.trainers.selfreg import SelfRegMixin

#: the paper's λ for its transformer U-Net (Swin-Unet)
PRIMUS_LAMBDA = 0.010


class _PrimusSelfReg(SelfRegMixin):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.selfreg_lambda = PRIMUS_LAMBDA


@register_trainer
class nnUNet_Primus_S_TrainerSelfReg(_PrimusSelfReg, nnUNet_Primus_S_Trainer):
    """nnU-Net's Primus-S with SelfReg (λ = 0.010)."""


@register_trainer
class nnUNet_Primus_B_TrainerSelfReg(_PrimusSelfReg, nnUNet_Primus_B_Trainer):
    """nnU-Net's Primus-B with SelfReg (λ = 0.010)."""


@register_trainer
class nnUNet_Primus_M_TrainerSelfReg(_PrimusSelfReg, nnUNet_Primus_M_Trainer):
    """nnU-Net's Primus-M with SelfReg (λ = 0.010)."""


@register_trainer
class nnUNet_Primus_L_TrainerSelfReg(_PrimusSelfReg, nnUNet_Primus_L_Trainer):
    """nnU-Net's Primus-L with SelfReg (λ = 0.010)."""
