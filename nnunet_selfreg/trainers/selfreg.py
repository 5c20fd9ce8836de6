"""SelfReg-UNet trainers: nnU-Net's own U-Net and loss, plus SCR and IFD on tapped stage outputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.losses.objective import STAT_KEYS, RegularisedSegLoss
from nnunet_selfreg.losses.selfreg import SelfRegRegularizer
from nnunet_selfreg.taps import UNetFeatureTaps, check_tappable
from nnunet_selfreg.trainers.progress import install_extended_logger

_LOG_KEYS = {
    "scr": ("selfreg_scr", "SCR (mean over pairs)"),
    "ifd_enc": ("selfreg_ifd_enc", "IFD encoder (mean over stages)"),
    "ifd_dec": ("selfreg_ifd_dec", "IFD decoder (mean over stages)"),
    "reg_weighted": ("selfreg_weighted", "λ · L_reg (added to the loss)"),
}


def validate_weight(value: Any, name: str) -> float:
    """A regulariser weight must be a finite real number >= 0 (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); set it in __init__")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}; set it in your trainer's __init__")
    return float(value)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """A seed for one epoch of one fold: restarting an epoch (``--c``) redraws the same random numbers."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(fold), int(epoch)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class nnUNetTrainerSelfReg(nnUNetTrainer):
    """nnU-Net with SelfReg-UNet (Zhu et al., MICCAI 2024): ``L = L_seg + λ (IFD_enc + IFD_dec + SCR)``.

    ``L_seg`` is nnU-Net's Dice+CE with deep supervision, unchanged. The network is nnU-Net's own
    (PlainConvUNet or ResidualEncoderUNet); forward hooks tap its stage outputs during training only,
    so checkpoints and inference are plain nnU-Net.
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
        self.selfreg_lambda = 0.015  # λ for the CNN U-Net (paper, reference code)
        self.selfreg_use_scr = True  # semantic consistency regularisation
        self.selfreg_use_ifd = True  # internal feature distillation
        self.selfreg_ifd_detach_first_half = False  # reference: gradient into both halves
        self.selfreg_seed = 12345  # seeds the channel sampling of SCR (with the fold and the epoch)
        self.selfreg_taps = UNetFeatureTaps()

    # ----------------------------------------------------------------------------- set-up
    def _selfreg_log_keys(self) -> dict[str, str]:
        enabled = {
            "scr": self.selfreg_use_scr,
            "ifd_enc": self.selfreg_use_ifd,
            "ifd_dec": self.selfreg_use_ifd,
        }
        return {key: label for term, (key, label) in _LOG_KEYS.items() if enabled.get(term, True)}

    def initialize(self):
        self.selfreg_lambda = validate_weight(self.selfreg_lambda, "selfreg_lambda")
        if not (self.selfreg_use_scr or self.selfreg_use_ifd):
            raise ValueError("selfreg_use_scr and selfreg_use_ifd are both False: use the stock nnUNetTrainer")
        install_extended_logger(self.logger, self._selfreg_log_keys(), f"{self.__class__.__name__} regularisers")
        super().initialize()

    def _build_loss(self):
        # called by nnUNetTrainer.initialize right after the network is built, before any data is
        # loaded: the place for an early, clear error about the architecture
        check_tappable(self.network, min_channels=2 if self.selfreg_use_ifd else 1)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(self.selfreg_seed) + int(self.fold if isinstance(self.fold, int) else 0))
        return RegularisedSegLoss(
            super()._build_loss(),
            self.selfreg_taps,
            SelfRegRegularizer(self.selfreg_use_scr, self.selfreg_use_ifd, self.selfreg_ifd_detach_first_half),
            self.selfreg_lambda,
            generator,
        )

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        # before the first forward, so that a torch.compile-d network traces the hooks
        self.selfreg_taps.attach(self.network, min_channels=2 if self.selfreg_use_ifd else 1)
        net = check_tappable(self.network, 1)
        self.print_to_log_file(
            f"SelfReg: lambda={self.selfreg_lambda}, SCR={'on' if self.selfreg_use_scr else 'off'}, "
            f"IFD={'on' if self.selfreg_use_ifd else 'off'} (detach first half: "
            f"{self.selfreg_ifd_detach_first_half}); tapping {self.selfreg_taps.num_encoder_stages} encoder "
            f"stages {list(net.encoder.output_channels)} channels and {self.selfreg_taps.num_decoder_stages} "
            "decoder stages; teacher F_final = last decoder stage",
            also_print_to_console=True,
        )
        super().on_train_start()

    def on_train_end(self):
        super().on_train_end()
        self.selfreg_taps.detach()  # no hook left for the final validation / any later use

    def on_train_epoch_start(self):
        # the SCR channel sampling restarts from (seed, fold, epoch) every epoch: the generator is not in
        # nnU-Net's checkpoint, so this is what lets a run resumed with --c draw the same channels
        if isinstance(self.loss, RegularisedSegLoss) and self.loss.generator is not None:
            self.loss.generator.manual_seed(self._selfreg_epoch_seed())
        super().on_train_epoch_start()

    def _selfreg_epoch_seed(self) -> int:
        fold = self.fold if isinstance(self.fold, int) else 0
        return epoch_seed(int(self.selfreg_seed), fold, int(self.current_epoch))

    # ----------------------------------------------------------------------------- logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        self._log_selfreg_epoch()
        super().on_train_epoch_end(train_outputs)

    def _log_selfreg_epoch(self) -> None:
        loss = self.loss
        if not isinstance(loss, RegularisedSegLoss):
            return
        if self.is_ddp:
            sums, steps = loss.epoch_sums()
            packed = torch.zeros(len(STAT_KEYS) + 1, device=self.device)
            if sums is not None:
                packed[:-1] = sums
            packed[-1] = steps
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            loss.set_epoch_sums(packed[:-1], int(packed[-1].item()))
        means, steps = loss.pop_epoch_means()
        keys = self._selfreg_log_keys()
        for term, (key, _) in _LOG_KEYS.items():
            if key in keys:
                self.logger.log(key, means[term], self.current_epoch)
        parts = [
            f"{key[len('selfreg_') :]} {np.round(means[term], 6)}"
            for term, (key, _) in _LOG_KEYS.items()
            if key in keys
        ]
        msg = "SelfReg epoch means: " + ", ".join(parts) + f" ({steps} steps)"
        if means["nonfinite_steps"]:
            msg += f"; WARNING: L_reg was non-finite and skipped in {int(means['nonfinite_steps'])} step(s)"
        self.print_to_log_file(msg)


class nnUNetTrainerSelfReg_SCROnly(nnUNetTrainerSelfReg):
    """Ablation: semantic consistency regularisation only."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.selfreg_use_ifd = False


class nnUNetTrainerSelfReg_IFDOnly(nnUNetTrainerSelfReg):
    """Ablation: internal feature distillation only."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.selfreg_use_scr = False
