"""SS-Net for nnU-Net: semi-supervised training on labelled and unlabelled cases of one dataset.

Unlabelled cases are ordinary nnU-Net training cases whose label map is entirely the ignore label;
``dataset.json`` lists them under ``nnunet_selfreg.unlabeled_cases`` (``nnunet-selfreg add-unlabeled``
builds such a dataset). Cross-validation folds are made of labelled cases only; every unlabelled
case joins every training fold (see :func:`semi_supervised_keys`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import Tensor, autocast

from nnunet_selfreg.data.mixed_batches import MixedBatchDataLoader
from nnunet_selfreg.data.semisupervised import (
    SemiSupervisedDataError,
    check_semi_supervised_split,
    semi_supervised_splits,
    unlabeled_cases,
)
from nnunet_selfreg.losses.class_separation import (
    MEMORY_KEEP,
    MEMORY_SCORING,
    MEMORY_WEIGHTS,
    ClassSeparationHeads,
    PrototypeMemory,
    class_separation_loss,
)
from nnunet_selfreg.losses.schedule import sigmoid_rampup_weight
from nnunet_selfreg.losses.vat import VAT_DISTANCES, VAT_INITS, frozen_batchnorm_stats, virtual_adversarial_loss
from nnunet_selfreg.nnunet_folders import DATASET_JSON, SPLITS_JSON
from nnunet_selfreg.outputs import write_file_atomically
from nnunet_selfreg.taps import StageOutputTap, finest_decoder_stage, unwrap_network
from nnunet_selfreg.trainers.core import (
    EpochStats,
    checkpoint_entries,
    epoch_seed,
    format_means,
    log_epoch_means,
    register_trainer,
    validate_weight,
)
from nnunet_selfreg.trainers.progress import install_extended_logger

#: per-step terms (train_step returns them under "ssnet"; their epoch means go to the log and progress.png)
SSNET_TERMS = ("ssnet_sup", "ssnet_lds", "ssnet_cs_labeled", "ssnet_cs_unlabeled", "ssnet_weight")
_LOG_LABELS = {
    "ssnet_sup": "L_sup (nnU-Net's loss, labelled part)",
    "ssnet_lds": "L_lds (VAT smoothness)",
    "ssnet_cs_labeled": "L_cs labelled",
    "ssnet_cs_unlabeled": "L_cs unlabelled",
    "ssnet_weight": "w(t)",
}
CHECKPOINT_KEY = "ssnet"

#: the reference's per-dimension settings (its 2D ACDC and 3D LA training scripts), the defaults here
REFERENCE_SETTINGS: dict[int, dict[str, float | str]] = {
    2: {"consistency": 0.1, "rampup_length": 200, "vat_xi": 10.0, "vat_eps": 6.0, "vat_distance": "soft_dice"},
    3: {"consistency": 1.0, "rampup_length": 40, "vat_xi": 10.0, "vat_eps": 10.0, "vat_distance": "binary_dice"},
}


def average_gradients(parameters) -> None:
    """Average ``.grad`` over all ranks in one all-reduce (a missing gradient counts as zero)."""
    params = list(parameters)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _check_semi_supervised_dataset(trainer: nnUNetTrainer, unlabeled: list[str]) -> None:
    """The dataset has unlabelled cases, plain integer labels and an ignore label to fill their label maps."""
    if not unlabeled:
        raise SemiSupervisedDataError(
            f"{trainer.__class__.__name__} needs unlabelled cases, but the {DATASET_JSON} of "
            f"{trainer.plans_manager.dataset_name} lists none under 'nnunet_selfreg.unlabeled_cases'. Build a "
            "semi-supervised dataset with `nnunet-selfreg add-unlabeled -d <dataset> -i <folder of unlabelled "
            "images>` and preprocess it, or train the stock nnUNetTrainer on a fully labelled dataset."
        )
    if trainer.label_manager.has_regions:
        raise SemiSupervisedDataError(
            "region-based (sigmoid) label definitions are not supported by SS-Net: its class-separation term "
            "needs one softmax class per pixel. Use a dataset with plain integer labels."
        )
    if trainer.label_manager.ignore_label is None:
        raise SemiSupervisedDataError(
            "the dataset lists unlabelled cases but has no ignore label: their label maps would be read as "
            "background. Add an 'ignore' label (the highest value) whose value fills the unlabelled label maps "
            "(`nnunet-selfreg add-unlabeled` does this)."
        )


def _preprocessed_cases(trainer: nnUNetTrainer, unlabeled: list[str]) -> set[str]:
    """The case ids of the preprocessed configuration; every unlabelled case must be among them."""
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    identifiers = set(trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder))
    missing = sorted(set(unlabeled) - identifiers)
    if missing:
        raise SemiSupervisedDataError(
            f"{len(missing)} unlabelled case(s) listed in {DATASET_JSON} are not in "
            f"{trainer.preprocessed_dataset_folder} (e.g. {missing[:3]}): "
            "run nnUNetv2_plan_and_preprocess again for this configuration."
        )
    return identifiers


def _splits(trainer: nnUNetTrainer, labeled: list[str], unlabeled: list[str], splits_file: str) -> list[dict]:
    """The splits file's folds, or (absent) semi-supervised 5-fold splits, written by rank 0."""
    if isfile(splits_file):
        splits = load_json(splits_file)
        trainer.print_to_log_file(f"Using splits from existing split file: {splits_file}")
        return splits
    splits = semi_supervised_splits(labeled, unlabeled)
    if trainer.local_rank == 0:
        write_file_atomically(splits_file, lambda tmp: save_json(splits, str(tmp)))
    trainer.print_to_log_file(
        f"Created semi-supervised 5-fold splits ({len(labeled)} labelled cases folded, {len(unlabeled)} unlabelled "
        f"cases in every training fold): {splits_file}"
    )
    return splits


