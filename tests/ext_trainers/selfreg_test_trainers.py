"""Tiny-budget trainers for the end-to-end tests, found through ``nnUNet_extTrainer``.

This folder plays the part of a user's own ``nnUNet_extTrainer`` folder: the tests list only it in
the variable, and our ``.pth`` file must add the package's own shim beside it. Budgets come from
environment variables so that one trainer name can be resumed with ``--c`` for more epochs.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.trainers import nnUNetTrainerSelfReg
from nnunet_selfreg.trainers.m2snet import nnUNetTrainerM2SNet
from nnunet_selfreg.trainers.ssnet import nnUNetTrainer_LabeledOnly, nnUNetTrainerSSNet


def _tiny_budget(trainer) -> None:
    trainer.num_epochs = int(os.environ.get("SELFREG_TEST_EPOCHS", "2"))
    trainer.num_iterations_per_epoch = int(os.environ.get("SELFREG_TEST_ITERS", "3"))
    trainer.num_val_iterations_per_epoch = 2
    trainer.save_every = 1


class nnUNetTrainerSelfRegTiny(nnUNetTrainerSelfReg):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny_budget(self)


class nnUNetTrainerTiny(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny_budget(self)


class nnUNetTrainerM2SNetTiny(nnUNetTrainerM2SNet):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny_budget(self)
        self.lossnet_input_size = 64  # VGG-16 on 64x64 instead of 224x224: CPU test budget


class nnUNetTrainerSSNetTiny(nnUNetTrainerSSNet):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny_budget(self)
        # reach the full weight quickly so that every term matters within a few iterations
        self.ssnet_rampup_step = 1
        self.ssnet_rampup_length = 4


class nnUNetTrainer_LabeledOnlyTiny(nnUNetTrainer_LabeledOnly):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _tiny_budget(self)
