"""M2SNet / MSNet decoders on the encoder that nnU-Net's plans describe (2D and 3D).

M2SNet (Zhao et al., 2023, arXiv:2303.10894) and its single-scale predecessor MSNet (MICCAI 2021)
replace the U-Net decoder by *subtraction units* between encoder levels. Here the encoder is the
plans' own (``PlainConvEncoder`` or ``ResidualEncoder`` from dynamic-network-architectures), and
every learned block uses the plans' ``conv_op`` / ``norm_op`` / ``nonlin`` and per-stage kernel
sizes, so anisotropic 3D plans, InstanceNorm and LeakyReLU work exactly as in nnU-Net's U-Nets.

With encoder features ``x_1 … x_S`` (``x_1`` finest, ``x_S`` the bottleneck):

- ``f_i = CNA_i(x_i)``: conv-norm-nonlin to ``width`` channels (64 by default);
- ``MSU(A, B) = CNA(|A − B| + Σ_k |P_k(K_k * A) − P_k(K_k * B)|)`` with ``A`` (the coarser map)
  resized to ``B``'s size, ``K_k`` fixed all-ones depthwise kernels of size ``k ∈ {3, 5}`` (buffers)
  and ``P_k`` a learned norm + nonlin shared by ``A`` and ``B``; MSNet keeps ``|A − B|`` only;
- pyramid: row 0 is ``f_1 … f_S``; row ``r+1`` has ``MSU(row_r[i+1], row_r[i])`` at scale ``i``,
  up to a single unit (``S(S-1)/2`` units);
- ``level_i`` = sum of every row's entry at scale ``i`` (``f_i`` included);
- top-down: ``out_S = level_S``, ``out_i = CNA(up(out_{i+1}) + level_i)``; a 1x1 conv on each
  ``out_i``, ``i < S``, gives the predictions, finest first, i.e. exactly the resolutions of a
  ``PlainConvUNet``'s deep-supervision outputs for the same plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn

_INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_FIXED_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Linear/bilinear/trilinear interpolation of ``x`` (N, C, *spatial) to exactly ``size``."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=_INTERP_MODES[x.ndim - 2], align_corners=False)


class PlanOps:
    """The plans' layer types, read off the encoder; ``cna`` builds one conv-norm-nonlin block."""

    def __init__(self, encoder: PlainConvEncoder | ResidualEncoder) -> None:
        self.conv_op = encoder.conv_op
        self.dim = convert_conv_op_to_dim(encoder.conv_op)
        self.norm_op = encoder.norm_op
        self.norm_op_kwargs = dict(encoder.norm_op_kwargs or {})
        self.nonlin = encoder.nonlin
        self.nonlin_kwargs = dict(encoder.nonlin_kwargs or {})
        self.conv_bias = encoder.conv_bias

    def cna(self, in_ch: int, out_ch: int, kernel_size: Sequence[int]) -> ConvDropoutNormReLU:
        return ConvDropoutNormReLU(
            self.conv_op, in_ch, out_ch, kernel_size, 1, self.conv_bias,
            self.norm_op, self.norm_op_kwargs, None, None, self.nonlin, self.nonlin_kwargs,
        )  # fmt: skip

    def norm_nonlin(self, channels: int) -> nn.Sequential:
        mods: list[nn.Module] = []
        if self.norm_op is not None:
            mods.append(self.norm_op(channels, **self.norm_op_kwargs))
        if self.nonlin is not None:
            mods.append(self.nonlin(**self.nonlin_kwargs))
        return nn.Sequential(*mods)


