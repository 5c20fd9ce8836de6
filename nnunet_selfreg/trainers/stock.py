"""nnU-Net's stock trainer, the baseline of every comparison: its ``_Budget`` and repeat variants.

nnU-Net ships ``nnUNetTrainer`` and its ``_Nepochs`` lengths itself; a same-budget baseline for the
``*_Budget`` trainers (``nnUNetTrainer_Budget``) and repeated runs of it (``nnUNetTrainer_Rep2``,
the run-to-run noise floor that ``nnunet-selfreg compare`` reports) are ours.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.trainers.core import register_trainer

register_trainer(nnUNetTrainer, epochs=False, repeats=True, export=False, timed="default")
