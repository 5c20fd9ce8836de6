"""M2SNet / MSNet trainers: the plans' encoder with a subtraction decoder, plus LossNet in the loss.

``L = L_seg + lossnet_weight · LossNet(P, G)``: ``L_seg`` is nnU-Net's Dice+CE with deep supervision
on every decoder resolution, LossNet (frozen VGG-16) compares the full-resolution probabilities with
the one-hot ground truth. LossNet is a trainer attribute, not part of ``self.network``, so
checkpoints hold only the segmentation network and ``nnUNetv2_predict`` rebuilds it through
:meth:`nnUNetTrainerM2SNet.build_network_architecture`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_selfreg.losses.lossnet import LossNet, SegLossWithLossNet
from nnunet_selfreg.networks.m2snet import build_m2snet
from nnunet_selfreg.trainers.progress import install_extended_logger
from nnunet_selfreg.trainers.selfreg import validate_weight

LOG_KEY = "m2snet_lossnet"


class nnUNetTrainerM2SNet(nnUNetTrainer):
    """nnU-Net with M2SNet (Zhao et al., 2023): subtraction-pyramid decoder + 0.1 · LossNet.

    Network hyper-parameters (width 64, multi-scale units) are fixed by
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
        self.lossnet_vgg16_weights: str | None = None  # path; None: $NNUNET_SELFREG_VGG16_WEIGHTS, else random VGG
        self.lossnet_input_size = 224  # VGG-16 input side, as in the paper
        self.lossnet_max_slices = 8  # 3D: slices along the first spatial axis per step
        self.lossnet_include_background = False  # label training: compare foreground classes only
        self.lossnet_seed = 12345  # seeds the 3D slice draw (with the fold)
        self.lossnet: LossNet | None = None  # built in _build_loss, kept outside self.network

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

    def initialize(self):
        self.lossnet_weight = validate_weight(self.lossnet_weight, "lossnet_weight")
        if self._uses_lossnet():
            install_extended_logger(
                self.logger, {LOG_KEY: "LossNet (unweighted)"}, f"{self.__class__.__name__} LossNet"
            )
        super().initialize()

    def _build_loss(self):
        seg_loss = super()._build_loss()
        if not self._uses_lossnet():
            return seg_loss
        fold = self.fold if isinstance(self.fold, int) else 0
        self.lossnet = LossNet(
            self.lossnet_vgg16_weights,
            input_size=self.lossnet_input_size,
            max_slices=self.lossnet_max_slices,
            slice_seed=int(self.lossnet_seed) + fold,
        ).to(self.device)
        return SegLossWithLossNet(
            seg_loss,
            self.lossnet,
            self.lossnet_weight,
            has_regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label,
            include_background=self.lossnet_include_background,
        )

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        net = self.network.module if self.is_ddp else self.network
        net = getattr(net, "_orig_mod", net)
        n_params = sum(p.numel() for p in net.parameters())
        self.print_to_log_file(
            f"{type(net).__name__}: width {net.decoder.width}, "
            f"{'multi-scale (1, 3, 5)' if net.decoder.multi_scale else 'single-scale'} subtraction units, "
            f"{len(net.decoder.reduce)} encoder levels, {n_params:,} parameters",
            also_print_to_console=True,
        )
        if self.lossnet is not None:
            is_3d = len(self.configuration_manager.patch_size) == 3
            self.print_to_log_file(
                f"LossNet: weight {self.lossnet_weight}, {self.lossnet.source}, input "
                f"{self.lossnet.input_size}x{self.lossnet.input_size}"
                + (f", at most {self.lossnet.max_slices} slices per step" if is_3d else ""),
                also_print_to_console=True,
            )
        else:
            self.print_to_log_file("LossNet: off (lossnet_weight = 0)", also_print_to_console=True)
        super().on_train_start()

    # ----------------------------------------------------------------------------- epochs
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.loss.train()

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.eval()  # validation loss = nnU-Net's loss only, comparable with the baseline

    def on_train_epoch_end(self, train_outputs: list[dict]):
        if isinstance(self.loss, SegLossWithLossNet):
            if self.is_ddp:
                total, steps = self.loss.epoch_sum()
                packed = torch.zeros(2, device=self.device)
                if total is not None:
                    packed[0] = total
                packed[1] = steps
                dist.all_reduce(packed, op=dist.ReduceOp.SUM)
                self.loss.set_epoch_sum(packed[0], int(packed[1].item()))
            mean, steps = self.loss.pop_epoch_mean()
            self.logger.log(LOG_KEY, mean, self.current_epoch)
            self.print_to_log_file(
                f"LossNet epoch mean: {np.round(mean, 6)} (weighted {np.round(self.lossnet_weight * mean, 6)}, "
                f"{steps} steps)"
            )
        super().on_train_epoch_end(train_outputs)


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
