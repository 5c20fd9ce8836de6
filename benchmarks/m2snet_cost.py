"""Parameters and time per training iteration of M2SNet / MSNet vs nnU-Net's U-Net on the same plans.

Reads a configuration from an nnU-Net plans file, builds nnU-Net's own network
(``get_network_from_plans``) and our M2SNet / MSNet on the same plans, and times one training
iteration as ``nnUNetTrainer.train_step`` does it: forward, nnU-Net's Dice+CE with deep supervision
(same weights as ``nnUNetTrainer._build_loss``), plus 0.1 · LossNet where named, backward, gradient
clipping at 12, SGD step (nnU-Net's settings). Batch and patch come from the plans; data and labels
are random. Variants alternate step by step (order rotated every round), so a shared CPU slows all
of them alike; the median wall time and the median CPU time of this process (``time.process_time``,
less sensitive to other jobs; use ``--threads 1`` on a shared machine) are reported per variant.

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

from nnunet_selfreg.losses.lossnet import LossNet, SegLossWithLossNet  # noqa: E402
from nnunet_selfreg.networks.m2snet import build_m2snet  # noqa: E402


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    n = len(pool_op_kernel_sizes) - 1
    weights = np.array([1 / (2**i) for i in range(n)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def ds_targets(labels: torch.Tensor, pool_op_kernel_sizes: list) -> list[torch.Tensor]:
    """Nearest-neighbour downsampled labels at nnU-Net's deep-supervision scales."""
    scales = (1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0))[:-1]
    out = []
    for sc in scales:
        size = [round(s * f) for s, f in zip(labels.shape[2:], sc, strict=True)]
        out.append(F.interpolate(labels.float(), size=size, mode="nearest"))
    return out


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
    m2s_lossnet = build_m2snet(None, cm, 1, k, True)
    msnet = build_m2snet(None, cm, 1, k, True, multi_scale=False)
    lossnet = LossNet(None, input_size=args.lossnet_size)
    seg = nnunet_loss(pools, cm.batch_dice)
    with_lossnet = SegLossWithLossNet(nnunet_loss(pools, cm.batch_dice), lossnet, 0.1, has_regions=False)
    variants = {
        "nnU-Net U-Net": (unet, seg),
        "M2SNet, no LossNet": (m2s, seg),
        "M2SNet + 0.1 LossNet": (m2s_lossnet, with_lossnet),
        "MSNet + 0.1 LossNet": (msnet, with_lossnet),
    }
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
            "M2SNet": n_params(m2s),
            "M2SNet encoder (= U-Net encoder)": n_params(m2s.encoder),
            "M2SNet decoder": n_params(m2s.decoder),
            "U-Net decoder": n_params(unet) - n_params(unet.encoder),  # unet.decoder also holds the encoder
            "MSNet": n_params(msnet),
            "LossNet VGG-16 to relu4_3 (frozen)": n_params(lossnet),
        },
        "step_s_median": {name: statistics.median(v) for name, v in times.items()},
        "ratio_to_unet": {name: statistics.median(v) / base for name, v in times.items()},
        "cpu_s_median": {name: statistics.median(v) for name, v in cpu.items()},
        "cpu_ratio_to_unet": {name: statistics.median(v) / base_cpu for name, v in cpu.items()},
    }
    print(f"{args.configuration}: patch {patch}, batch {batch}, {len(pools)} stages, {args.threads} threads")
    for name, value in result["params"].items():
        print(f"  params {name:40s} {value:>12,}")
    for name in variants:
        print(
            f"  step   {name:24s} wall {result['step_s_median'][name]:8.3f} s x{result['ratio_to_unet'][name]:.2f}"
            f"   CPU {result['cpu_s_median'][name]:8.3f} s x{result['cpu_ratio_to_unet'][name]:.2f}"
            f"  ({len(times[name])} steps)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
