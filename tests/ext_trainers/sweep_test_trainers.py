"""A trainer that fails on purpose, for the sweep tests (a failed job is reported, the others finish).

Found through ``nnUNet_extTrainer`` like ``selfreg_test_trainers``; its budget comes from the same
``SELFREG_TEST_EPOCHS`` / ``SELFREG_TEST_ITERS`` variables.
"""

import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.trainers.variants import derive_trainer


class _FailsAfterItsFirstEpoch(nnUNetTrainer):
    def on_epoch_end(self):
        super().on_epoch_end()
        raise RuntimeError("test: nnUNetTrainerSweepFails fails on purpose after its first epoch")


def _tiny_budget(trainer) -> None:
    trainer.num_epochs = int(os.environ.get("SELFREG_TEST_EPOCHS", "2"))
    trainer.num_iterations_per_epoch = int(os.environ.get("SELFREG_TEST_ITERS", "3"))
    trainer.num_val_iterations_per_epoch = 1


nnUNetTrainerSweepFails = derive_trainer(
    _FailsAfterItsFirstEpoch, "nnUNetTrainerSweepFails", _tiny_budget, __name__, "Fails after epoch 0 (tests)."
)
