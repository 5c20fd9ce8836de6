"""SS-Net's multi-GPU path on CPU with the gloo backend: one memory for all ranks, averaged head gradients."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_selfreg.losses.class_separation import ClassSeparationHeads, PrototypeMemory

WORLD = 2
CAPACITY = 4


def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    h = torch.randn(30, 6, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    if rank == 1:
        labels[labels == 2] = 1  # class 2 only on rank 0
    return h, labels


def _heads() -> ClassSeparationHeads:
    torch.manual_seed(0)  # identical weights on every rank, as after DDP's broadcast
    return ClassSeparationHeads(in_channels=6, num_classes=3, dim=5)


def _worker(rank: int, init_file: str, out: str) -> None:
    from nnunet_selfreg.trainers.ssnet import average_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        heads = _heads()
        h, labels = _rank_inputs(rank)
        fg = labels > 0
        z, scores = heads.memory_candidates(h[fg], labels[fg])
        memory = PrototypeMemory(num_classes=3, capacity=CAPACITY)
        memory.update(z, labels[fg], scores)  # torch.distributed is initialised: all-gather

        lin = torch.nn.Linear(2, 2)
        lin.weight.grad = torch.full((2, 2), float(rank + 1))  # rank 0: 1, rank 1: 2
        lin.bias.grad = None if rank == 0 else torch.full((2,), 4.0)  # a missing gradient counts as 0
        average_gradients(lin.parameters())
        torch.save({"bank": memory.bank, "w": lin.weight.grad, "b": lin.bias.grad}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_memory_is_global_and_identical_on_every_rank(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    # expected: one process scoring the union of both ranks' candidates
    heads = _heads()
    inputs = [_rank_inputs(r) for r in range(WORLD)]
    h = torch.cat([i[0] for i in inputs])
    labels = torch.cat([i[1] for i in inputs])
    fg = labels > 0
    z, scores = heads.memory_candidates(h[fg], labels[fg])
    expected = PrototypeMemory(num_classes=3, capacity=CAPACITY)
    expected.update(z, labels[fg], scores, distributed=False)

    for res in results:
        assert res["bank"][0] is None
        for c in (1, 2):
            assert res["bank"][c].shape == expected.bank[c].shape
            assert torch.allclose(res["bank"][c], expected.bank[c], atol=1e-5), f"class {c} differs from the union"
        assert torch.equal(res["w"], torch.full((2, 2), 1.5))
        assert torch.equal(res["b"], torch.full((2,), 2.0))
    # class 2 lives on rank 0 only, yet rank 1 holds it too; class 1 draws from both ranks
    assert torch.equal(results[1]["bank"][2], results[0]["bank"][2])
