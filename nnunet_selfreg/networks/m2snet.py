"""M2SNet / MSNet decoders on the encoder that nnU-Net's plans describe (2D and 3D).

M2SNet (Zhao et al., 2023, arXiv:2303.10894) and its single-scale predecessor MSNet (MICCAI 2021)
replace the U-Net decoder by *subtraction units* between encoder levels. Here the encoder is the
plans' own (``PlainConvEncoder`` or ``ResidualEncoder`` from dynamic-network-architectures), and
every learned block uses the plans' ``conv_op`` / ``norm_op`` / ``nonlin`` and per-stage kernel
sizes, so anisotropic 3D plans, InstanceNorm and LeakyReLU work exactly as in nnU-Net's U-Nets.

The decoder follows the authors' released code (``model/miccai_msnet.py``), which differs from the
paper's text in places; ``docs/m2snet.md`` lists every difference and every deviation of ours. With
encoder features ``x_0 … x_{S-1}`` (``x_0`` finest, ``x_{S-1}`` the bottleneck) and ``CNA`` a
conv-norm-nonlin block:

- ``f_i = CNA(x_i)`` to ``width`` channels (64 by default);
- ``MSU(A, B) = CNA(|A − B| + Σ_{k∈{3,5}} |P_k(A) − P_k(B)|)`` with ``A`` (the coarser map) resized
  to ``B``'s size and ``P_k(x) = nonlin(norm(K_k * x))``: ``K_k`` the fixed, full all-ones
  convolution ``ones(C, C, k, …, k)`` (every output channel sums all input channels over the
  ``k^d`` window), one ``P_k`` per kernel size shared by every unit of the network; MSNet keeps
  ``|A − B|`` only;
- pyramid: row 0 is ``f_0 … f_{S-1}``; row ``r+1`` has ``MSU(row_r[i+1], row_r[i])`` at scale ``i``,
  up to a single unit, whose coarser input first goes through its own ``CNA`` (``S(S-1)/2`` units);
- ``level_i`` = ``CNA(sum of the units at scale i)``; at the deepest scale ``S-2``, which has one
  unit, the unit's output itself (no conv);
- top-down: ``out_{S-1} = CNA(x_{S-1})`` (its own block on the bottleneck), ``out_i =
  CNA(up(out_{i+1}) + level_i)`` for ``i = S-2 … 1``, and the prediction ``conv(up(out_1) + level_0)``
  (a conv with the plans' kernel size and a bias, no norm); deep supervision adds a 1x1 head on every
  ``out_i``, ``1 ≤ i ≤ S-2``: exactly the resolutions of a ``PlainConvUNet``'s outputs for the plans.
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
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: ``full``: the authors' ``ones(C, C, k, …)`` kernel; ``depthwise``: ``ones(C, 1, k, …)`` per channel
FIXED_FILTER_MODES = ("full", "depthwise")


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


class FixedFilter(nn.Module):
    """``P_k(x) = nonlin(norm(K_k * x))``: a fixed all-ones convolution, then a learned norm + nonlin.

    ``K_k`` has size ``k`` along every spatial axis, stride 1, zero padding ``k // 2`` and no bias
    (the authors' kernel has an all-zero bias). ``mode="full"`` (default, the authors' code) is the
    convolution with weight ``ones(C, C, k, …, k)``: every output channel is the sum of *all* input
    channels over the ``k^d`` window. It is computed as one channel sum followed by a single-channel
    box filter, expanded to ``C`` identical channels: the same value, ``C`` times fewer operations.
    ``mode="depthwise"`` sums each channel over the window separately (``ones(C, 1, k, …, k)``).

    The sums are computed in float32 (float64 inputs stay float64) with autocast off, and so is the
    norm that reads them: under mixed precision, ``C · k^d`` summed activations can exceed float16's
    range (65504). The kernel is a non-persistent buffer: moved by ``.to()``, not in ``state_dict``.
    """

    def __init__(self, channels: int, ops: PlanOps, k: int, mode: str = "full") -> None:
        super().__init__()
        if int(k) < 1 or int(k) % 2 == 0:
            raise ValueError(f"fixed kernel sizes must be odd and >= 1, got {k}")
        if mode not in FIXED_FILTER_MODES:
            raise ValueError(f"fixed filter mode must be one of {FIXED_FILTER_MODES}, got {mode!r}")
        self.channels = int(channels)
        self.k = int(k)
        self.dim = ops.dim
        self.mode = mode
        self.register_buffer("kernel", torch.ones((1, 1) + (self.k,) * self.dim), persistent=False)
        self.post = ops.norm_nonlin(self.channels)

    def box_sum(self, x: Tensor) -> Tensor:
        """``K_k * x`` (see the class docstring), in float32 or wider."""
        if x.ndim != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"FixedFilter expects (N, {self.channels}, *{self.dim} spatial), got {tuple(x.shape)}")
        n, c, *spatial = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            if self.mode == "full":
                s = x.sum(1, keepdim=True)
            else:
                s = x.reshape(n * c, 1, *spatial)
            out = _CONVS[self.dim](s, self.kernel.to(dtype), None, 1, self.k // 2)
        return out.expand(n, c, *spatial) if self.mode == "full" else out.reshape(n, c, *spatial)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.post(self.box_sum(x))


class SubtractionUnit(nn.Module):
    """``MSU(A, B) = CNA(|A − B| + Σ_k |P_k(A) − P_k(B)|)`` at ``B``'s size.

    The fixed filters ``P_k`` (:class:`FixedFilter`) are shared by all units of a decoder and passed
    to :meth:`forward`; the unit owns only its fusing ``CNA``. No filters: MSNet's ``CNA(|A − B|)``.
    """

    def __init__(self, channels: int, ops: PlanOps, kernel_size: Sequence[int]) -> None:
        super().__init__()
        self.channels = int(channels)
        self.dim = ops.dim
        self.fuse = ops.cna(self.channels, self.channels, kernel_size)

    def difference(self, a: Tensor, b: Tensor, filters: Sequence[FixedFilter] = ()) -> Tensor:
        """The input of the fusing conv: ``|A − B| + Σ_k |P_k(A) − P_k(B)|``, ``A`` resized to ``B``."""
        if a.ndim != self.dim + 2 or b.ndim != self.dim + 2 or a.shape[:2] != b.shape[:2]:
            raise ValueError(f"SubtractionUnit expects (N, {self.channels}, *spatial) pairs, got {a.shape}, {b.shape}")
        a = resize_to(a, b.shape[2:])
        diff = (a - b).abs()
        for p in filters:
            diff = diff + (p(a) - p(b)).abs()
        return diff

    def forward(self, a: Tensor, b: Tensor, filters: Sequence[FixedFilter] = ()) -> Tensor:
        return self.fuse(self.difference(a, b, filters))


class M2SDecoder(nn.Module):
    """Reduction, subtraction pyramid, level convs, top-down path and heads on an nnU-Net encoder.

    Modules (``S`` encoder stages, scale ``i`` = resolution of encoder stage ``i``):

    - ``reduce[i]``: ``f_i = CNA(x_i)``, ``i = 0 … S-1``;
    - ``fixed_filters``: the shared ``P_3``, ``P_5`` (empty for MSNet);
    - ``units[r][i]``: row ``r + 1`` of the pyramid at scale ``i``;
    - ``last_input``: ``CNA`` on the coarser input of the single unit of the last row (``S ≥ 3``);
    - ``levels[i]``: ``CNA`` on the sum of the units at scale ``i``, ``i = 0 … S-3``;
    - ``top``: ``CNA(x_{S-1})``, the start of the top-down path;
    - ``outputs[i - 1]``: ``out_i = CNA(up(out_{i+1}) + level_i)``, ``i = 1 … S-2``;
    - ``seg_layers[0]``: the prediction conv at scale 0; ``seg_layers[i]``: 1x1 deep-supervision head on ``out_i``.

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
        fixed_filter_mode: str = "full",
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
        self.fixed_filter_mode = fixed_filter_mode
        sizes = (3, 5) if multi_scale else ()
        self.reduce = nn.ModuleList([ops.cna(c, self.width, kernels[s]) for s, c in enumerate(channels)])
        self.fixed_filters = nn.ModuleList([FixedFilter(self.width, ops, k, fixed_filter_mode) for k in sizes])
        self.units = nn.ModuleList(
            [
                nn.ModuleList([SubtractionUnit(self.width, ops, kernels[i]) for i in range(n - 1 - r)])
                for r in range(n - 1)
            ]
        )
        self.last_input = ops.cna(self.width, self.width, kernels[1]) if n >= 3 else None
        self.levels = nn.ModuleList([ops.cna(self.width, self.width, kernels[i]) for i in range(n - 2)])
        self.top = ops.cna(channels[-1], self.width, kernels[-1])
        self.outputs = nn.ModuleList([ops.cna(self.width, self.width, kernels[i]) for i in range(1, n - 1)])
        head = ops.conv_op(self.width, self.num_classes, kernels[0], 1, [(k - 1) // 2 for k in kernels[0]], bias=True)
        self.seg_layers = nn.ModuleList(
            [head] + [ops.conv_op(self.width, self.num_classes, 1, 1, 0, bias=True) for _ in range(1, n - 1)]
        )

    def pyramid(self, row: Sequence[Tensor]) -> list[Tensor]:
        """Per scale ``0 … S-2``: the sum of the subtraction units' outputs at that scale."""
        sums: list[Tensor | None] = [None] * (len(row) - 1)
        for r, units in enumerate(self.units):
            coarser = list(row[1:])
            if r == len(self.units) - 1 and self.last_input is not None:
                coarser[0] = self.last_input(coarser[0])
            row = [unit(coarser[i], row[i], self.fixed_filters) for i, unit in enumerate(units)]
            for i, f in enumerate(row):
                sums[i] = f if sums[i] is None else sums[i] + f
        return sums  # type: ignore[return-value]

    def forward(self, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        if len(skips) != len(self.reduce):
            raise ValueError(f"expected {len(self.reduce)} encoder features, got {len(skips)}")
        sums = self.pyramid([reduce(x) for reduce, x in zip(self.reduce, skips, strict=True)])
        levels = [conv(s) for conv, s in zip(self.levels, sums, strict=False)] + [sums[-1]]
        out = self.top(skips[-1])
        seg: list[Tensor] = []
        for i in range(len(levels) - 1, 0, -1):
            out = self.outputs[i - 1](resize_to(out, levels[i].shape[2:]) + levels[i])
            if self.deep_supervision:
                seg.append(self.seg_layers[i](out))
        seg.append(self.seg_layers[0](resize_to(out, levels[0].shape[2:]) + levels[0]))
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
        fixed_filter_mode: str = "full",
    ) -> None:
        super().__init__()
        if not getattr(encoder, "return_skips", False):
            raise ValueError("M2SNet needs an encoder built with return_skips=True")
        self.encoder = encoder
        self.decoder = M2SDecoder(encoder, num_classes, deep_supervision, width, multi_scale, fixed_filter_mode)
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
    fixed_filter_mode: str = "full",
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
        return M2SNet(encoder, num_output_channels, enable_deep_supervision, width, True, fixed_filter_mode)
    return MSNet(encoder, num_output_channels, enable_deep_supervision, width)
