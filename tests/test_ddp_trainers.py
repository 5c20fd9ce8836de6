"""Each method's real trainer trained by nnU-Net's ``run_training`` in two DDP processes (gloo, CPU).

``nnUNetv2_train D C F -tr T -num_gpus 2`` runs every rank through nnU-Net's own trainer code under
``torch.distributed``: the batch split per rank (``_set_batch_size_and_oversample``), the DDP wrap in
``initialize``, gradient all-reduce in every ``train_step``, ``all_gather_object`` of the losses in
``on_train_epoch_end`` and checkpoints written by rank 0. Our trainers add to that path: per-epoch
term means reduced over ranks (SelfReg, M2SNet's LossNet, SS-Net), SelfReg's forward hooks and
M2SNet's decoder inside the DDP module, SS-Net's heads outside it (gradients averaged by hand) and its
feature memory (all-gathered). Here two forked processes join a gloo process group and each builds
the real trainer class (``nnUNetTrainerSelfReg``, ``nnUNetTrainerM2SNet_RandomLossNet``,
``nnUNetTrainerSSNet``) from a dataset preprocessed by nnU-Net's CLI, then calls ``run_training()``
(1 epoch of 2 training iterations and 1 validation iteration), each rank drawing its own batches.

What differs from a GPU run, and only because there is no GPU:

- nnU-Net's ``__init__`` sets ``device = cuda:<rank>`` under DDP (and a CUDA ``GradScaler``); the test
  sets ``device`` back to the CPU and ``grad_scaler`` to None (what nnU-Net sets for a CPU run) before
  ``initialize``. No autocast, no ``torch.compile`` (nnU-Net disables both on the CPU).
- ``initialize`` wraps the network with ``DDP(network, device_ids=[rank])``, which DDP refuses for a
  CPU module: the name ``DDP`` in nnU-Net's trainer module is replaced by a call with ``device_ids=None``;
  everything else in ``initialize`` (including ``convert_sync_batchnorm``, a no-op for nnU-Net's
  InstanceNorm) is nnU-Net's.
- ``run_ddp`` (``torch.cuda.set_device``, ``MASTER_ADDR``/``MASTER_PORT``, ``mp.spawn``) is replaced by
  a file-based ``init_process_group("gloo")`` in forked processes; nnU-Net reads the rank from
  ``torch.distributed`` only (no ``LOCAL_RANK`` variable). Spawned interpreters would start with
  torch's fixed default seed and OS-seeded numpy/random; here each forked rank gets its *own* torch
  and numpy/random seeds, stricter than a real run: the ranks must still start from identical weights
  (DDP broadcasts the network, the SS-Net trainer its heads) and draw different data.
- The plans are shrunk (32x32 patches, a 4-stage network of 4..16 channels, a global batch of 4, so
  2 patches per rank) and LossNet's input is 32x32 instead of 224x224 (CPU time).
- The splits file of the stock-split dataset is written before the ranks start (nnU-Net's
  ``do_split`` writes it on every rank at once when it is missing, a race on GPUs too).
- DDP's all-reduce runs through a registered comm hook that counts the parameters it reduces and
  then calls torch's own ``allreduce_hook`` (the reduction DDP does by default).

Checks per trainer: every DDP parameter is all-reduced in every step (no unused parameter; DDP would
also raise in the next step's forward), parameters (and SS-Net's heads) bitwise identical on both
ranks after the steps and different from the start, the method's logged epoch means identical on both
ranks and equal to the mean over both ranks' steps (per-step values observed by forward hooks on the
loss modules, or SS-Net's ``train_step`` output), nnU-Net's ``train_losses`` likewise, and SS-Net's
memory identical on both ranks. Not covered: nccl, CUDA, SyncBatchNorm, mixed precision, timing.
"""

from __future__ import annotations

import datetime
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.harness import small_2d_plans

WORLD = 2
GLOBAL_BATCH = 4  # nnU-Net splits it over the ranks: 2 patches each (SS-Net: 1 labelled + 1 unlabelled)
ITERS = 2
FOLD = 0
TORCH_SEED = 0  # + rank: initialisation differs per rank until DDP / the trainer broadcast rank 0's weights
DATA_SEED = 100  # + rank: numpy / random draw each rank's own batches

