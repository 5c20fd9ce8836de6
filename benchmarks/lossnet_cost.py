"""CPU time of one M2SNet training step against the number of foreground classes K, with and without LossNet.

LossNet sends every class map of the batch through VGG-16 twice per step (prediction with gradient,
ground truth without), so without a bound its cost grows linearly in K. This times, for each K, one
training iteration as ``nnUNetTrainer.train_step`` does it (forward, nnU-Net's Dice+CE with deep
supervision [+ 0.1 · LossNet], backward, clipping, SGD step; ``benchmarks/m2snet_cost.py``'s step) of
M2SNet on nnU-Net's 2d plans for a 128² image (batch 2), with the LossNet of the code on the path
(``PYTHONPATH``): run it once on the code before the class cap and once on the current code to get both.
LossNet is the seeded random VGG-16 (same layers and input size as the ImageNet one, so the same cost).

The class cap used is the trainers' default (``lossnet.DEFAULT_MAX_CLASSES``), or
``--max-classes N`` / ``--max-classes all``; code without the cap records ``max_classes: null``.

Example: ``python benchmarks/lossnet_cost.py --classes 1 3 8 20 --json lossnet.json``
(``OMP_WAIT_POLICY=PASSIVE`` and one torch thread unless told otherwise).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 3, 8, 20], help="foreground classes K")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per K and variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs="+", default=[128, 128])
    ap.add_argument("--input-size", type=int, default=224, help="LossNet's VGG-16 input side")
    ap.add_argument("--max-classes", default=None, help="N, or 'all'; default: the trainer's default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    step_cost = _load("step_cost")
    root = Path(tempfile.mkdtemp(prefix="lossnet_cost_"))
    step_cost.setup_nnunet_env(root)
    plans, _ = step_cost.make_plans("2d", args.patch)
    m2snet_cost = _load("m2snet_cost")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_selfreg.losses.lossnet import LossNet, SegLossWithLossNet
    from nnunet_selfreg.networks.m2snet import build_m2snet

    supports_cap = "max_classes" in inspect.signature(LossNet).parameters
    if not supports_cap:
        cap = None
    elif args.max_classes is None:
        from nnunet_selfreg.losses import lossnet as lossnet_module

        cap = lossnet_module.DEFAULT_MAX_CLASSES
    else:
        cap = None if args.max_classes == "all" else int(args.max_classes)
    cm = PlansManager(plans).get_configuration("2d")
    pools, patch = cm.pool_op_kernel_sizes, list(cm.patch_size)
    lossnet = LossNet(None, input_size=args.input_size, random_init=True, **({"max_classes": cap} if cap else {}))
    result: dict = {
        "command": " ".join([sys.executable, *sys.argv]),
        "code": str(Path(inspect.getfile(LossNet)).resolve().parents[2]),
        "max_classes": cap,
        "class_cap_in_code": supports_cap,
        "patch": patch,
        "batch": args.batch,
        "stages": len(pools),
        "input_size": args.input_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "per_k": {},
    }
    print(f"code {result['code']}, class cap {cap}, patch {patch}, batch {args.batch}", flush=True)
    for k in args.classes:
        g = torch.Generator().manual_seed(k)
        data = torch.randn(args.batch, 1, *patch, generator=g)
        labels = torch.randint(0, k + 1, (args.batch, 1, *patch), generator=g)
        target = m2snet_cost.ds_targets(labels, pools)
        torch.manual_seed(0)
        net = build_m2snet(None, cm, 1, k + 1, True)
        seg = m2snet_cost.nnunet_loss(pools, cm.batch_dice)
        losses = {
            "without_lossnet": seg,
            "with_lossnet": SegLossWithLossNet(seg, lossnet, 0.1, has_regions=False).train(),
        }
        row: dict = {}
        for name, loss in losses.items():
            step = m2snet_cost.make_step(net, loss, data, target)
            for _ in range(args.warmup):
                step()
            times = [step() for _ in range(args.steps)]
            row[name] = {
                "cpu_s": statistics.median(t[1] for t in times),
                "wall_s": statistics.median(t[0] for t in times),
                "cpu_s_all": [t[1] for t in times],
            }
        row["lossnet_share_cpu_s"] = row["with_lossnet"]["cpu_s"] - row["without_lossnet"]["cpu_s"]
        result["per_k"][str(k)] = row
        print(
            f"K={k:3d}: step {row['with_lossnet']['cpu_s']:.2f} CPU-s with LossNet, "
            f"{row['without_lossnet']['cpu_s']:.2f} without",
            flush=True,
        )
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    ref = result["per_k"].get("3")
    if ref:
        for row in result["per_k"].values():
            row["ratio_to_k3"] = row["with_lossnet"]["cpu_s"] / ref["with_lossnet"]["cpu_s"]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
