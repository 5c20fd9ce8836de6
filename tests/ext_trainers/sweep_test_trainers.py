"""A trainer that fails on purpose, for the sweep tests (a failed job is reported, the others finish).

Found through ``nnUNet_extTrainer`` like ``selfreg_test_trainers``; its budget comes from the same
``SELFREG_TEST_EPOCHS`` / ``SELFREG_TEST_ITERS`` variables.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerSweepFails(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("SELFREG_TEST_EPOCHS", "2"))
        self.num_iterations_per_epoch = int(os.environ.get("SELFREG_TEST_ITERS", "3"))
        self.num_val_iterations_per_epoch = 1

    def on_epoch_end(self):
        super().on_epoch_end()
        raise RuntimeError("test: nnUNetTrainerSweepFails fails on purpose after its first epoch")
