"""Pure-torch loss functions of the three methods (2D and 3D, shape-checked)."""

from nnunet_selfreg.losses.selfreg import (
    SelfRegRegularizer,
    internal_feature_distillation_loss,
    pool_to_common_size,
    semantic_consistency_loss,
)

__all__ = [
    "SelfRegRegularizer",
    "internal_feature_distillation_loss",
    "pool_to_common_size",
    "semantic_consistency_loss",
]
