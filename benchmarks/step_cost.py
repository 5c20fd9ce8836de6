"""Cost of our methods over the stock nnUNetTrainer: training step time, peak memory, inference time.

Builds nnU-Net plans with nnU-Net's own experiment planners (``ExperimentPlanner`` or
``nnUNetPlannerResEncM``) for a synthetic dataset whose median image is the patch, instantiates the
real trainers on those plans: the stock ``nnUNetTrainer`` and the trainers the registry marks
``timed`` (``register_trainer(timed=...)``: ``nnUNetTrainerSelfReg`` and its SCR-only / IFD-only
ablations by default; with ``--variants all`` also SS-Net and M2SNet with and without LossNet; any
registered trainer by name), and runs each trainer's own ``train_step`` (SGD with nnU-Net's settings,
gradient clipping at 12, Dice+CE with deep supervision, plus the method's terms) on identical
synthetic batches. The variants
alternate step by step in one process (rotating the order every round), so a shared or throttled
machine slows all of them alike.

M2SNet is timed with a randomly initialised LossNet (``nnUNetTrainerM2SNet_RandomLossNet``, the
explicit fallback trainer; ``nnUNetTrainerM2SNet`` itself stops without a VGG-16 weights file): the
same VGG-16 layers and input size as the ImageNet LossNet, so the same cost, and no weights file is
needed.

Peak memory comes from a fresh ``spawn`` child per variant (CPU: increase of the peak RSS over
the steps; CUDA: ``torch.cuda.max_memory_allocated``). On CUDA every timed step also records, in
the timing process itself, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
minus what was allocated before the step (activations and temporaries), and each trainer's resident
tensors (parameters, gradients, optimizer state, loss modules): their sum is the peak a run of that
trainer alone needs, without compiling every network a second time in a child process
(``--no-memory`` skips the children). Inference times nnU-Net's sliding-window prediction of one
case with and without taps attached (taps store nothing in eval mode).

``--max-seconds`` bounds the run: no trainer is built and no step started after it, and SIGTERM
(``timeout``) stops the run the same way; the JSON then holds the complete rounds measured so far
and says why it stopped. A trainer whose build or step fails is dropped with its error in the JSON
and the others go on (the baseline ``nnUNetTrainer`` must work).

Run from the repository root; ``--help`` lists the options. The defaults on CPU are small (see
``CONFIGS``) so that one configuration runs in minutes on a 2-core machine, and use one thread: on a
shared machine two threads spend much of their time waiting for each other at every operation, which
says more about the other jobs than about the trainers. Every step is timed in wall-clock and in
process CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_StepCost"
NUM_CLASSES = 3  # background + 2 foreground labels
BASELINE = "nnUNetTrainer"  # nnU-Net's stock trainer: every ratio is to it, so it is always timed


def registered_names() -> list[str]:
    """Every trainer the package registers (nnU-Net's stock one included), in registration order."""
    import nnunet_selfreg.trainers  # noqa: F401  (imports every trainer module: the registry is complete)
    from nnunet_selfreg.trainers.core import registered_trainers

    return [r.cls.__name__ for r in registered_trainers()]


def timed_names(which: str) -> list[str]:
    """The trainers registered as ``timed``: the ``"default"`` ones, with ``which="all"`` also the ``"all"`` ones."""
    from nnunet_selfreg.trainers.core import registered_trainers

    registered_names()
    groups = ("default",) if which == "default" else ("default", "all")
    names = [r.cls.__name__ for group in groups for r in registered_trainers() if r.timed == group]
    return list(dict.fromkeys([BASELINE, *names]))


@dataclass(frozen=True)
class Config:
    """A plans configuration: which nnU-Net planner, and the patch / batch defaults per device."""

    planner: str  # class name in nnU-Net's experiment_planners
    dim: int
    gpu_patch: tuple[int, ...]  # nnU-Net's plans for a dataset with this median image size, planned batch
    cpu_patch: tuple[int, ...]  # smaller default on CPU so that the run takes minutes
    cpu_batch: int


CONFIGS = {
    # GPU defaults are nnU-Net's own plans: 2d 512x512 -> 8 stages 32..512, batch 12; 3d_fullres 128^3 ->
    # 6 stages 32..320, batch 2. The CPU defaults are nnU-Net's plans for smaller images so that one run takes
    # minutes on a shared 2-core machine: 2d 128x128 -> 6 stages 32..512, 3d 32^3 -> 4 stages 32..256, batch 2
    # (nnU-Net's minimum). Use --patch 256 256 --batch 4 for the 7-stage 32..512 2d network on CPU.
    "2d": Config("ExperimentPlanner", 2, (512, 512), (128, 128), 2),
    "3d_fullres": Config("ExperimentPlanner", 3, (128, 128, 128), (32, 32, 32), 2),
    # ResEnc M (n_blocks_per_stage 1,3,4,6,6,...; decoder 1 conv per stage), same sizes
    "resenc_m_2d": Config("nnUNetPlannerResEncM", 2, (512, 512), (128, 128), 2),
    "resenc_m_3d": Config("nnUNetPlannerResEncM", 3, (128, 128, 128), (32, 32, 32), 2),
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- plans
def setup_nnunet_env(root: Path) -> None:
    """A private nnU-Net folder tree with a dataset description only (no images), in ``os.environ``."""
    raw, pre, res = root / "nnUNet_raw" / DATASET_NAME, root / "nnUNet_preprocessed" / DATASET_NAME, root / "res"
    for p in (raw / "imagesTr", raw / "labelsTr", pre, res):
        p.mkdir(parents=True, exist_ok=True)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": 1000,  # large: nnU-Net's 5 %-of-the-dataset cap on the batch size never binds
        "file_ending": ".nii.gz",
        # An explicit (empty) file list: without one, the planner lists imagesTr through a fork Pool of 12
        # workers, and twice (CI and a local dry run) a worker sat on a lock until `timeout` stopped the
        # section (docs/performance.md). With this list nothing forks.
        "dataset": {},
    }
    fingerprint = {
        "spacings": [[1.0, 1.0, 1.0]],
        "shapes_after_crop": [[128, 128, 128]],
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                  "percentile_99_5": 1.0, "std": 1.0}
        },
    }  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    os.environ.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"))
    os.environ["nnUNet_results"] = str(res)