def semi_supervised_keys(trainer: nnUNetTrainer) -> tuple[list[str], list[str], list[str]]:
    """(labelled training, unlabelled training, validation) case ids of ``trainer.fold``.

    Reads ``splits_final.json`` in the preprocessed folder, or writes it when absent: the labelled
    cases in nnU-Net's own seeded 5-fold split, every unlabelled case in every training fold. A splits
    file that validates on unlabelled cases (e.g. written by a stock trainer) is refused.
    """
    unlabeled = unlabeled_cases(trainer.dataset_json)
    _check_semi_supervised_dataset(trainer, unlabeled)
    unl = set(unlabeled)
    labeled = sorted(_preprocessed_cases(trainer, unlabeled) - unl)
    if trainer.fold == "all":
        return labeled, sorted(unl), labeled
    splits_file = join(trainer.preprocessed_dataset_folder_base, SPLITS_JSON)
    splits = _splits(trainer, labeled, sorted(unl), splits_file)
    if not isinstance(trainer.fold, int) or not 0 <= trainer.fold < len(splits):
        raise SemiSupervisedDataError(
            f"fold {trainer.fold} is not in {splits_file} ({len(splits)} folds). SS-Net does not fall back to "
            "nnU-Net's random 80:20 split: add the fold to the splits file."
        )
    split = splits[trainer.fold]
    check_semi_supervised_split(split, unl, trainer.fold, splits_file)
    tr_lab = [k for k in split["train"] if k not in unl]
    tr_unl = [k for k in split["train"] if k in unl]
    return tr_lab, tr_unl, list(split["val"])


