"""Trainers for ``tests/test_reliability.py``, found through ``nnUNet_extTrainer`` like ``selfreg_test_trainers``.

``nnUNetTrainerSelfRegTinySeeded`` is the tiny-budget SelfReg trainer made reproducible on CPU: torch
runs single-threaded and Python's, NumPy's and torch's global random generators (which nnU-Net's
single-process data loading and augmentation use) are re-seeded from the epoch number at the start of
every epoch, so a run resumed with ``--c`` sees the same batches as an uninterrupted one (SelfReg's own
channel sampling is re-seeded per epoch by ``nnUNetTrainerSelfReg`` itself). Environment:

* ``SELFREG_TEST_EPOCHS`` / ``SELFREG_TEST_ITERS``: budget, as in ``selfreg_test_trainers``.
* ``SELFREG_TEST_CRASH_AT_EPOCH=k``: end the process abruptly (``os._exit``) once epoch ``k - 1`` is
  done and its ``checkpoint_latest.pth`` is written, as a killed job would.
* ``SELFREG_TEST_SKIP_FINAL_VAL=1``: skip nnU-Net's final validation (not needed by these tests).
"""

import os
import random

import numpy as np
import torch

from nnunet_selfreg.trainers import nnUNetTrainerSelfReg


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class nnUNetTrainerSelfRegTinySeeded(nnUNetTrainerSelfReg):
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
        self.save_every = 1
        _seed_everything(20239)  # the network's initial weights come from torch's global generator

    def on_train_start(self):
        torch.set_num_threads(1)  # nnUNetv2_train sets all cores on CPU; one thread: fixed reduction order
        super().on_train_start()

    def on_epoch_start(self):
        _seed_everything(20240 + self.current_epoch)
        super().on_epoch_start()

    def on_epoch_end(self):
        super().on_epoch_end()
        crash = os.environ.get("SELFREG_TEST_CRASH_AT_EPOCH")
        if crash and self.current_epoch == int(crash):
            self.print_to_log_file(f"test: simulated crash after epoch {self.current_epoch - 1}")
            os._exit(75)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("SELFREG_TEST_SKIP_FINAL_VAL", "0") not in ("", "0"):
            self.print_to_log_file("test: final validation skipped")
            return
        super().perform_actual_validation(save_probabilities)