def make_plans(config_name: str, patch: Sequence[int]) -> tuple[dict, dict]:
    """nnU-Net's planner output for ``config_name`` on a dataset whose median image is ``patch``."""
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as dep
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as rep
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    cfg = CONFIGS[config_name]
    planner_cls = getattr(dep, cfg.planner, None) or getattr(rep, cfg.planner)
    with contextlib.redirect_stdout(io.StringIO()):
        planner = planner_cls(DATASET_ID)
        median = tuple(int(p) for p in patch)
        n_voxels = float(np.prod(median, dtype=np.float64)) * planner.dataset_json["numTraining"]
        conf = "2d" if cfg.dim == 2 else "3d_fullres"
        plan = planner.get_plans_for_configuration(
            (1.0,) * cfg.dim, median, planner.generate_data_identifier(conf), n_voxels, {}
        )
    plan["batch_dice"] = cfg.dim == 2  # as nnU-Net sets it (3d_fullres without a 3d_lowres config)
    plans = {
        "dataset_name": DATASET_NAME,
        "plans_name": planner.plans_identifier,
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, *median] if cfg.dim == 2 else list(median),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {conf: plan},
        "experiment_planner_used": planner_cls.__name__,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": planner.dataset_fingerprint[
            "foreground_intensity_properties_per_channel"
        ],
    }
    recursive_fix_for_json_export(plans)
    # nnUNetTrainer.initialize infers the dataset class from the preprocessed folder's file endings
    data_dir = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / plan["data_identifier"]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "placeholder.b2nd").touch()
    return plans, planner.dataset_json


