"""Tiny-budget trainers for the end-to-end tests, found through ``nnUNet_extTrainer``.

This folder plays the part of a user's own ``nnUNet_extTrainer`` folder: the tests list only it in
the variable, and our ``.pth`` file must add the package's own shim beside it. Budgets come from
environment variables so that one trainer name can be resumed with ``--c`` for more epochs.
"""

import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.trainers import nnUNet_Primus_S_TrainerSelfReg, nnUNetTrainerSelfReg
from nnunet_selfreg.trainers.m2snet import nnUNetTrainerM2SNet
from nnunet_selfreg.trainers.ssnet import nnUNetTrainer_LabeledOnly, nnUNetTrainerSSNet
from nnunet_selfreg.trainers.variants import derive_trainer


def _tiny_budget(trainer) -> None:
    trainer.num_epochs = int(os.environ.get("SELFREG_TEST_EPOCHS", "2"))
    trainer.num_iterations_per_epoch = int(os.environ.get("SELFREG_TEST_ITERS", "3"))
    trainer.num_val_iterations_per_epoch = 2
    trainer.save_every = 1


def _m2snet_tiny(trainer) -> None:
    _tiny_budget(trainer)
    trainer.lossnet_input_size = 64  # VGG-16 on 64x64 instead of 224x224: CPU test budget


def _ssnet_tiny(trainer) -> None:
    _tiny_budget(trainer)
    # reach the full weight quickly so that every term matters within a few iterations
    trainer.ssnet_rampup_step = 1
    trainer.ssnet_rampup_length = 4


# each is a one-line subclass of the named trainer whose __init__ keeps nnU-Net's signature
for _base, _name, _configure in (
    (nnUNetTrainerSelfReg, "nnUNetTrainerSelfRegTiny", _tiny_budget),
    (nnUNetTrainer, "nnUNetTrainerTiny", _tiny_budget),
    (nnUNetTrainerM2SNet, "nnUNetTrainerM2SNetTiny", _m2snet_tiny),
    (nnUNetTrainerSSNet, "nnUNetTrainerSSNetTiny", _ssnet_tiny),
    (nnUNetTrainer_LabeledOnly, "nnUNetTrainer_LabeledOnlyTiny", _tiny_budget),
    (nnUNet_Primus_S_TrainerSelfReg, "nnUNet_Primus_S_TrainerSelfRegTiny", _tiny_budget),
):
    globals()[_name] = derive_trainer(_base, _name, _configure, __name__, f"{_base.__name__} with a tiny test budget.")
del _base, _name, _configure