@contextlib.contextmanager
def _training_loader_from(
    is_training_data: Callable[[object], bool], make_loader: Callable[..., MixedBatchDataLoader]
) -> Iterator[list]:
    """Within the block, nnU-Net's ``get_dataloaders`` builds the training loader with ``make_loader``.

    nnU-Net 2.8.1 constructs both loaders inside ``get_dataloaders`` from its trainer module's name
    ``nnUNetDataLoader``, and offers no attribute or method that chooses the class. The alternatives are
    worse: copying that method (transforms, augmenter processes, warm-up) forks nnU-Net's code, and
    replacing the loader after it returns means starting and discarding a pool of augmentation workers
    that already hold the stock loader. So, for the duration of that one call, the name answers the
    training dataset (``is_training_data``: the datasets are made inside the same call) with
    ``make_loader`` and everything else (the validation loader) with nnU-Net's class. Yields the
    loaders made by ``make_loader``.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    stock = trainer_module.nnUNetDataLoader
    made: list = []

    def loader(data, *args, **kwargs):
        if not is_training_data(data):
            return stock(data, *args, **kwargs)
        made.append(make_loader(data, *args, **kwargs))
        return made[-1]

    trainer_module.nnUNetDataLoader = loader
    try:
        yield made
    finally:
        trainer_module.nnUNetDataLoader = stock


@register_trainer
class nnUNetTrainer_LabeledOnly(nnUNetTrainer):
    """Supervised baseline for a semi-supervised dataset: stock nnU-Net on the labelled training cases.

    Same folds as :class:`nnUNetTrainerSSNet` (labelled validation cases only); the unlabelled cases
    are left out of training, so the comparison isolates what the unlabelled data add.
    """

    def do_split(self):
        tr_lab, tr_unl, val = semi_supervised_keys(self)
        self.print_to_log_file(
            f"Fold {self.fold}: {len(tr_lab)} labelled training cases ({len(tr_unl)} unlabelled cases left out), "
            f"{len(val)} validation cases"
        )
        return tr_lab, val


@register_trainer(timed="all")
class nnUNetTrainerSSNet(nnUNetTrainer):
    """SS-Net (Wu et al., MICCAI 2022) with nnU-Net's network, loss, data and schedule.

    ``L = L_sup + w(t) · (L_lds + λ_cs · (L_cs_labelled + L_cs_unlabelled))`` where ``L_sup`` is
    nnU-Net's Dice+CE with deep supervision on the labelled part of each batch, ``L_lds`` virtual
    adversarial smoothness on every image, ``L_cs`` class separation on the finest decoder features
    (heads, selectors and memory outside the network, saved in the checkpoint).
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
        ref = REFERENCE_SETTINGS[len(self.configuration_manager.patch_size)]
        self.ssnet_labeled_fraction = 0.5  # labelled share of each batch (1:1 as in the reference)
        self.ssnet_batch_size_factor = 1.0  # patches per step = factor x nnU-Net's batch size (memory grows)
        self.ssnet_consistency = ref["consistency"]  # c of w(t): 0.1 (2D), 1 (3D)
        self.ssnet_rampup_length = ref["rampup_length"]  # T of w(t) in units of ssnet_rampup_step: 200 (2D), 40 (3D)
        self.ssnet_rampup_step = 150  # iterations per ramp-up unit
        self.ssnet_rampup_fraction: float | None = None  # if set: ramp over this share of all iterations
        self.ssnet_vat_xi = ref["vat_xi"]  # ξ = 10: L2 norm of the probe perturbation over the whole patch
        self.ssnet_vat_eps = ref["vat_eps"]  # ε: L2 norm of the adversarial perturbation (patch): 6 (2D), 10 (3D)
        self.ssnet_vat_distance = ref["vat_distance"]  # D of L_lds: "soft_dice" (2D), "binary_dice" (3D)
        self.ssnet_vat_init = "uniform"  # random start direction: "uniform" (reference) or "gaussian"
        self.ssnet_cs_weight = 0.1  # λ_cs
        self.ssnet_head_dim = 32  # width of the projection / prediction heads
        self.ssnet_memory_size = 32  # vectors per class in the memory
        self.ssnet_memory_keep = "highest"  # "lowest": what the reference code keeps (see docs/ssnet.md)
        self.ssnet_memory_weights = "learned"  # "ones": the reference's memory-side weights (all exactly 1)
        self.ssnet_memory_scoring = "eval"  # "batch": the reference's training-mode selector scores
        self.ssnet_cs_max_pixels: int | None = None  # per batch part; None: every pixel (reference)
        self.ssnet_seed = 12345  # seeds VAT directions and pixel sub-sampling (with fold and epoch)
        # max L2 norm of the heads' and selectors' gradients per step; None: not clipped, as in the reference
        # (the network's gradients are clipped at 12 as in every nnU-Net trainer)
        self.ssnet_head_grad_clip: float | None = None
        self.ssnet_num_labeled = 0  # set in initialize() from the batch size
        self.ssnet_stock_batch_size = 0  # nnU-Net's planned batch (per GPU), set in initialize()
        self.ssnet_heads: ClassSeparationHeads | None = None
        self.ssnet_memory: PrototypeMemory | None = None
        self.ssnet_tap = StageOutputTap()
        self.ssnet_stats = EpochStats(SSNET_TERMS)  # per-term sums of the epoch, on the device
        self._ssnet_keys: tuple[list[str], list[str], list[str]] | None = None
        self._ssnet_dataset_tr = None
        self._ssnet_generator: torch.Generator | None = None
        self._ssnet_step = 0  # iterations done in the current epoch

    # ----------------------------------------------------------------------------- set-up
    def _check_hyperparameters(self) -> None:
        for name in ("ssnet_consistency", "ssnet_vat_xi", "ssnet_vat_eps", "ssnet_cs_weight", "ssnet_rampup_length"):
            setattr(self, name, validate_weight(getattr(self, name), name))
        factor = self.ssnet_batch_size_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 <= factor <= 16.0:
            raise ValueError(f"ssnet_batch_size_factor must be a number in [1, 16], got {factor!r}")
        frac = float(self.ssnet_labeled_fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"ssnet_labeled_fraction must lie strictly between 0 and 1, got {frac}")
        for name in ("ssnet_rampup_step", "ssnet_head_dim", "ssnet_memory_size"):
            value = getattr(self, name)
            smallest = 2 if "memory" in name else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < smallest:
                raise ValueError(f"{name} must be a positive integer (memory size >= 2), got {value!r}")
        fr = self.ssnet_rampup_fraction
        if fr is not None and (isinstance(fr, bool) or not isinstance(fr, (int, float)) or not 0 < fr <= 1):
            raise ValueError(f"ssnet_rampup_fraction must be None or in (0, 1], got {fr!r}")
        clip = self.ssnet_head_grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < np.inf):
            raise ValueError(f"ssnet_head_grad_clip must be None or a finite number > 0, got {clip!r}")
        mp = self.ssnet_cs_max_pixels
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, (int, np.integer)) or mp < 2):
            raise ValueError(f"ssnet_cs_max_pixels must be None or an integer >= 2, got {mp!r}")
        for name, choices in (
            ("ssnet_vat_distance", tuple(VAT_DISTANCES)),
            ("ssnet_vat_init", VAT_INITS),
            ("ssnet_memory_keep", MEMORY_KEEP),
            ("ssnet_memory_weights", MEMORY_WEIGHTS),
            ("ssnet_memory_scoring", MEMORY_SCORING),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def initialize(self):
        self._check_hyperparameters()
        install_extended_logger(self.logger, _LOG_LABELS, f"{self.__class__.__name__} terms")
        super().initialize()
        # the loaders are built later (on_train_start) with self.batch_size
        self.ssnet_stock_batch_size = int(self.batch_size)
        self.batch_size = max(1, round(int(self.batch_size) * float(self.ssnet_batch_size_factor)))
        batch = int(self.batch_size)
        if batch < 2:
            raise ValueError(
                f"SS-Net needs at least one labelled and one unlabelled patch per batch, but the batch size "
                f"{'per GPU ' if self.is_ddp else ''}is {batch}. Use a plans file with batch_size >= 2 "
                f"{'per GPU (or fewer GPUs)' if self.is_ddp else ''}."
            )
        self.ssnet_num_labeled = min(batch - 1, max(1, round(batch * float(self.ssnet_labeled_fraction))))
        self._ssnet_generator = torch.Generator(device=self.device)
        self._ssnet_generator.manual_seed(int(self.ssnet_seed))

    def configure_optimizers(self):
        # nnU-Net calls this once the network exists: build the heads here so that they join the
        # optimiser (own parameter group, same SGD settings, same poly learning-rate schedule)
        optimizer, lr_scheduler = super().configure_optimizers()
        _, channels = finest_decoder_stage(self.network)
        num_classes = self.label_manager.num_segmentation_heads
        self.ssnet_heads = ClassSeparationHeads(channels, num_classes, int(self.ssnet_head_dim)).to(self.device)
        if self.is_ddp:
            # the heads live outside DDP, which broadcasts only the network: start every rank from rank
            # 0's heads, whatever random state each rank had when it built them
            for tensor in (*self.ssnet_heads.parameters(), *self.ssnet_heads.buffers()):
                dist.broadcast(tensor.data, src=0)
        self.ssnet_memory = PrototypeMemory(num_classes, int(self.ssnet_memory_size), keep=self.ssnet_memory_keep)
        optimizer.add_param_group({"params": list(self.ssnet_heads.parameters())})
        return optimizer, lr_scheduler

    def do_split(self):
        self._ssnet_keys = semi_supervised_keys(self)
        tr_lab, tr_unl, val = self._ssnet_keys
        self.print_to_log_file(
            f"Fold {self.fold}: {len(tr_lab)} labelled + {len(tr_unl)} unlabelled training cases, "
            f"{len(val)} labelled validation cases"
        )
        return tr_lab + tr_unl, val

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._ssnet_dataset_tr = dataset_tr
        return dataset_tr, dataset_val

    def mixed_batch_loader(self, data, batch_size: int, *args, **kwargs) -> MixedBatchDataLoader:
        """The training loader: nnU-Net's arguments, batches of labelled then unlabelled patches."""
        tr_lab, tr_unl, _ = self._ssnet_keys
        return MixedBatchDataLoader(
            data,
            batch_size,
            *args,
            labeled=tr_lab,
            unlabeled=tr_unl,
            num_labeled=self.ssnet_num_labeled,
            # the labelled patches get stock nnU-Net's share of foreground-forced patches
            reference_batch_size=self.ssnet_stock_batch_size,
            **kwargs,
        )

    def get_dataloaders(self):
        with _training_loader_from(lambda data: data is self._ssnet_dataset_tr, self.mixed_batch_loader) as made:
            loaders = super().get_dataloaders()
        if not made:
            raise RuntimeError("nnU-Net built no training loader via nnUNetDataLoader: unsupported nnunetv2 version")
        return loaders

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.attach_feature_taps()
        super().on_train_start()
        tr_lab, tr_unl, val = self._ssnet_keys
        n_l = self.ssnet_num_labeled
        self.print_to_log_file(
            f"SS-Net: batch {n_l} labelled + {self.batch_size - n_l} unlabelled patches; w(t) = "
            f"{self.ssnet_consistency} * exp(-5 (1 - min(t, T)/T)^2) with T = {self.ssnet_rampup_length}, "
            f"t = iteration // {self.ssnet_rampup_step_iterations()}; "
            f"VAT xi={self.ssnet_vat_xi}, eps={self.ssnet_vat_eps} (L2 norms over the whole patch), distance "
            f"{self.ssnet_vat_distance}, {self.ssnet_vat_init} start; L_cs weight {self.ssnet_cs_weight}, heads "
            f"{self.ssnet_head_dim}-d, memory {self.ssnet_memory_size} per class (keep {self.ssnet_memory_keep}, "
            f"{self.ssnet_memory_scoring} scores, {self.ssnet_memory_weights} memory weights, head gradients "
            f"{'not clipped' if self.ssnet_head_grad_clip is None else f'clipped at {self.ssnet_head_grad_clip}'}); "
            f"training cases: {len(tr_lab)} labelled, {len(tr_unl)} unlabelled",
            also_print_to_console=True,
        )

    def attach_feature_taps(self) -> None:
        stage, _ = finest_decoder_stage(self.network)
        self.ssnet_tap.attach(stage)  # before the first forward (torch.compile traces the hook)

    def detach_feature_taps(self) -> None:
        self.ssnet_tap.detach()

    def on_train_end(self):
        super().on_train_end()
        self.detach_feature_taps()

    def on_train_epoch_start(self):
        self._ssnet_generator.manual_seed(epoch_seed(int(self.ssnet_seed), self.fold, int(self.current_epoch)))
        self._ssnet_step = 0
        super().on_train_epoch_start()

    # ----------------------------------------------------------------------------- training step
    def ssnet_iteration(self) -> int:
        """Global iteration index (derived from the epoch, so a resumed run continues the schedule)."""
        return int(self.current_epoch) * int(self.num_iterations_per_epoch) + self._ssnet_step

    def ssnet_rampup_step_iterations(self) -> int:
        """Iterations per ramp-up unit: ``ssnet_rampup_step``, or derived from ``ssnet_rampup_fraction``."""
        if self.ssnet_rampup_fraction is None or self.ssnet_rampup_length == 0:
            return int(self.ssnet_rampup_step)
        total = int(self.num_epochs) * int(self.num_iterations_per_epoch)
        return max(1, round(float(self.ssnet_rampup_fraction) * total / float(self.ssnet_rampup_length)))

    def ssnet_weight(self) -> float:
        return sigmoid_rampup_weight(
            self.ssnet_iteration(),
            self.ssnet_consistency,
            self.ssnet_rampup_length,
            self.ssnet_rampup_step_iterations(),
        )

    def _subsample(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        limit = self.ssnet_cs_max_pixels
        if limit is None or h.shape[0] <= limit:
            return h, y
        idx = torch.randperm(h.shape[0], generator=self._ssnet_generator, device=self.device)[:limit]
        return h[idx], y[idx]

    def class_separation(self, features: Tensor, logits: Tensor, target: Tensor, n_l: int) -> tuple[Tensor, Tensor]:
        """Update the memory from this batch, then L_cs of the labelled and the unlabelled part."""
        if features.shape[0] != logits.shape[0] or features.shape[2:] != logits.shape[2:]:
            raise RuntimeError(
                f"SS-Net needs the finest decoder stage at the output resolution: features {tuple(features.shape)}, "
                f"logits {tuple(logits.shape)}. Plans whose first stage downsamples are not supported."
            )
        heads, memory = self.ssnet_heads, self.ssnet_memory
        channels = features.shape[1]
        h = features.movedim(1, -1)  # (B, *spatial, C)
        predicted = logits.detach().argmax(1)
        labels = target[:n_l, 0].long()
        correct = (predicted[:n_l] == labels) & (labels > 0)
        cand_labels = labels[correct]
        z, scores = heads.memory_candidates(h[:n_l][correct].detach(), cand_labels, self.ssnet_memory_scoring)
        memory.update(z, cand_labels, scores, distributed=self.is_ddp)
        h_l, y_l = self._subsample(h[:n_l].reshape(-1, channels), labels.reshape(-1))
        h_u, y_u = self._subsample(h[n_l:].reshape(-1, channels), predicted[n_l:].reshape(-1))
        mw = self.ssnet_memory_weights
        loss_l = class_separation_loss(heads(h_l), y_l, memory.bank, heads.selectors, heads.memory_selectors, mw)
        loss_u = class_separation_loss(heads(h_u), y_u, memory.bank, heads.selectors, heads.memory_selectors, mw)
        return loss_l, loss_u

    def _backward(self, loss: Tensor) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()

    def _autocast(self):
        """nnU-Net's mixed precision: autocast on CUDA, nothing elsewhere."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _batch_on_device(self, batch: dict) -> tuple[Tensor, Tensor | list[Tensor]]:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            return data, [t.to(self.device, non_blocking=True) for t in target]
        return data, target.to(self.device, non_blocking=True)

    def _supervised_pass(
        self, data: Tensor, target: Tensor | list[Tensor], n_l: int, w: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Forward of the whole batch: L_sup on the labelled part and L_cs, backward (no DDP sync yet).

        Returns ``L_sup``, ``L_cs`` labelled and unlabelled, and the softmax of the full-resolution output
        (VAT's target).
        """
        targets = target if isinstance(target, list) else [target]
        with self.network.no_sync() if self.is_ddp else contextlib.nullcontext():
            with self._autocast():
                self.ssnet_tap.pop()
                output = self.network(data)
                features = self.ssnet_tap.pop()
                if features is None:
                    raise RuntimeError("the finest decoder stage was not captured: is the tap attached?")
                outputs = list(output) if isinstance(output, (list, tuple)) else [output]
                lab_out = [o[:n_l] for o in outputs] if isinstance(output, (list, tuple)) else output[:n_l]
                lab_tgt = [t[:n_l] for t in target] if isinstance(target, list) else target[:n_l]
                l_sup = self.loss(lab_out, lab_tgt)
                cs_l, cs_u = self.class_separation(features, outputs[0], targets[0], n_l)
                l_main = l_sup + (w * float(self.ssnet_cs_weight)) * (cs_l + cs_u)
            self._backward(l_main)
        return l_sup, cs_l, cs_u, torch.softmax(outputs[0].detach().float(), dim=1)

    def _vat_pass(self, data: Tensor, p: Tensor, w: float) -> Tensor:
        """L_lds: VAT direction from a probe pass (no parameter gradient), then the adversarial pass; backward."""
        plain = self.network.module if self.is_ddp else self.network
        coarser: list[Tensor] = []  # deep-supervision outputs of the adversarial pass

        def probe_logits(x: Tensor) -> Tensor:
            out = plain(x)
            self.ssnet_tap.pop()  # the perturbed passes' features are not used
            return out[0] if isinstance(out, (list, tuple)) else out

        def adversarial_logits(x: Tensor) -> Tensor:
            out = self.network(x)
            self.ssnet_tap.pop()
            if not isinstance(out, (list, tuple)):
                return out
            coarser.extend(out[1:])
            return out[0]

        with self._autocast(), frozen_batchnorm_stats(unwrap_network(self.network)):
            l_lds, _ = virtual_adversarial_loss(
                probe_logits,
                adversarial_logits,
                data,
                p,
                float(self.ssnet_vat_xi),
                float(self.ssnet_vat_eps),
                self._ssnet_generator,
                VAT_DISTANCES[self.ssnet_vat_distance],
                self.ssnet_vat_init,
            )
            l_adv = w * l_lds
            if self.is_ddp:  # every parameter must take part in the synchronised backward
                l_adv = l_adv + sum(0.0 * o.float().sum() for o in coarser)
        self._backward(l_adv)
        return l_lds

    def _optimizer_step(self) -> None:
        """Clip (the network at 12 as nnU-Net does; the heads if asked) and step, through the grad scaler on CUDA."""
        if self.is_ddp:  # the heads are not wrapped in DDP
            average_gradients(self.ssnet_heads.parameters())
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)  # nnU-Net's own clipping of the network
        if self.ssnet_head_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.ssnet_heads.parameters(), float(self.ssnet_head_grad_clip))
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_on_device(batch)
        n_l = self.ssnet_num_labeled
        if not 0 < n_l < data.shape[0]:
            raise RuntimeError(f"batch of {data.shape[0]} patches cannot hold {n_l} labelled + >= 1 unlabelled")
        w = self.ssnet_weight()
        self.optimizer.zero_grad(set_to_none=True)
        self.ssnet_heads.train()
        l_sup, cs_l, cs_u, p = self._supervised_pass(data, target, n_l, w)
        l_lds = self._vat_pass(data, p, w)
        self._optimizer_step()
        self._ssnet_step += 1
        terms = torch.stack([l_sup.detach().float(), l_lds.detach(), cs_l.detach(), cs_u.detach()])
        self.ssnet_stats.add(dict(zip(SSNET_TERMS, [*terms, w], strict=True)))
        terms = terms.cpu().numpy()
        total = terms[0] + w * (terms[1] + float(self.ssnet_cs_weight) * (terms[2] + terms[3]))
        return {"loss": np.float32(total), "ssnet": np.append(terms, w).astype(np.float64)}

    # ----------------------------------------------------------------------------- logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        self._log_ssnet_epoch()
        super().on_train_epoch_end([{"loss": o["loss"]} for o in train_outputs])

    def _log_ssnet_epoch(self) -> None:
        means = self.ssnet_stats.pop_means(ddp=self.is_ddp, device=self.device).means  # over all ranks' steps
        log_epoch_means(self, means, f"SS-Net epoch means: {format_means(means, 'ssnet_')}")

    # ----------------------------------------------------------------------------- checkpoints
    def ssnet_state(self) -> dict:
        return {
            "version": 1,
            "heads": {k: v.detach().cpu() for k, v in self.ssnet_heads.state_dict().items()},
            "memory": self.ssnet_memory.state_dict(),
            "iteration": self.ssnet_iteration(),
        }

    def save_checkpoint(self, filename: str) -> None:
        # heads, selectors and memory join the checkpoint nnU-Net writes (core.checkpoint_entries)
        with checkpoint_entries(filename, self._ssnet_checkpoint_entry):
            super().save_checkpoint(filename)

    def _ssnet_checkpoint_entry(self) -> dict:
        return {} if self.ssnet_heads is None else {CHECKPOINT_KEY: self.ssnet_state()}

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        # nnU-Net 2.8.1's load_checkpoint reads a file name only (and keeps the dict to itself): read our entry
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
        if state is None:
            raise RuntimeError(
                "this checkpoint has no SS-Net state (heads, selectors, memory): it was not written by "
                f"{self.__class__.__name__}, so training cannot resume from it. Start a new run without --c, or use "
                "it as -pretrained_weights."
            )
        self.ssnet_heads.load_state_dict(state["heads"])
        self.ssnet_memory.load_state_dict(state["memory"], device=self.device)


@register_trainer
class nnUNetTrainerSSNet_FullRampup(nnUNetTrainerSSNet):
    """SS-Net whose ramp-up spans the whole run, whatever its length.

    The reference 2D schedule ramps over its entire training (200 units x 150 = 30 000 iterations);
    with nnU-Net's 250 000 iterations the default ramp-up ends after 12 % of training, and in a short
    run (a few hundred iterations) it never leaves ``w ≈ c·e⁻⁵``. Here the unit is scaled to the run.
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
        self.ssnet_rampup_fraction = 1.0