#: method -> (trainer class, dataset fixture, attributes set after construction, logged term keys)
METHODS = {
    "selfreg": (
        "nnUNetTrainerSelfReg",
        "ds2d",
        {},
        ("selfreg_scr", "selfreg_ifd_enc", "selfreg_ifd_dec", "selfreg_weighted"),
    ),
    "m2snet": ("nnUNetTrainerM2SNet_RandomLossNet", "ds2d", {"lossnet_input_size": 32}, ("m2snet_lossnet",)),
    "ssnet": (
        "nnUNetTrainerSSNet",
        "semisup2d",
        {},
        ("ssnet_sup", "ssnet_lds", "ssnet_cs_labeled", "ssnet_cs_unlabeled", "ssnet_weight"),
    ),
}


def _ddp_without_device_ids(module, device_ids=None, **kwargs):
    """nnU-Net's ``DDP(network, device_ids=[rank])`` for a CPU module (DDP accepts only None there)."""
    return DistributedDataParallel(module, device_ids=None, **kwargs)


def _counting_allreduce(counts: list[int], bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts[-1] += len(bucket.parameters())
    return allreduce_hook(None, bucket)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _step_terms(method: str, trainer, observed: list[dict]) -> None:
    """Record each training step's unweighted terms from the loss modules' own outputs (forward hooks)."""
    if method == "selfreg":
        weight = trainer.loss.weight
        assert isinstance(weight, dict), weight

        def hook(module, args, out):
            terms = {k: float(out[k]) for k in ("scr", "ifd_enc", "ifd_dec")}
            observed.append(
                {f"selfreg_{k}": v for k, v in terms.items()}
                | {"selfreg_weighted": sum(w * terms[k] for k, w in weight.items())}
            )

        trainer.loss.regularizer.register_forward_hook(hook)
    elif method == "m2snet":
        trainer.lossnet.register_forward_hook(lambda m, a, out: observed.append({"m2snet_lossnet": float(out)}))


def _train_on_rank(rank: int, method: str, preprocessed: str) -> dict:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    import nnunet_selfreg.trainers as trainers

    cls_name, _, attrs, _ = METHODS[method]
    nnunet_trainer_module.DDP = _ddp_without_device_ids
    torch.manual_seed(TORCH_SEED + rank)
    np.random.seed(DATA_SEED + rank)
    random.seed(DATA_SEED + rank)

    plans, dataset_json = small_2d_plans(Path(preprocessed))
    plans["configurations"]["2d"]["batch_size"] = GLOBAL_BATCH
    t = getattr(trainers, cls_name)(plans, "2d", FOLD, dataset_json, torch.device("cpu"))
    assert t.is_ddp and t.local_rank == rank and t.device.type == "cuda"  # nnU-Net's DDP assumption
    t.device, t.grad_scaler = torch.device("cpu"), None
    t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch = 1, ITERS, 1
    for k, v in attrs.items():
        setattr(t, k, v)

    t.initialize()
    assert isinstance(t.network, DistributedDataParallel)
    extra = list(t.ssnet_heads.parameters()) if method == "ssnet" else []
    ddp_params = [p for p in t.network.parameters() if p.requires_grad]
    start = _flat([*t.network.module.parameters(), *extra])
    counts: list[int] = []
    t.network.register_comm_hook(counts, _counting_allreduce)
    observed: list[dict] = []
    _step_terms(method, t, observed)
    losses: list[float] = []
    step = t.train_step

    def counted_step(batch: dict) -> dict:
        counts.append(0)
        out = step(batch)
        losses.append(float(out["loss"]))
        if method == "ssnet":
            observed.append(dict(zip(METHODS["ssnet"][3], map(float, out["ssnet"]), strict=True)))
        return out

    t.train_step = counted_step
    t.run_training()

    keys = ("train_losses", *METHODS[method][3])
    logged = {k: [float(v) for v in t.logger.get_value(k, step=None)] for k in keys}
    record = {
        "batch_size": int(t.batch_size),
        "ddp_params": len(ddp_params),
        "reduced_per_step": counts,
        "start": start,
        "params": _flat([*t.network.module.parameters(), *extra]),
        "network": {k: v.detach().clone() for k, v in t.network.module.state_dict().items()},
        "losses": losses,
        "observed": observed,
        "logged": logged,
    }
    if method == "selfreg":
        record["weights"] = dict(t.loss.weight)
    elif method == "m2snet":
        record["weights"] = {"lossnet": float(t.loss.weight)}
    else:
        record["weights"] = {"w": [o["ssnet_weight"] for o in observed], "cs": float(t.ssnet_cs_weight)}
        record["memory"] = [None if b is None else b.clone() for b in t.ssnet_memory.bank]
        record["num_labeled"] = int(t.ssnet_num_labeled)
    return record


def _worker(rank: int, method: str, preprocessed: str, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.save(_train_on_rank(rank, method, preprocessed), os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _write_stock_splits(preprocessed: Path) -> None:
    """nnU-Net's own 5-fold split (``do_split``), written once before the ranks start."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed / "splits_final.json"
    if not splits_file.is_file():
        data = str(
            preprocessed
            / json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["2d"]["data_identifier"]
        )
        keys = sorted(infer_dataset_class(data).get_identifiers(data))
        splits_file.write_text(json.dumps(generate_crossval_split(keys, seed=12345, n_splits=5)))


@pytest.fixture(params=list(METHODS))
def method(request) -> str:
    return request.param


@pytest.fixture
def preprocessed(method: str, nnunet_paths, request) -> Path:
    """The method's dataset, preprocessed by nnU-Net's CLI (a session fixture, so its time counts as set-up)."""
    dataset_id = request.getfixturevalue(METHODS[method][1])
    folder = next(nnunet_paths.preprocessed.glob(f"Dataset{dataset_id:03d}_*"))
    if method != "ssnet":  # SS-Net writes its own semi-supervised splits (rank 0, atomically)
        _write_stock_splits(folder)
    return folder


def test_real_trainer_on_two_gloo_ranks(method: str, preprocessed: Path, monkeypatch, tmp_path: Path):
    import nnunet_selfreg.trainers  # noqa: F401 - imported once here, inherited by the forked ranks

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # each rank draws its batches in-process, from its own seed
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    threads = torch.get_num_threads()
    try:
        # fork: the ranks inherit the imported modules (spawn would import nnU-Net again in every rank)
        mp.start_processes(
            _worker,
            args=(method, str(preprocessed), str(tmp_path / "init"), str(tmp_path)),
            nprocs=WORLD,
            join=True,
            start_method="fork",
        )
    finally:
        torch.set_num_threads(threads)
    r = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(WORLD)]

    assert [x["batch_size"] for x in r] == [GLOBAL_BATCH // WORLD] * WORLD  # nnU-Net's split of the batch
    assert r[0]["weights"] == r[1]["weights"], "the ranks weighted the method's terms differently"
    for x in r:
        assert x["reduced_per_step"] == [x["ddp_params"]] * ITERS, "a parameter was not all-reduced in a step"
    assert torch.equal(r[0]["start"], r[1]["start"]), "the ranks started from different parameters"
    assert torch.equal(r[0]["params"], r[1]["params"]), "parameters differ between the ranks after training"
    assert not torch.equal(r[0]["params"], r[0]["start"]), "training did not change the parameters"
    assert r[0]["losses"] != r[1]["losses"], "both ranks trained on the same batches"

    step_losses = r[0]["losses"] + r[1]["losses"]
    for x in r:
        assert x["logged"]["train_losses"] == [pytest.approx(np.mean(step_losses), rel=1e-6)]
    keys = METHODS[method][3]
    for x in r:
        assert len(x["observed"]) == ITERS, x["observed"]  # training steps only, one value set each
    for key in keys:
        per_rank = [np.mean([o[key] for o in x["observed"]]) for x in r]
        expected = np.mean([o[key] for x in r for o in x["observed"]])
        assert r[0]["logged"][key] == r[1]["logged"][key], f"{key}: ranks logged different epoch means"
        assert r[0]["logged"][key] == [pytest.approx(expected, rel=1e-5, abs=1e-7)], (key, per_rank)
        if key != "ssnet_weight":  # w(t) is the same on both ranks
            assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-9), f"{key}: ranks' steps gave the same mean"

    # rank 0 wrote the final checkpoint (with the method's own entry) from the trained parameters
    ckpt_file = next((tmp_path / "results").glob(f"Dataset*/{METHODS[method][0]}__*/fold_{FOLD}/checkpoint_final.pth"))
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert ckpt["network_weights"].keys() == r[0]["network"].keys()
    assert all(torch.equal(v, r[0]["network"][k]) for k, v in ckpt["network_weights"].items())
    assert {"selfreg": "init_args", "m2snet": "m2snet_lossnet", "ssnet": "ssnet"}[method] in ckpt

    if method == "ssnet":
        assert [x["num_labeled"] for x in r] == [1, 1]
        saved = ckpt["ssnet"]["memory"]["bank"]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(saved, r[0]["memory"], strict=True))
        banks = [x["memory"] for x in r]
        assert any(b is not None for b in banks[0]), "the memory stayed empty: nothing compared"
        for c, (b0, b1) in enumerate(zip(*banks, strict=True)):
            assert (b0 is None) == (b1 is None), f"class {c}: memory filled on one rank only"
            assert b0 is None or torch.equal(b0, b1), f"class {c}: memory differs between the ranks"
