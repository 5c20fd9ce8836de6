"""nnU-Net's training data loader with a fixed number of labelled and unlabelled patches per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class MixedBatchDataLoader(nnUNetDataLoader):
    """Every batch: ``num_labeled`` labelled patches first, then unlabelled ones (SS-Net).

    Cases are drawn with replacement from each group. Foreground oversampling follows nnU-Net's rule
    on the labelled part of the batch; an unlabelled case (its label map is all ignore label) is
    cropped uniformly at random, as nnU-Net does for a case without annotation, minus its warning.
    Everything else (loading, cropping, padding, augmentation) is nnU-Net's.
    """

    def __init__(
        self,
        *args,
        labeled: Sequence[str],
        unlabeled: Sequence[str],
        num_labeled: int,
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
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled)
        self.num_labeled = int(num_labeled)
        # nnU-Net binds its oversampling rule as an instance attribute: replace it
        self._probabilistic = self.get_do_oversample == self._probabilistic_oversampling
        self.get_do_oversample = self._labeled_oversample

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
        return not sample_idx < round(self.num_labeled * (1 - self.oversample_foreground_percent))

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        annotated = None if class_locations is None else class_locations.get(self.annotated_classes_key)
        if self.has_ignore and not force_fg and annotated is not None and len(annotated) == 0:
            self.has_ignore = False  # nnU-Net's uniformly random crop
            try:
                return super().get_bbox(data_shape, False, class_locations, overwrite_class, verbose)
            finally:
                self.has_ignore = True
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