class SubtractionUnit(nn.Module):
    """``MSU(A, B) = CNA(|A − B| + Σ_{k∈sizes} |P_k(K_k * A) − P_k(K_k * B)|)`` at ``B``'s size.

    ``K_k`` is a fixed, non-learned all-ones depthwise kernel of size ``k`` along every spatial axis
    (zero padding ``k // 2``, so each output is the sum of the ``k^d`` neighbourhood), stored as the
    buffer ``kernel{k}`` (in ``state_dict``, moved by ``.to()``, not a parameter). ``P_k`` is a learned
    norm + nonlin applied to both ``K_k * A`` and ``K_k * B``. ``sizes=()`` gives MSNet's single-scale
    unit ``CNA(|A − B|)``.
    """

    def __init__(self, channels: int, ops: PlanOps, kernel_size: Sequence[int], sizes: Sequence[int] = (3, 5)) -> None:
        super().__init__()
        self.channels = int(channels)
        self.dim = ops.dim
        self.sizes = tuple(int(k) for k in sizes)
        for k in self.sizes:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"fixed kernel sizes must be odd and >= 1, got {k}")
            self.register_buffer(f"kernel{k}", torch.ones((self.channels, 1) + (k,) * self.dim))
        self.post = nn.ModuleList([ops.norm_nonlin(self.channels) for _ in self.sizes])
        self.fuse = ops.cna(self.channels, self.channels, kernel_size)

    def fixed_filter(self, x: Tensor, k: int) -> Tensor:
        """Depthwise all-ones convolution of size ``k`` (zero padding): local sums per channel."""
        weight = getattr(self, f"kernel{k}").to(dtype=x.dtype)
        return _FIXED_CONVS[self.dim](x, weight, None, 1, k // 2, 1, self.channels)

    def difference(self, a: Tensor, b: Tensor) -> Tensor:
        """The input of the fusing conv: ``|A − B| + Σ_k |P_k(K_k * A) − P_k(K_k * B)|``."""
        if a.ndim != self.dim + 2 or b.ndim != self.dim + 2 or a.shape[:2] != b.shape[:2]:
            raise ValueError(f"SubtractionUnit expects (N, {self.channels}, *spatial) pairs, got {a.shape}, {b.shape}")
        a = resize_to(a, b.shape[2:])
        diff = (a - b).abs()
        for k, post in zip(self.sizes, self.post, strict=True):
            diff = diff + (post(self.fixed_filter(a, k)) - post(self.fixed_filter(b, k))).abs()
        return diff

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fuse(self.difference(a, b))


class M2SDecoder(nn.Module):
    """Channel reduction, subtraction pyramid, top-down path and 1x1 heads on an nnU-Net encoder.

    ``deep_supervision`` (flipped by nnU-Net's ``set_deep_supervision_enabled``) selects a list of
    ``S - 1`` predictions, finest first, or the finest prediction alone.
    """

    def __init__(
        self,
        encoder: PlainConvEncoder | ResidualEncoder,
        num_classes: int,
        deep_supervision: bool,
        width: int = 64,
        multi_scale: bool = True,
    ) -> None:
        super().__init__()
        ops = PlanOps(encoder)
        channels = list(encoder.output_channels)
        n = len(channels)
        if n < 2:
            raise ValueError(f"M2SNet needs an encoder with >= 2 stages, got {n}")
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        kernels = [maybe_convert_scalar_to_list(ops.conv_op, k) for k in encoder.kernel_sizes]
        self.deep_supervision = bool(deep_supervision)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.multi_scale = bool(multi_scale)
        sizes = (3, 5) if multi_scale else ()
        self.reduce = nn.ModuleList([ops.cna(c, self.width, kernels[s]) for s, c in enumerate(channels)])
        # units[r][i]: row r + 1 of the pyramid at scale i (combines row r's entries i + 1 and i)
        self.units = nn.ModuleList(
            [
                nn.ModuleList([SubtractionUnit(self.width, ops, kernels[i], sizes) for i in range(n - 1 - r)])
                for r in range(n - 1)
            ]
        )
        self.fuse = nn.ModuleList([ops.cna(self.width, self.width, kernels[i]) for i in range(n - 1)])
        self.seg_layers = nn.ModuleList(
            [ops.conv_op(self.width, self.num_classes, 1, 1, 0, bias=True) for _ in range(n - 1)]
        )

    def forward(self, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        if len(skips) != len(self.reduce):
            raise ValueError(f"expected {len(self.reduce)} encoder features, got {len(skips)}")
        row = [reduce(x) for reduce, x in zip(self.reduce, skips, strict=True)]
        levels = list(row)
        for units in self.units:
            row = [unit(row[i + 1], row[i]) for i, unit in enumerate(units)]
            for i, f in enumerate(row):
                levels[i] = levels[i] + f
        out = levels[-1]
        seg: list[Tensor] = []
        for i in range(len(self.fuse) - 1, -1, -1):
            out = self.fuse[i](resize_to(out, levels[i].shape[2:]) + levels[i])
            if self.deep_supervision or i == 0:
                seg.append(self.seg_layers[i](out))
        seg = seg[::-1]
        return seg if self.deep_supervision else seg[0]


class M2SNet(nn.Module):
    """An nnU-Net encoder (``return_skips=True``) followed by an :class:`M2SDecoder`.

    With deep supervision the output is the list nnU-Net's loss expects (the resolutions of encoder
    stages ``0 … S-2``, finest first); without it, the finest prediction, resized to the input size
    if the plans' first stride is not 1 (it is 1 in every nnU-Net plan).
    """

    def __init__(
        self,
        encoder: PlainConvEncoder | ResidualEncoder,
        num_classes: int,
        deep_supervision: bool = True,
        width: int = 64,
        multi_scale: bool = True,
    ) -> None:
        super().__init__()
        if not getattr(encoder, "return_skips", False):
            raise ValueError("M2SNet needs an encoder built with return_skips=True")
        self.encoder = encoder
        self.decoder = M2SDecoder(encoder, num_classes, deep_supervision, width, multi_scale)
        self.decoder.apply(InitWeights_He(1e-2))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        out = self.decoder(self.encoder(x))
        if isinstance(out, Tensor):
            out = resize_to(out, x.shape[2:])
        return out


class MSNet(M2SNet):
    """MSNet (MICCAI 2021): :class:`M2SNet` with single-scale subtraction units ``CNA(|A − B|)``."""

    def __init__(
        self,
        encoder: PlainConvEncoder | ResidualEncoder,
        num_classes: int,
        deep_supervision: bool = True,
        width: int = 64,
    ) -> None:
        super().__init__(encoder, num_classes, deep_supervision, width, multi_scale=False)


def build_m2snet(
    plans_manager,
    configuration_manager,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool = True,
    multi_scale: bool = True,
    width: int = 64,
) -> M2SNet:
    """M2SNet (``multi_scale=False``: MSNet) on the encoder of the configuration's planned network.

    The plans' U-Net is built with nnU-Net's own ``get_network_from_plans`` (so the encoder gets its
    architecture's initialisation) and only its ``encoder`` is kept. Raises ``TypeError`` for plans
    whose network has no ``PlainConvEncoder`` / ``ResidualEncoder`` (e.g. Primus).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    del plans_manager  # the configuration holds everything; kept for nnU-Net's signature
    unet = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision,
    )
    encoder = getattr(unet, "encoder", None)
    if not isinstance(encoder, (PlainConvEncoder, ResidualEncoder)):
        raise TypeError(
            f"M2SNet builds on the encoder of PlainConvUNet / ResidualEncoderUNet plans; "
            f"{configuration_manager.network_arch_class_name} has none. Use plans with one of those networks."
        )
    if multi_scale:
        return M2SNet(encoder, num_output_channels, enable_deep_supervision, width)
    return MSNet(encoder, num_output_channels, enable_deep_supervision, width)