def describe_plans(plans: dict) -> dict[str, Any]:
    (conf,) = plans["configurations"].values()
    arch = conf["architecture"]
    kw = arch["arch_kwargs"]
    return {
        "planner": plans["experiment_planner_used"],
        "network": arch["network_class_name"].rsplit(".", 1)[-1],
        "n_stages": kw["n_stages"],
        "features_per_stage": list(kw["features_per_stage"]),
        "blocks_per_stage": list(kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage"))),
        "patch_size": list(conf["patch_size"]),
        "planned_batch_size": conf["batch_size"],
    }


# -------------------------------------------------------------------------------------------- trainers
@dataclass
class Setup:
    """Everything a process needs to rebuild the same trainers and batches (picklable)."""

    config_name: str
    plans: dict
    dataset_json: dict
    batch_size: int
    device: str
    amp: bool
    compile: bool
    seed: int
    n_batches: int
    threads: int | None = None
    lossnet_input_size: int | None = None  # M2SNet: None keeps the trainer's (224); small for quick checks
    lossnet_max_slices: int | None = None  # M2SNet 3D: None keeps the trainer's (8)


def trainer_class(name: str) -> type:
    """The registered trainer class called ``name`` (nnU-Net's stock one or one of ours)."""
    from nnunet_selfreg.trainers.core import registered_trainers

    registered_names()
    for registration in registered_trainers():
        if registration.cls.__name__ == name:
            return registration.cls
    raise LookupError(f"no trainer {name} is registered in nnunet_selfreg.trainers")


def build_trainer(setup: Setup, variant: str):
    """A trainer after ``initialize()`` with its taps attached, as ``on_train_start`` leaves it."""
    from nnunet_selfreg.trainers.core import attach_feature_taps

    plans = deepcopy(setup.plans)
    plans["continue_training"] = False
    (conf,) = plans["configurations"]
    plans["configurations"][conf]["batch_size"] = setup.batch_size
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = trainer_class(variant)(plans, conf, 0, setup.dataset_json, torch.device(setup.device))
        trainer._do_i_compile = lambda: setup.compile  # nnU-Net itself compiles the network (and loss.dc)
        if not setup.amp:
            trainer.grad_scaler = None
        for attr in ("lossnet_input_size", "lossnet_max_slices"):
            if getattr(setup, attr) is not None and hasattr(trainer, attr):
                setattr(trainer, attr, getattr(setup, attr))
        torch.manual_seed(setup.seed)  # identical initial weights in every variant
        trainer.initialize()
        trainer.loss.train()  # as on_train_epoch_start leaves it (M2SNet's LossNet counts in training mode only)
        attach_feature_taps(trainer)  # the hooks on_train_start attaches before the first forward, if any
        trainer.network.train()
    return trainer


def disable_cuda_autocast() -> None:
    """``--no-amp`` on CUDA: nnU-Net's ``train_step`` always autocasts there, so switch its autocast off."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    from nnunet_selfreg.trainers import ssnet  # SS-Net's own train_step autocasts too

    for m in (module, ssnet):
        m.autocast = lambda device_type, enabled=True, **kw: torch.autocast(device_type, enabled=False, **kw)


def make_batches(setup: Setup, trainer) -> list[dict]:
    """Synthetic batches like nnU-Net's dataloader gives: data, and blob labels per deep-supervision scale."""
    (conf,) = setup.plans["configurations"].values()
    patch = [int(p) for p in conf["patch_size"]]
    scales = trainer._get_deep_supervision_scales()
    g = torch.Generator().manual_seed(setup.seed + 1)
    batches = []
    for _ in range(setup.n_batches):
        data = torch.randn(setup.batch_size, 1, *patch, generator=g)
        coarse = [max(1, p // 16) for p in patch]
        seg = torch.randint(0, NUM_CLASSES, (setup.batch_size, 1, *coarse), generator=g).float()
        seg = F.interpolate(seg, size=patch, mode="nearest")
        target = [F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc, strict=True)]) for sc in scales]
        if setup.device.startswith("cuda"):  # nnU-Net's dataloader pins memory on CUDA
            data, target = data.pin_memory(), [t.pin_memory() for t in target]
        batches.append({"data": data, "target": target})
    return batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()`` (CUDA work synchronised at both ends)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


Times = dict[str, dict[str, list[float]]]  # clock ("wall", "cpu") -> variant -> seconds per step


def prepare_process(setup: Setup) -> None:
    if setup.threads:  # 0 / None: torch's default
        torch.set_num_threads(setup.threads)
    if setup.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train sets it
        torch.backends.cudnn.deterministic = False
        if not setup.amp:
            disable_cuda_autocast()


# ------------------------------------------------------------------------------------------ step time
class TimeBudgetExceeded(Exception):
    """Raised on SIGTERM (``timeout``) so that the measured rounds still reach the JSON."""


_MAIN_PID = os.getpid()


def _where(frame: Any, depth: int = 4) -> str:
    """The innermost ``depth`` frames as ``file:line function``, innermost first (where a stop hit)."""
    parts = []
    while frame is not None and len(parts) < depth:
        parts.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(parts)


