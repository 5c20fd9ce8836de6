"""M2SNet / MSNet trainers: the plans' encoder with a subtraction decoder, plus LossNet in the loss.

``L = L_seg + lossnet_weight · LossNet(P, G)``. ``L_seg`` is nnU-Net's Dice+CE with deep supervision
on every decoder resolution (``nnUNetTrainerM2SNet``), or the authors' structure loss, one-vs-rest per
foreground class, with nnU-Net's deep-supervision weights (``nnUNetTrainerM2SNet_StructureLoss``,
``nnUNetTrainerMSNet_StructureLoss``: the paper's total loss, with which the authors' ``train.py``
trains MSNet). LossNet (frozen VGG-16) compares the full-resolution probabilities with the
one-hot ground truth. LossNet is a trainer attribute, not part of ``self.network``, so checkpoints
hold only the segmentation network and ``nnUNetv2_predict`` rebuilds it through
:meth:`nnUNetTrainerM2SNet.build_network_architecture`.

LossNet's weights decide what the method is, so they are never chosen silently: without a VGG-16
weights file the LossNet trainers stop in ``initialize`` (before any data is loaded) with an error
that says where to put the ImageNet file; a random VGG-16 is used only by the ``_RandomLossNet``
trainers, which say so in the log, in ``debug.json`` and in every checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_selfreg.losses.lossnet import (
    DEFAULT_MAX_CLASSES,
    ENV_VGG16_WEIGHTS,
    EPOCH_TERM,
    LossNet,
    MissingVGG16WeightsError,
    SegLossWithLossNet,
    missing_weights_message,
    resolve_vgg16_weights,
)
from nnunet_selfreg.losses.structure import StructureLoss
from nnunet_selfreg.networks.m2snet import build_m2snet
from nnunet_selfreg.nnunet_folders import DEBUG_JSON
from nnunet_selfreg.trainers.core import (
    checkpoint_entries,
    epoch_seed,
    log_epoch_means,
    register_trainer,
    validate_weight,
)
from nnunet_selfreg.trainers.progress import install_extended_logger

LOG_KEY = "m2snet_lossnet"
#: checkpoint entry recording which LossNet weights the run used (see LossNet.provenance)
CHECKPOINT_KEY = "m2snet_lossnet"


@register_trainer
class nnUNetTrainerM2SNet(nnUNetTrainer):
    """nnU-Net with M2SNet (Zhao et al., 2023): subtraction-pyramid decoder + 0.1 · LossNet.

    Network hyper-parameters (width 64, multi-scale units, full fixed filters) are fixed by
    :meth:`build_network_architecture`, which inference calls without a trainer instance; override
    it in a subclass to change them. Loss hyper-parameters are attributes set in ``__init__``.
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lossnet_weight = 0.1  # paper: structure loss + 0.1 · LossNet
        self.lossnet_vgg16_weights: str | None = None  # path; None: $NNUNET_SELFREG_VGG16_WEIGHTS, else an error
        self.lossnet_random_init = False  # True: seeded random VGG-16, not the paper's LossNet (_RandomLossNet)
        self.lossnet_random_seed = 0  # seed of that random VGG-16
        self.lossnet_input_size = 224  # VGG-16 input side, as in the paper
        self.lossnet_max_slices = 8  # 3D: slices along the first spatial axis per step
        self.lossnet_include_background = False  # label training: compare foreground classes only
        self.lossnet_max_classes = DEFAULT_MAX_CLASSES  # 4 class maps per step, a seeded draw: our extension
        self.lossnet_seed = 12345  # seeds the draws of 3D slices and classes (with the fold and the epoch)
        self.use_structure_loss = False  # True: the authors' structure loss instead of nnU-Net's Dice+CE
        self.structure_kernel_size = 31  # boundary window of the structure loss (voxels, every axis)
        self.structure_boundary_weight = 5.0  # w = 1 + 5 |box(g) - g|
        self.structure_weighted_bce = False  # True: the paper's boundary-weighted BCE; False: the authors' code
        self.lossnet: LossNet | None = None  # built in _build_loss, kept outside self.network
        # which LossNet the run uses, set when it is built (nnU-Net writes every attribute to debug.json)
        self.lossnet_source: str | None = None
        self.lossnet_vgg16_sha256: str | None = None
        self.lossnet_is_random: bool | None = None
        self._lossnet_check_deferred = False

    @staticmethod
    def build_network_architecture(
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        return build_m2snet(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision
        )

    # ----------------------------------------------------------------------------- set-up
    def _uses_lossnet(self) -> bool:
        return self.lossnet_weight > 0

    def _check_lossnet_weights_given(self) -> None:
        if self._uses_lossnet() and not self.lossnet_random_init:
            path, _ = resolve_vgg16_weights(self.lossnet_vgg16_weights)
            if path is None:
                raise MissingVGG16WeightsError(missing_weights_message())

    def initialize(self):
        self.lossnet_weight = validate_weight(self.lossnet_weight, "lossnet_weight")
        if not self._lossnet_check_deferred:
            self._check_lossnet_weights_given()  # before the network is built or any data is read
        if self.use_structure_loss and self.label_manager.ignore_label is not None:
            raise ValueError(
                f"{self.__class__.__name__}: the structure loss does not support nnU-Net's ignore label "
                f"({self.label_manager.ignore_label}); train with nnUNetTrainerM2SNet (nnU-Net's loss handles it)"
            )
        if self._uses_lossnet():
            install_extended_logger(
                self.logger, {LOG_KEY: "LossNet (unweighted)"}, f"{self.__class__.__name__} LossNet"
            )
        super().initialize()

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        # --val and --c load a checkpoint first, which initializes: validation needs no LossNet, so a missing
        # weights file is reported by on_train_start instead (still before any data is loaded)
        self._lossnet_check_deferred = True
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self._lossnet_check_deferred = False

    def _build_seg_loss(self) -> nn.Module:
        """nnU-Net's loss, or (``use_structure_loss``) the structure loss with nnU-Net's deep-supervision weights."""
        loss = super()._build_loss()
        if not self.use_structure_loss:
            return loss
        structure = StructureLoss(
            has_regions=self.label_manager.has_regions,
            kernel_size=self.structure_kernel_size,
            boundary_weight=self.structure_boundary_weight,
            weighted_bce=self.structure_weighted_bce,
        )
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = structure  # keep nnU-Net's weights (1/2^i, coarsest 0, normalised; DDP variant included)
            return loss
        return structure

    def _build_loss(self):
        seg_loss = self._build_seg_loss()
        if not self._uses_lossnet():
            return seg_loss
        fold = self.fold if isinstance(self.fold, int) else 0
        try:
            self.lossnet = LossNet(
                self.lossnet_vgg16_weights,
                input_size=self.lossnet_input_size,
                max_slices=self.lossnet_max_slices,
                slice_seed=int(self.lossnet_seed) + fold,
                random_init=self.lossnet_random_init,
                random_seed=self.lossnet_random_seed,
                max_classes=self.lossnet_max_classes,
            ).to(self.device)
        except MissingVGG16WeightsError:
            if self._lossnet_check_deferred:
                return seg_loss  # validation only, or on_train_start raises
            raise
        self.lossnet_source = self.lossnet.source
        self.lossnet_vgg16_sha256 = self.lossnet.sha256
        self.lossnet_is_random = self.lossnet.random_seed is not None
        return SegLossWithLossNet(
            seg_loss,
            self.lossnet,
            self.lossnet_weight,
            has_regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label,
            include_background=self.lossnet_include_background,
        )

    def _log_lossnet(self) -> None:
        if self.lossnet is None:
            self.print_to_log_file("LossNet: off (lossnet_weight = 0)", also_print_to_console=True)
            return
        is_3d = len(self.configuration_manager.patch_size) == 3
        self.print_to_log_file(
            f"LossNet: weight {self.lossnet_weight}, {self.lossnet.source}, input "
            f"{self.lossnet.input_size}x{self.lossnet.input_size}"
            + (f", at most {self.lossnet.max_slices} slices per step" if is_3d else "")
            + (f", at most {self.lossnet.max_classes} class maps per step" if self.lossnet.max_classes else ""),
            also_print_to_console=True,
        )
        if self.lossnet_is_random:
            ignored = resolve_vgg16_weights(self.lossnet_vgg16_weights)[0]
            self.print_to_log_file(
                f"WARNING: LossNet is a RANDOMLY INITIALISED VGG-16 (seed {self.lossnet.random_seed}), as "
                f"{self.__class__.__name__} asks; results are not the paper's M2SNet LossNet"
                + (f" (the weights file {ignored} is ignored)" if ignored else ""),
                also_print_to_console=True,
            )
        elif not self.lossnet.imagenet:
            for line in (
                "!" * 100,
                f"WARNING: the LossNet weights file {self.lossnet.weights_path} is not torchvision's ImageNet VGG-16:",
                f"  its sha256 is {self.lossnet.sha256}",
                f"  expected      {self.lossnet.provenance()['expected_sha256']} (vgg16-397923af.pth).",
                f"  Training goes on with these weights (${ENV_VGG16_WEIGHTS} may point at your own); the sha256 is",
                f"  recorded in {DEBUG_JSON} and in every checkpoint. Results are not the paper's ImageNet LossNet.",
                "!" * 100,
            ):
                self.print_to_log_file(line, also_print_to_console=True)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self._uses_lossnet() and self.lossnet is None:  # initialized by load_checkpoint (--c) without weights
            raise MissingVGG16WeightsError(missing_weights_message())
        net = self.network.module if self.is_ddp else self.network
        net = getattr(net, "_orig_mod", net)
        n_params = sum(p.numel() for p in net.parameters())
        dec = net.decoder
        units = (
            f"multi-scale subtraction units (|A-B| + fixed {dec.fixed_filter_mode} all-ones 3 and 5 filters, shared)"
            if dec.multi_scale
            else "single-scale subtraction units |A-B|"
        )
        self.print_to_log_file(
            f"{type(net).__name__}: width {dec.width}, {units}, {len(dec.reduce)} encoder levels, "
            f"{n_params:,} parameters",
            also_print_to_console=True,
        )
        self.print_to_log_file(
            "Segmentation loss: "
            + (
                f"structure loss (BCE + boundary-weighted IoU, window {self.structure_kernel_size}, one-vs-rest)"
                if self.use_structure_loss
                else "nnU-Net's Dice + CE"
            )
            + (" with nnU-Net's deep supervision" if self.enable_deep_supervision else ""),
            also_print_to_console=True,
        )
        self._log_lossnet()
        super().on_train_start()

    # ----------------------------------------------------------------------------- epochs
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.loss.train()
        if self.lossnet is not None:  # per-epoch seed: a run resumed with --c draws the same slices and classes
            self.lossnet.reseed(epoch_seed(int(self.lossnet_seed), self.fold, int(self.current_epoch)))

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.eval()  # validation loss = the segmentation loss only, comparable with the baseline

    def on_train_epoch_end(self, train_outputs: list[dict]):
        self._log_lossnet_epoch()
        super().on_train_epoch_end(train_outputs)

    def _log_lossnet_epoch(self) -> None:
        if not isinstance(self.loss, SegLossWithLossNet):
            return
        result = self.loss.epoch_stats.pop_means(ddp=self.is_ddp, device=self.device)  # all ranks' steps
        mean = result.means[EPOCH_TERM]
        log_epoch_means(
            self,
            {LOG_KEY: mean},
            f"LossNet epoch mean: {np.round(mean, 6)} (weighted {np.round(self.lossnet_weight * mean, 6)}, "
            f"{result.steps} steps)",
        )

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        # which LossNet weights the run used joins the checkpoint nnU-Net writes (core.checkpoint_entries)
        with checkpoint_entries(filename, self._lossnet_checkpoint_entry):
            super().save_checkpoint(filename)

    def _lossnet_checkpoint_entry(self) -> dict:
        if self.lossnet is None:
            return {}
        return {CHECKPOINT_KEY: {**self.lossnet.provenance(), "weight": self.lossnet_weight}}


@register_trainer(timed="all")
class nnUNetTrainerM2SNet_NoLossNet(nnUNetTrainerM2SNet):
    """Ablation: the M2SNet architecture with nnU-Net's loss only."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lossnet_weight = 0.0


# timed in M2SNet's place: the same VGG-16 layers and input size as the ImageNet LossNet, no weights file
@register_trainer(timed="all")
class nnUNetTrainerM2SNet_RandomLossNet(nnUNetTrainerM2SNet):
    """M2SNet whose LossNet is a frozen, randomly initialised VGG-16 (seeded): explicitly not the paper's."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lossnet_random_init = True


@register_trainer
class nnUNetTrainerM2SNet_StructureLoss(nnUNetTrainerM2SNet):
    """The paper's total loss: structure loss (one-vs-rest, nnU-Net's deep supervision) + 0.1 · LossNet."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_structure_loss = True


@register_trainer
class nnUNetTrainerMSNet(nnUNetTrainerM2SNet):
    """MSNet (MICCAI 2021): single-scale subtraction units ``|A − B|``, with 0.1 · LossNet."""

    @staticmethod
    def build_network_architecture(
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        return build_m2snet(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
            multi_scale=False,
        )


@register_trainer
class nnUNetTrainerMSNet_StructureLoss(nnUNetTrainerMSNet, nnUNetTrainerM2SNet_StructureLoss):
    """MSNet with the loss its authors train it with (their ``train.py``): structure loss + 0.1 · LossNet.

    The network comes from ``nnUNetTrainerMSNet`` (first in the method resolution order), the
    ``use_structure_loss = True`` from ``nnUNetTrainerM2SNet_StructureLoss.__init__``.
    """


@register_trainer
class nnUNetTrainerMSNet_RandomLossNet(nnUNetTrainerMSNet):
    """MSNet whose LossNet is a frozen, randomly initialised VGG-16 (seeded): explicitly not the paper's."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lossnet_random_init = True
