"""Parameters, FLOPs and time per training iteration of M2SNet / MSNet vs nnU-Net's U-Net on the same plans.

Reads a configuration from an nnU-Net plans file, builds nnU-Net's own network
(``get_network_from_plans``) and our M2SNet / MSNet on the same plans, and times one training
iteration as ``nnUNetTrainer.train_step`` does it: forward, the segmentation loss with deep
supervision (nnU-Net's Dice+CE with ``nnUNetTrainer._build_loss``'s weights, or the structure loss
under the same weights), plus 0.1 · LossNet where named, backward, gradient clipping at 12, SGD step
(nnU-Net's settings). Batch and patch come from the plans; data and labels are random. Variants
alternate step by step (order rotated every round), so a shared CPU slows all of them alike; the
median wall time and the median CPU time of this process (``time.process_time``, less sensitive to
other jobs; use ``--threads 1`` on a shared machine) are reported per variant.

The fixed all-ones filters of M2SNet's subtraction units are, as in the authors' code, full
convolutions with weight ``ones(C, C, k, k)``; the network computes them as a channel sum followed by
a single-channel box filter (same result). The variant "M2SNet, naive fixed conv" runs the full
convolution instead, and a micro-benchmark times both on the finest level's tensor, so the saving
is measured, not assumed.

LossNet is a randomly initialised VGG-16 (``random_init=True``): the same layers and input size as
the ImageNet LossNet, hence the same cost, with no weights file. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products only; norms,
activations, interpolation and the element-wise subtraction work are not counted).

``OMP_WAIT_POLICY=PASSIVE`` is set unless given: on a shared CPU spinning OpenMP threads make
networks with many small ops (M2SNet) many times slower than they are.

Example (see docs/m2snet.md): ``python benchmarks/m2snet_cost.py --plans PLANS.json -c 2d``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from nnunet_selfreg.losses.lossnet import LossNet, SegLossWithLossNet  # noqa: E402
from nnunet_selfreg.losses.structure import StructureLoss  # noqa: E402
from nnunet_selfreg.networks.m2snet import FixedFilter, build_m2snet  # noqa: E402

_CONVS = {2: F.conv2d, 3: F.conv3d}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ds_weights(pool_op_kernel_sizes: list) -> np.ndarray:
    """nnUNetTrainer._build_loss's deep-supervision weights (single process)."""
    n = len(pool_op_kernel_sizes) - 1
    weights = np.array([1 / (2**i) for i in range(n)])
    weights[-1] = 0
    return weights / weights.sum()


def nnunet_loss(pool_op_kernel_sizes: list, batch_dice: bool) -> nn.Module:
    """nnUNetTrainer._build_loss for label (not region) training, without DDP / compile."""
    loss = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(loss, ds_weights(pool_op_kernel_sizes))


def ds_targets(labels: torch.Tensor, pool_op_kernel_sizes: list) -> list[torch.Tensor]:
    """Nearest-neighbour downsampled labels at nnU-Net's deep-supervision scales."""
    scales = (1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0))[:-1]
    out = []
    for sc in scales:
        size = [round(s * f) for s, f in zip(labels.shape[2:], sc, strict=True)]
        out.append(F.interpolate(labels.float(), size=size, mode="nearest"))
    return out


