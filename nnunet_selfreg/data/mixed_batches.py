"""nnU-Net's training data loader with a fixed number of labelled and unlabelled patches per batch.

Foreground oversampling: nnU-Net forces the patches at batch positions ``j >= round(B · (1 − p))``
to contain foreground (``p = oversample_foreground_percent = 0.33``), i.e. ``B − round(0.67 B)`` of
``B``: 1 of 2 with nnU-Net's common batch size 2. Applying that rule to the labelled part alone
would force ``n − round(0.67 n)`` of ``n`` labelled patches: none at all when the labelled part
holds one patch (SS-Net at nnU-Net's batch size 2). Instead the labelled part gets the share stock
nnU-Net gives its batch (``reference_batch_size``, the trainer's planned batch): ``n · m / B`` forced
patches on average with ``m = B − round(B · (1 − p))``, the integer part always, the fraction with
that probability. The draw uses NumPy's global generator, like the rest of nnU-Net's loader, so a
run that seeds it per epoch (as the exact-resume test does) keeps its batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

__all__ = ["MixedBatchDataLoader", "stock_forced_foreground"]


def stock_forced_foreground(batch_size: int, oversample_foreground_percent: float) -> int:
    """How many of ``batch_size`` patches stock nnU-Net forces to contain foreground (its exact rule)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return sum(1 for j in range(batch_size) if not j < round(batch_size * (1 - oversample_foreground_percent)))


class MixedBatchDataLoader(nnUNetDataLoader):
    """Every batch: ``num_labeled`` labelled patches first, then unlabelled ones (SS-Net).

    Cases are drawn with replacement from each group. Foreground oversampling gives the labelled part
    the share of forced patches that stock nnU-Net has in a batch of ``reference_batch_size``
    (default: this loader's batch size), see the module docstring; nnU-Net's probabilistic
    oversampling keeps its per-patch probability. An unlabelled case (its label map is all ignore
    label) is cropped uniformly at random, as nnU-Net does for a case without annotation, minus its
    warning. Everything else (loading, cropping, padding, augmentation) is nnU-Net's.
    """

    def __init__(
        self,
        *args,
        labeled: Sequence[str],
        unlabeled: Sequence[str],
        num_labeled: int,
        reference_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not labeled or not unlabeled:
            raise ValueError(f"need labelled and unlabelled cases, got {len(labeled)} and {len(unlabeled)}")
        if not 1 <= num_labeled < self.batch_size:
            raise ValueError(f"num_labeled must be in [1, batch size - 1 = {self.batch_size - 1}], got {num_labeled}")
        missing = (set(labeled) | set(unlabeled)) - set(self.indices)
        if missing:
            raise ValueError(f"{len(missing)} case(s) are not in the training dataset, e.g. {sorted(missing)[:3]}")
        reference = self.batch_size if reference_batch_size is None else int(reference_batch_size)
        if reference < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled)
        self.num_labeled = int(num_labeled)
        self.reference_batch_size = reference
        # n·m/B forced labelled patches per batch: `_forced_always` always, one more with probability
        # `_forced_extra / B` (exact integer arithmetic: no float rounding at the boundaries)
        forced = self.num_labeled * stock_forced_foreground(reference, self.oversample_foreground_percent)
        self._forced_always, self._forced_extra = divmod(forced, reference)
        # nnU-Net binds its oversampling rule as an instance attribute: replace it
        self._probabilistic = self.get_do_oversample == self._probabilistic_oversampling
        self.get_do_oversample = self._labeled_oversample

    def expected_forced_share(self) -> float:
        """Expected share of foreground-forced patches among the labelled ones."""
        if self._probabilistic:
            return float(self.oversample_foreground_percent)
        return (self._forced_always + self._forced_extra / self.reference_batch_size) / self.num_labeled

    def get_indices(self) -> list[str]:
        n_u = self.batch_size - self.num_labeled
        lab = np.random.choice(self.labeled, self.num_labeled, replace=True)
        unl = np.random.choice(self.unlabeled, n_u, replace=True)
        return [*lab.tolist(), *unl.tolist()]

    def _labeled_oversample(self, sample_idx: int) -> bool:
        if sample_idx >= self.num_labeled:
            return False
        if self._probabilistic:
            return self._probabilistic_oversampling(sample_idx)
        first_forced = self.num_labeled - self._forced_always  # the last labelled patches, as nnU-Net
        if sample_idx >= first_forced:
            return True
        if sample_idx == first_forced - 1 and self._forced_extra:
            return bool(np.random.uniform() < self._forced_extra / self.reference_batch_size)
        return False

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        annotated = None if class_locations is None else class_locations.get(self.annotated_classes_key)
        if self.has_ignore and not force_fg and annotated is not None and len(annotated) == 0:
            self.has_ignore = False  # nnU-Net's uniformly random crop
            try:
                return super().get_bbox(data_shape, False, class_locations, overwrite_class, verbose)
            finally:
                self.has_ignore = True
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
