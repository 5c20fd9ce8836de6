"""nnU-Net U-Nets as nnU-Net's plans build them (for in-process tests)."""

from __future__ import annotations

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

_COMMON_2D = {
    "conv_op": "torch.nn.modules.conv.Conv2d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
    "conv_bias": True,
}
_COMMON_3D = {
    **_COMMON_2D,
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
}
_REQ = ("conv_op", "norm_op", "dropout_op", "nonlin")

ARCHS = {
    # nnU-Net default 2d plans shape (4 stages here to stay small)
    "plain2d": (
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        {
            **_COMMON_2D,
            "n_stages": 4,
            "features_per_stage": [8, 16, 32, 32],
            "kernel_sizes": [[3, 3]] * 4,
            "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
            "n_conv_per_stage": [2, 2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2, 2],
        },
        (2, 1, 32, 32),
    ),
    # anisotropic 3d_fullres-like plans; input 10x56x12 gives a 5x7x3 bottleneck
    "plain3d_aniso": (
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        {
            **_COMMON_3D,
            "n_stages": 4,
            "features_per_stage": [4, 8, 16, 16],
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 1]],
            "n_conv_per_stage": [2, 2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2, 2],
        },
        (2, 1, 10, 56, 12),
    ),
    # ResEnc preset shape (n_blocks_per_stage like nnUNetResEncUNetMPlans, fewer stages)
    "resenc2d": (
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        {
            **_COMMON_2D,
            "n_stages": 4,
            "features_per_stage": [8, 16, 32, 32],
            "kernel_sizes": [[3, 3]] * 4,
            "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
            "n_blocks_per_stage": [1, 3, 4, 6],
            "n_conv_per_stage_decoder": [1, 1, 1],
        },
        (2, 1, 32, 32),
    ),
}


def build(name: str, num_classes: int = 3, seed: int = 0, deep_supervision: bool = True) -> torch.nn.Module:
    cls, kwargs, _ = ARCHS[name]
    torch.manual_seed(seed)
    return get_network_from_plans(cls, kwargs, _REQ, 1, num_classes, deep_supervision=deep_supervision)


def batch(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ARCHS[name][2], generator=g)