def naive_box_sum(self: FixedFilter, x: torch.Tensor) -> torch.Tensor:
    """The authors' fixed filter as they run it: a full convolution with weight ones(C, C, k, …, k)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        weight = torch.ones((self.channels, self.channels) + (self.k,) * self.dim, dtype=dtype, device=x.device)
        return _CONVS[self.dim](x.to(dtype), weight, None, 1, self.k // 2)


def use_naive_fixed_filters(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, FixedFilter):
            m.box_sum = types.MethodType(naive_box_sum, m)
    return net


def make_step(
    net: nn.Module, loss: nn.Module, data: torch.Tensor, target: list[torch.Tensor]
) -> Callable[[], tuple[float, float]]:
    """One training iteration; returns (wall seconds, CPU seconds of this process)."""
    opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        out = net(data)
        value = loss(out, target)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def count_flops(net: nn.Module, loss: nn.Module, data: torch.Tensor, target: list[torch.Tensor]) -> tuple[int, int]:
    """(forward FLOPs of the network, FLOPs of forward + loss + backward), counted once."""
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            net(data)
    with FlopCounterMode(display=False) as step:
        loss(net(data), target).backward()
    net.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), step.get_total_flops()


def fixed_filter_micro(batch: int, width: int, patch: list[int], reps: int) -> dict:
    """Median CPU seconds of the naive ones(C, C, k, …) conv vs the channel-sum form on (batch, width, *patch)."""
    dim = len(patch)
    ops = types.SimpleNamespace(dim=dim, norm_nonlin=lambda c: nn.Sequential())
    x = torch.rand(batch, width, *patch, generator=torch.Generator().manual_seed(1))
    out = {}
    for k in (3, 5):
        f = FixedFilter(width, ops, k)  # type: ignore[arg-type]  # no norm: the sums only
        naive, fast = [], []
        for _ in range(reps):
            t0 = time.process_time()
            a = naive_box_sum(f, x)
            t1 = time.process_time()
            b = f.box_sum(x)
            t2 = time.process_time()
            naive.append(t1 - t0)
            fast.append(t2 - t1)
        out[f"k{k}"] = {
            "naive_cpu_s": statistics.median(naive),
            "channel_sum_cpu_s": statistics.median(fast),
            "speed_up": statistics.median(naive) / statistics.median(fast),
            "max_rel_diff": ((a - b).abs().max() / a.abs().max()).item(),
            "flops_naive": 2 * x.numel() * width * k**dim,
            "flops_channel_sum": x.numel() + 2 * (x.numel() // width) * k**dim,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", required=True, help="nnU-Net plans file (nnUNetPlans.json)")
    ap.add_argument("-c", "--configuration", default="2d")
    ap.add_argument("--num-classes", type=int, default=3, help="segmentation heads (background included)")
    ap.add_argument("--batch", type=int, default=None, help="override the plans' batch size")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--lossnet-size", type=int, default=224)
    ap.add_argument("--micro-reps", type=int, default=10, help="repetitions of the fixed-filter micro-benchmark")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cm = PlansManager(args.plans).get_configuration(args.configuration)
    pools = cm.pool_op_kernel_sizes
    patch, batch = list(cm.patch_size), args.batch or cm.batch_size
    k = args.num_classes
    g = torch.Generator().manual_seed(0)
    data = torch.randn(batch, 1, *patch, generator=g)
    labels = torch.randint(0, k, (batch, 1, *patch), generator=g)
    target = ds_targets(labels, pools)

    torch.manual_seed(0)
    unet = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, k, deep_supervision=True)  # fmt: skip
    m2s = build_m2snet(None, cm, 1, k, True)
    lossnet = LossNet(None, input_size=args.lossnet_size, random_init=True)
    seg = nnunet_loss(pools, cm.batch_dice)
    structure = DeepSupervisionWrapper(StructureLoss(), ds_weights(pools))
    variants = {
        "nnU-Net U-Net": (unet, seg),
        "M2SNet, no LossNet": (m2s, seg),
        "M2SNet, naive fixed conv, no LossNet": (use_naive_fixed_filters(build_m2snet(None, cm, 1, k, True)), seg),
        "M2SNet + 0.1 LossNet": (
            build_m2snet(None, cm, 1, k, True),
            SegLossWithLossNet(nnunet_loss(pools, cm.batch_dice), lossnet, 0.1, has_regions=False),
        ),
        "M2SNet structure loss + 0.1 LossNet": (
            build_m2snet(None, cm, 1, k, True),
            SegLossWithLossNet(structure, lossnet, 0.1, has_regions=False),
        ),
        "MSNet + 0.1 LossNet": (
            build_m2snet(None, cm, 1, k, True, multi_scale=False),
            SegLossWithLossNet(nnunet_loss(pools, cm.batch_dice), lossnet, 0.1, has_regions=False),
        ),
    }
    flops = {name: count_flops(net.train(), loss, data, target) for name, (net, loss) in variants.items()}
    micro = fixed_filter_micro(batch, m2s.decoder.width, patch, args.micro_reps)
    steps = {name: make_step(net.train(), loss, data, target) for name, (net, loss) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.warmup + args.steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t, c = steps[name]()
            if r >= args.warmup:
                times[name].append(t)
                cpu[name].append(c)

    base = statistics.median(times["nnU-Net U-Net"])
    base_cpu = statistics.median(cpu["nnU-Net U-Net"])
    msnet = variants["MSNet + 0.1 LossNet"][0]
    result = {
        "plans": args.plans,
        "configuration": args.configuration,
        "patch": patch,
        "batch": batch,
        "n_stages": len(pools),
        "network": cm.network_arch_class_name.rsplit(".", 1)[-1],
        "features_per_stage": cm.network_arch_init_kwargs["features_per_stage"],
        "threads": args.threads,
        "lossnet_input": args.lossnet_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "params": {
            "nnU-Net U-Net": n_params(unet),
            "U-Net encoder": n_params(unet.encoder),
            "U-Net decoder": n_params(unet) - n_params(unet.encoder),  # unet.decoder also holds the encoder
            "M2SNet": n_params(m2s),
            "M2SNet encoder (= U-Net encoder)": n_params(m2s.encoder),
            "M2SNet decoder": n_params(m2s.decoder),
            "MSNet": n_params(msnet),
            "MSNet decoder": n_params(msnet.decoder),
            "LossNet VGG-16 to relu4_3 (frozen)": n_params(lossnet),
        },
        "forward_gflops": {name: f[0] / 1e9 for name, f in flops.items()},
        "train_step_gflops": {name: f[1] / 1e9 for name, f in flops.items()},
        "fixed_filter_micro": micro,
        "step_s_median": {name: statistics.median(v) for name, v in times.items()},
        "ratio_to_unet": {name: statistics.median(v) / base for name, v in times.items()},
        "cpu_s_median": {name: statistics.median(v) for name, v in cpu.items()},
        "cpu_ratio_to_unet": {name: statistics.median(v) / base_cpu for name, v in cpu.items()},
    }
    print(f"{args.configuration}: patch {patch}, batch {batch}, {len(pools)} stages, {args.threads} threads")
    for name, value in result["params"].items():
        print(f"  params {name:40s} {value:>12,}")
    for kk, m in micro.items():
        print(
            f"  fixed filter {kk} on ({batch}, {m2s.decoder.width}, *{patch}): naive ones(C,C,k..) conv "
            f"{m['naive_cpu_s'] * 1e3:.1f} ms CPU, channel sum + box {m['channel_sum_cpu_s'] * 1e3:.1f} ms "
            f"(x{m['speed_up']:.1f}; max rel. diff {m['max_rel_diff']:.1e})"
        )
    for name in variants:
        print(
            f"  step   {name:38s} fwd {result['forward_gflops'][name]:8.2f} GFLOP, step "
            f"{result['train_step_gflops'][name]:8.2f} GFLOP | wall {result['step_s_median'][name]:8.3f} s "
            f"x{result['ratio_to_unet'][name]:.2f} | CPU {result['cpu_s_median'][name]:8.3f} s "
            f"x{result['cpu_ratio_to_unet'][name]:.2f} ({len(times[name])} steps)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