def _raise_time_budget(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked child (nnU-Net forks Pools in places): end as SIGTERM would
        os._exit(128 + signum)
    where = _where(frame)
    log(f"stopped by signal {signal.Signals(signum).name} at {where}")
    raise TimeBudgetExceeded(f"stopped by signal {signal.Signals(signum).name} at {where}")


@dataclass
class StepRun:
    """What ``time_steps`` measured so far: complete rounds only, plus why variants or the run stopped."""

    times: Times = field(default_factory=lambda: {"wall": {}, "cpu": {}})
    errors: dict[str, str] = field(default_factory=dict)  # variant -> why it has no numbers
    cuda_step_increase_mib: dict[str, list[float]] = field(default_factory=dict)  # per timed step
    cuda_resident_mib: dict[str, float] = field(default_factory=dict)
    rounds: int = 0  # complete timed rounds
    stopped: str | None = None  # why the run ended before its last round


def rotations(items: Sequence[str]) -> Iterator[list[str]]:
    r = 0
    while True:
        k = r % len(items)
        yield [*items[k:], *items[:k]]
        r += 1


def _error(stage: str, e: BaseException) -> str:
    log(f"  {stage} failed:\n" + "".join(traceback.format_exception(e))[-3000:])
    return f"{stage}: {type(e).__name__}: {e}"[:600]


def timed_step(trainer, batch: dict, device: str, cuda_memory: bool) -> tuple[float, float, float | None]:
    """Wall and CPU seconds of one ``train_step``; with ``cuda_memory`` also the MiB its peak adds."""
    if cuda_memory:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = timed(lambda: trainer.train_step(batch), device)
    increase = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda_memory else None
    return wall, cpu, increase


def resident_cuda_mib(trainer) -> float:
    """MiB of CUDA tensors a trainer keeps between steps: parameters, gradients and buffers of every
    module it holds (network, loss, LossNet, heads), optimizer state, and tensors held by its other
    attributes (e.g. SS-Net's memory). Storages are counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.is_cuda:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for obj in vars(trainer).values():
        if isinstance(obj, torch.nn.Module):
            for prm in obj.parameters():
                add(prm)
                add(prm.grad)
            for buf in obj.buffers():
                add(buf)
        elif isinstance(obj, torch.Tensor):
            add(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for x in vars(obj).values():
                add(x)
    optimizer = getattr(trainer, "optimizer", None)
    for state in getattr(optimizer, "state", {}).values():
        for x in state.values():
            add(x)
    return total / 2**20


def time_steps(
    setup: Setup,
    variants: Sequence[str],
    warmup: int,
    steps: int,
    deadline: float | None = None,
    run: StepRun | None = None,
) -> StepRun:
    """Seconds per ``train_step`` of each variant, alternating within every round after ``warmup`` rounds.

    Fills ``run`` as it goes (pass one in to keep what was measured when ``TimeBudgetExceeded`` is
    raised). With a ``deadline`` (``time.perf_counter()`` seconds) no build or step starts after it, and
    the warm-up rounds (where ``torch.compile`` compiles each network) end at 70 % of the time left:
    a variant without a finished warm-up step by then is dropped, so that the others still get timed.
    """
    from nnunet_selfreg.trainers.core import detach_feature_taps

    run = run if run is not None else StepRun()
    cuda = setup.device.startswith("cuda")
    t_start = time.perf_counter()
    warmup_deadline = None if deadline is None else t_start + 0.7 * (deadline - t_start)

    def past(limit: float | None) -> bool:
        return limit is not None and time.perf_counter() > limit

    trainers: dict[str, Any] = {}
    active: list[str] = []

    def drop(v: str, why: str) -> None:
        run.errors[v] = why
        active.remove(v)
        for per_clock in run.times.values():
            per_clock.pop(v, None)
        run.cuda_step_increase_mib.pop(v, None)
        trainers.pop(v, None)
        if cuda:
            torch.cuda.empty_cache()

    def step_round(r: int, timed_round: bool, limit: float | None) -> dict[str, tuple[float, float, float | None]]:
        """One step of every active variant (rotated order), until ``limit``; failing variants are dropped."""
        row: dict[str, tuple[float, float, float | None]] = {}
        batch = batches[r % len(batches)]
        k = r % len(active)
        for v in [*active[k:], *active[:k]]:
            if past(limit):
                break
            try:
                row[v] = timed_step(trainers[v], batch, setup.device, cuda and timed_round)
            except TimeBudgetExceeded:
                raise
            except Exception as e:
                why = _error(f"{v} train_step (round {r + 1})", e)
                if v == BASELINE:
                    run.errors[v] = why
                    raise RuntimeError(f"the baseline {BASELINE} failed: {why}") from e
                drop(v, why)
        cells = " | ".join(f"{v} {row[v][0]:.3f}s (cpu {row[v][1]:.3f}s)" for v in active if v in row)
        phase = f"step {r - warmup + 1}/{steps}" if timed_round else f"warm-up {r + 1}/{warmup}"
        log(f"  [{phase}] {cells}  ({time.perf_counter() - t_start:.0f}s elapsed)")
        return row

    try:
        for v in variants:
            if past(deadline):
                run.errors[v] = "not built: --max-seconds ran out"
                continue
            log(f"  building {v} ...")
            try:
                trainers[v] = build_trainer(setup, v)
            except TimeBudgetExceeded:
                raise
            except Exception as e:
                run.errors[v] = _error(f"building {v}", e)
        if BASELINE not in trainers:
            raise RuntimeError(f"the baseline {BASELINE} could not be built: {run.errors.get(BASELINE)}")
        batches = make_batches(setup, trainers[BASELINE])
        active.extend(trainers)
        run.times = {"wall": {v: [] for v in active}, "cpu": {v: [] for v in active}}
        run.cuda_step_increase_mib = {v: [] for v in active} if cuda else {}
        warmed = set()
        for r in range(warmup):
            warmed.update(step_round(r, False, warmup_deadline))
            if past(warmup_deadline):
                for v in [v for v in active if v not in warmed]:
                    drop(v, f"dropped: no warm-up (compile) step finished within {warmup_deadline - t_start:.0f}s")
                break
        for i in range(steps):
            if past(deadline):
                break
            row = step_round(warmup + i, True, deadline)
            if not all(v in row for v in active):
                break
            for v in active:
                run.times["wall"][v].append(row[v][0])
                run.times["cpu"][v].append(row[v][1])
                if cuda:
                    run.cuda_step_increase_mib[v].append(row[v][2])
            run.rounds += 1
        if run.rounds < steps:
            run.stopped = f"--max-seconds ran out after {run.rounds} of {steps} timed round(s)"
    finally:
        for v, t in trainers.items():
            if cuda:
                run.cuda_resident_mib[v] = resident_cuda_mib(t)
            detach_feature_taps(t)
    return run


def cuda_memory_summary(run: StepRun) -> dict[str, dict[str, float]]:
    """Per variant: resident MiB, the largest per-step increase, and their sum (the peak of that trainer alone)."""
    out = {}
    for v, incs in run.cuda_step_increase_mib.items():
        if incs and v in run.cuda_resident_mib:
            resident, increase = run.cuda_resident_mib[v], max(incs)
            out[v] = {"resident_mib": resident, "step_peak_increase_mib": increase, "peak_mib": resident + increase}
    return out


# ---------------------------------------------------------------------------------------------- memory
def _rss_baseline_kib() -> tuple[int, bool]:
    """Reset the peak RSS to the current RSS where Linux allows it; return the baseline (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, which ru_maxrss reports
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")), True
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False


def memory_child(setup: Setup, variant: str, steps: int) -> dict[str, float | bool]:
    """Run in a fresh process: peak memory of ``steps`` training steps of one variant.

    CPU: the peak RSS during the steps minus the RSS before them (network, optimizer, batches and
    the interpreter are in the baseline; gradients, momentum and activations are the increase).
    """
    prepare_process(setup)
    trainer = build_trainer(setup, variant)
    batches = make_batches(setup, trainer)
    sync(setup.device)
    if setup.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before, reset = _rss_baseline_kib()  # KiB on Linux
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
    sync(setup.device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_peak_mib": after / 1024, "rss_step_increase_mib": (after - before) / 1024, "rss_reset": reset}
    if setup.device.startswith("cuda"):
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_memory(
    setup: Setup, variants: Sequence[str], steps: int, errors: dict[str, str]
) -> dict[str, dict[str, float | bool]]:
    """Peak memory per variant from one fresh child process each; a failing child's error goes to ``errors``."""
    result = {}
    for v in variants:
        log(f"  memory: {v} ({steps} steps in a fresh child process) ...")
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                result[v] = pool.submit(memory_child, setup, v, steps).result()
        except Exception as e:
            errors[v] = _error(f"memory child of {v}", e)
            continue
        log("    " + ", ".join(f"{k} {x:.0f}" for k, x in result[v].items() if not isinstance(x, bool)))
    return result


# ------------------------------------------------------------------------------------------- inference
def time_inference(
    setup: Setup, trainer, repeats: int, case_scale: float, mirroring: bool
) -> tuple[Times, float, list[int]]:
    """nnU-Net's sliding-window prediction of one case, stock network vs the same weights with taps."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_selfreg.taps import UNetFeatureTaps, unwrap_network

    weights = unwrap_network(trainer.network).state_dict()
    (conf,) = setup.plans["configurations"].values()
    patch = [int(p) for p in conf["patch_size"]]
    shape = [round(p * case_scale) for p in patch]
    image = torch.randn(1, *([1] if len(patch) == 2 else []), *shape, generator=torch.Generator().manual_seed(7))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    predictors, taps = {}, UNetFeatureTaps()
    for name in ("stock", "taps attached"):
        net = trainer.build_network_architecture(
            trainer.plans_manager,
            trainer.configuration_manager,
            trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads,
            False,
        )
        net.load_state_dict(weights)
        net = net.to(setup.device)
        if name == "taps attached":
            taps.attach(net)
        if setup.compile:
            net = torch.compile(net)
        with contextlib.redirect_stdout(io.StringIO()):
            p = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=mirroring,
                perform_everything_on_device=True,
                device=torch.device(setup.device),
                verbose=False,
                allow_tqdm=False,
            )
            p.manual_initialization(
                net,
                trainer.plans_manager,
                trainer.configuration_manager,
                None,
                setup.dataset_json,
                BASELINE,
                trainer.inference_allowed_mirroring_axes,
            )
        predictors[name] = p
    times: Times = {"wall": {n: [] for n in predictors}, "cpu": {n: [] for n in predictors}}
    logits = {}
    order = rotations(list(predictors))
    for r in range(repeats + 1):  # the first round is warm-up
        row = {}
        for name in next(order):
            out: dict[str, torch.Tensor] = {}
            predict = predictors[name].predict_sliding_window_return_logits
            row[name] = timed(lambda p=predict, o=out: o.update(x=p(image)), setup.device)
            logits[name] = out["x"]
            if r:
                times["wall"][name].append(row[name][0])
                times["cpu"][name].append(row[name][1])
        phase = "warm-up" if r == 0 else f"{r}/{repeats}"
        log(f"  [inference {phase}] case {shape}: " + " | ".join(f"{n} {row[n][0]:.3f}s" for n in predictors))
    assert taps.pop() is None, "taps stored features during inference"
    taps.detach()
    max_abs_diff = float((logits["stock"].float() - logits["taps attached"].float()).abs().max())
    return times, max_abs_diff, shape


# --------------------------------------------------------------------------------------------- report
def summarise(times: Times, baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per clock and variant: median, IQR, ratio of medians and the per-round (paired) ratio to ``baseline``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for clock, per_variant in times.items():
        base = np.asarray(per_variant[baseline])
        out[clock] = {}
        for v, ts in per_variant.items():
            a = np.asarray(ts)
            q1, med, q3 = np.percentile(a, [25, 50, 75])
            p1, pmed, p3 = np.percentile(a / base, [25, 50, 75])
            out[clock][v] = {
                "median_s": float(med),
                "iqr_s": float(q3 - q1),
                "ratio_of_medians": float(med / np.median(base)),
                "paired_ratio_median": float(pmed),
                "paired_ratio_iqr": float(p3 - p1),
                "n": int(a.size),
            }
    return out


def _cells(s: dict[str, float]) -> str:
    return (
        f"{s['median_s']:.3f} ({s['iqr_s']:.3f}) | {s['ratio_of_medians']:.3f} | "
        f"{s['paired_ratio_median']:.3f} ({s['paired_ratio_iqr']:.3f})"
    )


def markdown(result: dict) -> str:
    """The result as Markdown: a step-time / memory table and an inference table."""
    dev, plans = result["device"], result["plans"]
    clocks = ["wall", "cpu"] if dev["type"] == "cpu" else ["wall"]
    head = " | ".join(
        f"{c} s/step median (IQR) | {c} × (medians) | {c} × paired median (IQR)" for c in ("wall", "CPU")[: len(clocks)]
    )
    lines = [
        f"### {result['config']} on {dev['name']} (torch {dev['torch']}, {dev['threads']} threads)",
        "",
        f"Plans ({plans['planner']}): {plans['network']}, {plans['n_stages']} stages {plans['features_per_stage']}, "
        f"patch {plans['patch_size']}, batch {result['batch_size']} (planned {plans['planned_batch_size']}); "
        f"AMP {result['amp']}, compile {result['compile']}; {result['steps']} timed steps per trainer after "
        f"{result['warmup']} warm-up round(s). Command: `{result['command']}`",
        "",
        f"| trainer | {head} | peak memory MiB | memory × |",
        "|---|" + "---|" * (3 * len(clocks) + 2),
    ]
    mem = result.get("memory", {})
    key = "cuda_max_allocated_mib" if dev["type"] == "cuda" else "rss_step_increase_mib"
    if not mem and result.get("cuda_memory"):  # no children: the in-process CUDA peaks
        mem, key = result["cuda_memory"], "peak_mib"
    m0 = mem.get(BASELINE, {}).get(key)
    for v in result["step_time"].get("wall", {}):
        m = mem.get(v, {}).get(key)
        mtxt = f"{m:.0f} | {m / m0:.3f}" if m is not None and m0 else "– | –"
        cells = " | ".join(_cells(result["step_time"][c][v]) for c in clocks)
        lines.append(f"| {v} | {cells} | {mtxt} |")
    for v, why in result.get("errors", {}).items():
        lines.append(f"| {v} | not measured: {why.splitlines()[0][:200]} |")
    lines += [
        "",
        "× paired: median (IQR) over rounds of this trainer's step time divided by nnUNetTrainer's in the same "
        "round; CPU = process CPU time (all threads), less sensitive than wall time to other jobs on the machine.",
    ]
    if result.get("stopped"):
        lines.append(f"Stopped early: {result['stopped']}.")
    if key == "peak_mib":
        lines.append(
            "Peak memory: resident tensors of the trainer (parameters, gradients, optimizer state, loss modules) plus "
            "the largest torch.cuda.max_memory_allocated increase over one of its timed steps, in the timing process."
        )
    elif mem:
        what = (
            "torch.cuda.max_memory_allocated"
            if dev["type"] == "cuda"
            else "peak RSS during the steps minus the RSS before them (VmHWM reset, ru_maxrss)"
        )
        lines.append(f"Peak memory: {what}, one fresh process per trainer, {result['mem_steps']} steps.")
    inf = result.get("inference")
    if inf:
        ihead = " | ".join(
            f"{c} s/case median (IQR) | {c} × (medians) | {c} × paired median (IQR)"
            for c in ("wall", "CPU")[: len(clocks)]
        )
        lines += [
            "",
            f"Inference: nnUNetPredictor.predict_sliding_window_return_logits, one case {inf['case_shape']}, "
            f"mirroring {inf['mirroring']}, {inf['repeats']} timed predictions each; identical logits: "
            f"{inf['identical_logits']} (max |difference| {inf['max_abs_logit_difference']:.3g})",
            "",
            f"| network | {ihead} |",
            "|---|" + "---|" * (3 * len(clocks)),
        ]
        for n in inf["summary"]["wall"]:
            lines.append(f"| {n} | " + " | ".join(_cells(inf["summary"][c][n]) for c in clocks) + " |")
    return "\n".join(lines)


def device_info(device: str) -> dict[str, Any]:
    info = {"type": torch.device(device).type, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if info["type"] == "cuda":
        info["name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["name"] = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return info


# ------------------------------------------------------------------------------------------------ main
def process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): importing torch and nnU-Net counts too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example (CPU, a few minutes on a 2-core machine): python benchmarks/step_cost.py "
        "--json step_cost_2d.json",
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="2d", help="plans configuration (default: 2d)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available (nnU-Net trains on cuda:0; choose the GPU with CUDA_VISIBLE_DEVICES)",
    )
    p.add_argument("--patch", type=int, nargs="+", help="patch size (default: per config and device, see CONFIGS)")
    p.add_argument("--batch", type=int, help="batch size (default: nnU-Net's planned one on CUDA, small on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default: 40 on CUDA, 20 on CPU)")
    p.add_argument("--warmup", type=int, help="warm-up rounds, not timed (default: 5 on CUDA, 2 on CPU)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=(*registered_names(), "all"),
        default=timed_names("default"),
        metavar="TRAINER",
        help="registered trainers to compare (default: those registered with timed='default', the SelfReg ones; "
        f"{BASELINE} is always included; all: also those with timed='all', SS-Net and M2SNet with a random "
        "LossNet (the ImageNet one's cost, no weights file) and without LossNet)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA autocast + GradScaler as nnU-Net does (default: on for CUDA; nnU-Net never autocasts on CPU)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the network (and loss.dc) as nnU-Net does (default: on CUDA only, as nnU-Net)",
    )
    p.add_argument("--mem-steps", type=int, default=2, help="steps per memory child process (default: 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--infer-repeats", type=int, default=6, help="timed predictions per network (default: 6)")
    p.add_argument("--case-scale", type=float, default=1.5, help="inference case size / patch size (default: 1.5)")
    p.add_argument(
        "--mirroring",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time mirroring in inference (default: on for CUDA as nnU-Net, off on CPU to save time)",
    )
    p.add_argument("--no-inference", action="store_true", help="skip the inference timing")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 0: torch's default (the core count). Default on CPU: 1, so that process CPU time "
        "measures work rather than threads waiting for each other on a shared machine",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and batches (default: 0)")
    p.add_argument(
        "--max-seconds",
        type=float,
        help="no trainer build or step starts after this many seconds from the script's start; the JSON keeps the "
        "complete rounds (memory children and inference are skipped once it has run out)",
    )
    p.add_argument("--lossnet-input-size", type=int, help="M2SNet LossNet input side (default: the trainer's, 224)")
    p.add_argument("--lossnet-max-slices", type=int, help="M2SNet 3D LossNet slices per step (default: the trainer's)")
    p.add_argument("--json", type=Path, help="write every number to this JSON file")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.amp and not cuda:
        p.error("--amp needs CUDA: nnU-Net's train_step autocasts on CUDA only")
    cfg = CONFIGS[args.config]
    args.amp = cuda if args.amp is None else args.amp
    args.compile = cuda if args.compile is None else args.compile
    args.mirroring = cuda if args.mirroring is None else args.mirroring
    args.patch = tuple(args.patch) if args.patch else (cfg.gpu_patch if cuda else cfg.cpu_patch)
    if len(args.patch) != cfg.dim:
        p.error(f"--patch needs {cfg.dim} sizes for {args.config}")
    args.steps = args.steps or (40 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if "all" in args.variants:
        args.variants = timed_names("all")
    args.variants = list(dict.fromkeys([BASELINE, *args.variants]))
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


def record_steps(result: dict[str, Any], run: StepRun, variants: Sequence[str]) -> None:
    """Put what ``run`` measured into ``result``: complete timed rounds only, and why a variant has none."""
    measured = [v for v, ts in run.times["wall"].items() if run.rounds and len(ts) == run.rounds]
    result["rounds"] = run.rounds
    result["step_time"] = (
        summarise({c: {v: run.times[c][v] for v in measured} for c in run.times}, BASELINE)
        if BASELINE in measured
        else {}
    )
    result["step_time_raw_s"] = {c: {v: run.times[c][v] for v in measured} for c in run.times}
    if run.cuda_step_increase_mib:
        result["cuda_memory"] = cuda_memory_summary(run)
    errors = dict(run.errors)
    for v in variants:
        if v not in measured and v not in errors:
            why = run.stopped or result.get("stopped") or result.get("error") or "not reached"
            errors[v] = f"no complete timed round ({why})"
    result["errors"] = errors
    result["stopped"] = run.stopped


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    t0 = time.perf_counter()
    deadline = t0 - process_age_s() + args.max_seconds if args.max_seconds else None
    result: dict[str, Any] = {
        "config": args.config,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "variants": list(args.variants),
        "amp": args.amp,
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "mem_steps": args.mem_steps,
        "max_seconds": args.max_seconds,
    }
    run = StepRun()
    previous_handler = signal.signal(signal.SIGTERM, _raise_time_budget)
    try:
        with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
            setup_nnunet_env(Path(tmp))
            log(f"planning {args.config} for a {args.patch} dataset with nnU-Net's planner ...")
            plans, dataset_json = make_plans(args.config, args.patch)
            desc = describe_plans(plans)
            batch = args.batch or (desc["planned_batch_size"] if cuda else CONFIGS[args.config].cpu_batch)
            setup = Setup(
                args.config,
                plans,
                dataset_json,
                batch,
                args.device,
                args.amp,
                args.compile,
                args.seed,
                2,
                args.threads,
                args.lossnet_input_size,
                args.lossnet_max_slices,
            )
            log(f"  {desc}; batch {batch}; device {args.device}; AMP {args.amp}; compile {args.compile}")
            prepare_process(setup)
            result.update(device=device_info(args.device), plans=desc, batch_size=batch)
            log(f"step time: {len(args.variants)} trainers alternating, {args.warmup} + {args.steps} rounds")
            try:
                time_steps(setup, args.variants, args.warmup, args.steps, deadline, run)
            except TimeBudgetExceeded as e:
                run.stopped = str(e)
            record_steps(result, run, args.variants)
            measured = list(result["step_time"].get("wall", {}))
            out_of_time = run.stopped is not None or (deadline is not None and time.perf_counter() > deadline)
            if not args.no_memory and measured and not out_of_time:
                log("peak memory:")
                result["memory_errors"] = {}
                result["memory"] = measure_memory(setup, measured, args.mem_steps, result["memory_errors"])
            if not args.no_inference and measured and not out_of_time:
                log("inference:")
                with contextlib.redirect_stdout(io.StringIO()):
                    trainer = build_trainer(setup, BASELINE)
                inf_times, max_abs_diff, shape = time_inference(
                    setup, trainer, args.infer_repeats, args.case_scale, args.mirroring
                )
                result["inference"] = {
                    "case_shape": shape,
                    "mirroring": args.mirroring,
                    "repeats": args.infer_repeats,
                    "identical_logits": max_abs_diff == 0.0,
                    "max_abs_logit_difference": max_abs_diff,
                    "summary": summarise(inf_times, "stock"),
                    "raw_s": inf_times,
                }
    except TimeBudgetExceeded as e:  # while planning, or in the memory / inference part
        result["stopped"] = result.get("stopped") or str(e)
    except Exception as e:
        result["error"] = _error("step_cost", e)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if "step_time" not in result:
        record_steps(result, run, args.variants)
    result["wall_time_s"] = time.perf_counter() - t0
    if "device" in result:
        log("")
        log(markdown(result))
    log(f"\n(total {result['wall_time_s']:.0f}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    code = 0 if main().get("step_time") else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written: skip tearing down the trainers (seconds on a busy machine)
