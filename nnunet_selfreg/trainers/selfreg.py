"""SelfReg-UNet as a capability of any nnU-Net trainer (:class:`SelfRegMixin`), and its trainers.

``class MyTrainer(SelfRegMixin, AnyNnUNetTrainer)`` trains ``AnyNnUNetTrainer`` with SelfReg: the mixin
wraps whatever loss the trainer builds, taps the network's declared feature maps
(:mod:`nnunet_selfreg.taps`), logs the terms, and resumes exactly. The mixin must come first, so that
its methods run and then hand over to the trainer's with ``super()``.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_selfreg.losses.selfreg import SelfRegRegularizer
from nnunet_selfreg.losses.selfreg_objective import RegularisedSegLoss
from nnunet_selfreg.taps import FeatureTaps, TapPoints, tap_points
from nnunet_selfreg.trainers.core import (
    epoch_seed,
    format_means,
    log_epoch_means,
    register_trainer,
    validate_weight,
)
from nnunet_selfreg.trainers.progress import install_extended_logger

_LOG_KEYS = {
    "scr": ("selfreg_scr", "SCR (mean over pairs)"),
    "ifd_enc": ("selfreg_ifd_enc", "IFD encoder (mean over stages)"),
    "ifd_dec": ("selfreg_ifd_dec", "IFD decoder (mean over stages)"),
    "reg_weighted": ("selfreg_weighted", "λ · L_reg (added to the loss)"),
}


class SelfRegMixin:
    """SelfReg-UNet (Zhu et al., MICCAI 2024) on any nnU-Net trainer.

    ``L = L_seg + λ_IFD (IFD_enc + IFD_dec) + λ_SCR SCR``.

    ``L_seg`` is the trainer's own loss (nnU-Net's Dice+CE with deep supervision by default), unchanged.
    Forward hooks tap the network's declared maps during training only, so checkpoints and inference are
    the trainer's own. On nnU-Net's U-Nets, as in the authors' code, the students are ``e_2 … e_S`` and
    ``d_1 … d_{S-2}`` and the teacher is ``d_{S-1}`` (docs/method.md). Use it first in the bases:
    ``class T(SelfRegMixin, nnUNetTrainerDA5)``.
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
        self.selfreg_lambda = 0.015  # λ for the CNN U-Net (paper text; the reference's Synapse U-Net script)
        self.selfreg_lambda_scr: float | None = None  # separate λ for SCR (None: selfreg_lambda)
        self.selfreg_lambda_ifd: float | None = None  # separate λ for IFD_enc + IFD_dec (None: selfreg_lambda)
        # True: multiply the λs by nnU-Net's weight_ce + weight_dice (2), so that SelfReg weighs as much
        # relative to L_seg as in the reference, whose L_seg is a convex mix of CE and Dice (weights sum to 1)
        self.selfreg_lambda_relative_to_seg = False
        self.selfreg_use_scr = True  # semantic consistency regularisation
        self.selfreg_use_ifd = True  # internal feature distillation
        self.selfreg_ifd_detach_first_half = False  # reference: gradient into both halves
        self.selfreg_tap_first_encoder = False  # reference: e_1 (full resolution) is not a student
        self.selfreg_seed = 12345  # seeds the channel sampling of SCR (with the fold and the epoch)
        self.selfreg_taps = FeatureTaps()

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
        for name in ("selfreg_lambda_scr", "selfreg_lambda_ifd"):
            if getattr(self, name) is not None:
                setattr(self, name, validate_weight(getattr(self, name), name))
        if not (self.selfreg_use_scr or self.selfreg_use_ifd):
            raise ValueError("selfreg_use_scr and selfreg_use_ifd are both False: use the stock nnUNetTrainer")
        install_extended_logger(self.logger, self._selfreg_log_keys(), f"{self.__class__.__name__} regularisers")
        super().initialize()

    def _selfreg_min_channels(self) -> int:
        return 2 if self.selfreg_use_ifd else 1

    def _check_selfreg_network(self) -> TapPoints:
        """The network's tap points, checked (IFD needs >= 2 channels in every student, where widths are known)."""
        points = tap_points(self.network)
        first = self._selfreg_first_student(points)
        for i, c in enumerate((points.encoder_channels or ())[first:], start=first):
            if c < self._selfreg_min_channels():
                raise ValueError(
                    f"encoder stage {i} has {c} feature channel(s); SelfReg's internal feature distillation "
                    "needs at least 2. Raise 'features_per_stage' in the plans (every stage needs >= 2) or use "
                    "nnUNetTrainerSelfReg_SCROnly."
                )
        return points

    def _selfreg_first_student(self, points: TapPoints) -> int:
        return 0 if self.selfreg_tap_first_encoder else points.first_student

    @staticmethod
    def _seg_loss_weight_sum(seg_loss) -> float:
        """``weight_ce + weight_dice`` of nnU-Net's (deep-supervision wrapped) compound loss."""
        inner = getattr(seg_loss, "loss", seg_loss)
        if not (hasattr(inner, "weight_ce") and hasattr(inner, "weight_dice")):
            raise TypeError(
                f"selfreg_lambda_relative_to_seg needs nnU-Net's DC_and_CE_loss (weight_ce, weight_dice), but "
                f"_build_loss returned {type(inner).__name__}; set the λs directly instead"
            )
        return float(inner.weight_ce) + float(inner.weight_dice)

    def selfreg_term_weights(self, seg_loss=None) -> dict[str, float]:
        """The effective λ of each regulariser term (0 for a disabled term)."""
        scale = self._seg_loss_weight_sum(seg_loss) if self.selfreg_lambda_relative_to_seg else 1.0
        lam_scr = self.selfreg_lambda if self.selfreg_lambda_scr is None else self.selfreg_lambda_scr
        lam_ifd = self.selfreg_lambda if self.selfreg_lambda_ifd is None else self.selfreg_lambda_ifd
        return {
            "scr": scale * lam_scr if self.selfreg_use_scr else 0.0,
            "ifd_enc": scale * lam_ifd if self.selfreg_use_ifd else 0.0,
            "ifd_dec": scale * lam_ifd if self.selfreg_use_ifd else 0.0,
        }

    def _build_loss(self):
        # called by nnUNetTrainer.initialize right after the network is built, before any data is
        # loaded: the place for an early, clear error about the architecture
        points = self._check_selfreg_network()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(self.selfreg_seed) + int(self.fold if isinstance(self.fold, int) else 0))
        seg_loss = super()._build_loss()
        return RegularisedSegLoss(
            seg_loss,
            self.selfreg_taps,
            SelfRegRegularizer(
                self.selfreg_use_scr,
                self.selfreg_use_ifd,
                self.selfreg_ifd_detach_first_half,
                include_first_encoder=self._selfreg_first_student(points) == 0,
            ),
            self.selfreg_term_weights(seg_loss),
            generator,
        )

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.attach_feature_taps()
        points = self._check_selfreg_network()
        first = self._selfreg_first_student(points)
        weights = self.loss.weight if isinstance(self.loss, RegularisedSegLoss) else {}
        n_enc, n_dec = len(points.encoder), len(points.decoder)
        self.print_to_log_file(
            f"SelfReg: lambda={self.selfreg_lambda} -> effective weights {weights}"
            f"{' (x weight_ce + weight_dice)' if self.selfreg_lambda_relative_to_seg else ''}, "
            f"SCR={'on' if self.selfreg_use_scr else 'off'}, IFD={'on' if self.selfreg_use_ifd else 'off'} "
            f"(detach first half: {self.selfreg_ifd_detach_first_half}); network "
            f"{type(self.selfreg_taps._network()).__name__}: students e_{first + 1}..e_{n_enc} "
            f"{list((points.encoder_channels or ())[first:])} channels and d_1..d_{n_dec - 1}; teacher F_final = "
            f"d_{n_dec} ({points.description or 'declared tap points'})",
            also_print_to_console=True,
        )
        super().on_train_start()

    def attach_feature_taps(self) -> None:
        # before the first forward, so that a torch.compile-d network traces the hooks
        self.selfreg_taps.attach(self.network, min_channels=1)

    def detach_feature_taps(self) -> None:
        self.selfreg_taps.detach()

    def on_train_end(self):
        super().on_train_end()
        self.detach_feature_taps()  # no hook left for the final validation / any later use

    def on_train_epoch_start(self):
        # the SCR channel sampling restarts from (seed, fold, epoch) every epoch: the generator is not in
        # nnU-Net's checkpoint, so this is what lets a run resumed with --c draw the same channels
        if isinstance(self.loss, RegularisedSegLoss) and self.loss.generator is not None:
            self.loss.generator.manual_seed(self._selfreg_epoch_seed())
        super().on_train_epoch_start()

    def _selfreg_epoch_seed(self) -> int:
        return epoch_seed(int(self.selfreg_seed), self.fold, int(self.current_epoch))

    # ----------------------------------------------------------------------------- logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        self._log_selfreg_epoch()
        super().on_train_epoch_end(train_outputs)

    def _log_selfreg_epoch(self) -> None:
        loss = self.loss
        if not isinstance(loss, RegularisedSegLoss):
            return
        result = loss.epoch_stats.pop_means(ddp=self.is_ddp, device=self.device)  # all ranks' steps
        keys = self._selfreg_log_keys()
        means = {key: result.means[term] for term, (key, _) in _LOG_KEYS.items() if key in keys}
        msg = f"SelfReg epoch means: {format_means(means, 'selfreg_')} ({result.steps} steps)"
        if result.nonfinite_steps:
            msg += f"; WARNING: L_reg was non-finite and skipped in {result.nonfinite_steps} step(s)"
        log_epoch_means(self, means, msg)


@register_trainer(repeats=True, timed="default")
class nnUNetTrainerSelfReg(SelfRegMixin, nnUNetTrainer):
    """nnU-Net's default trainer with SelfReg-UNet (see :class:`SelfRegMixin`)."""


@register_trainer(timed="default")
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


@register_trainer
class nnUNetTrainerSelfReg_RelativeLambda(nnUNetTrainerSelfReg):
    """λ relative to ``L_seg`` as in the reference: λ · (weight_ce + weight_dice), i.e. 0.03 with nnU-Net's 1 + 1.

    The reference's segmentation loss is a convex mix of CE and Dice (0.3/0.7 on ACDC, 0.4/0.6 on
    Synapse); nnU-Net's is CE + Dice, so the same λ weighs SelfReg half as much relative to ``L_seg``.
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
        self.selfreg_lambda_relative_to_seg = True


@register_trainer(timed="default")
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
