"""Per-epoch term means (the shared ``EpochStats``): finite-step means with a non-finite step mid-epoch, and
their DDP reduction in each method's trainer.

``RegularisedSegLoss`` keeps SelfReg's per-term sums on the device and drops (and counts) a step whose
``L_reg`` is not finite; the trainer's ``_log_selfreg_epoch`` all-reduces those sums and step counts over
DDP ranks before logging. Here the regulariser is a tiny stand-in whose terms are simple functions of
constant tapped features, so every expected mean is computed in the test from the step inputs, and the
trainer's own method runs in two gloo processes on the CPU with different sums and step counts per rank.
The same two processes run M2SNet's ``_log_lossnet_epoch`` (LossNet's term summed by its real loss
module, a constant stand-in for the VGG-16) and SS-Net's ``_log_ssnet_epoch`` (its five terms), whose
global means must be the sums over both ranks divided by the steps over both ranks.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_selfreg.losses.selfreg_objective import RegularisedSegLoss

WEIGHT = 0.25  # λ
SEG = 0.75  # the segmentation loss of every step
TERMS = ("scr", "ifd_enc", "ifd_dec", "reg_weighted")
LOG_KEY = {"scr": "selfreg_scr", "ifd_enc": "selfreg_ifd_enc", "ifd_dec": "selfreg_ifd_dec",
           "reg_weighted": "selfreg_weighted"}  # fmt: skip
#: per step (a, b): the encoder map is filled with a, the decoder map with b; NaN makes L_reg non-finite
EPOCH = [(1.0, 0.5), (math.nan, 3.0), (2.0, -1.0), (4.0, 2.0)]  # step 2 of 4 is non-finite
RANK_STEPS = {
    0: [(1.0, 0.5), (math.nan, 3.0), (2.0, -1.0)],  # 3 steps, 1 non-finite
    1: [(3.0, 1.0), (5.0, -2.0), (math.inf, 0.0), (0.5, 4.0), (-2.0, 1.5)],  # 5 steps, 1 non-finite
}


class _Taps:
    """Hands the loss one prepared ``([encoder maps], [decoder maps])`` per step, like ``UNetFeatureTaps.pop``."""

    def __init__(self) -> None:
        self.next: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def pop(self, *args, **kwargs):
        value, self.next = self.next, None
        return value


def _regulariser(enc: list[torch.Tensor], dec: list[torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    """SCR = mean(e), IFD_enc = mean(e²), IFD_dec = mean(d); total = their sum (non-finite when e is)."""
    e, d = enc[0], dec[0]
    terms = {"scr": e.mean(), "ifd_enc": (e * e).mean(), "ifd_dec": d.mean()}
    terms["total"] = terms["scr"] + terms["ifd_enc"] + terms["ifd_dec"]
    return terms


def _expected_terms(a: float, b: float) -> dict[str, float]:
    """The step's terms from its inputs, in plain Python (what the loss must add up when finite)."""
    return {"scr": a, "ifd_enc": a * a, "ifd_dec": b, "reg_weighted": WEIGHT * (a + a * a + b)}


def _is_finite_step(a: float, b: float) -> bool:
    return math.isfinite(a + a * a + b)


def _loss() -> tuple[RegularisedSegLoss, _Taps]:
    taps = _Taps()
    return RegularisedSegLoss(lambda output, target: torch.tensor(SEG), taps, _regulariser, WEIGHT), taps


def _run_steps(loss: RegularisedSegLoss, taps: _Taps, steps: list[tuple[float, float]]) -> list[float]:
    returned = []
    for a, b in steps:
        enc = torch.full((2, 3, 4, 4), a, requires_grad=True)
        dec = torch.full((2, 3, 4, 4), b, requires_grad=True)
        taps.next = ([enc], [dec])
        returned.append(float(loss(None, None).detach()))
    return returned


def _finite_means(steps: list[tuple[float, float]]) -> dict[str, float]:
    finite = [_expected_terms(a, b) for a, b in steps if _is_finite_step(a, b)]
    return {k: sum(t[k] for t in finite) / len(finite) for k in TERMS}


def test_epoch_means_skip_a_nonfinite_step_in_the_middle():
    loss, taps = _loss()
    returned = _run_steps(loss, taps, EPOCH)
    # the returned loss: L_seg + λ·L_reg on finite steps, L_seg alone on the skipped one
    for (a, b), value in zip(EPOCH, returned, strict=True):
        extra = _expected_terms(a, b)["reg_weighted"] if _is_finite_step(a, b) else 0.0
        assert value == pytest.approx(SEG + extra, rel=1e-6)

    result = loss.epoch_stats.pop_means()
    means = result.means
    assert result.steps == 4 and result.nonfinite_steps == 1
    expected = _finite_means(EPOCH)  # over steps 1, 3 and 4
    assert expected["scr"] == pytest.approx(7 / 3)  # the recipe itself, by hand: (1 + 2 + 4) / 3
    for term in TERMS:
        assert means[term] == pytest.approx(expected[term], rel=1e-6), term

    # the next epoch starts from zero
    _run_steps(loss, taps, EPOCH[2:])
    result = loss.epoch_stats.pop_means()
    means = result.means
    assert result.steps == 2 and result.nonfinite_steps == 0
    for term in TERMS:
        assert means[term] == pytest.approx(_finite_means(EPOCH[2:])[term], rel=1e-6), term


# --------------------------------------------------------------------------- DDP


class _Logger:
    def __init__(self) -> None:
        self.logged: dict[str, list[float]] = {}

    def log(self, key: str, value: float, epoch: int) -> None:
        self.logged.setdefault(key, []).append(float(value))


def _trainer_stand_in(epoch: int, **attrs) -> types.SimpleNamespace:
    """The attributes a trainer's epoch-logging method reads, on a DDP rank."""
    t = types.SimpleNamespace(
        is_ddp=True, device=torch.device("cpu"), current_epoch=epoch, logger=_Logger(), printed=[]
    )
    t.__dict__.update(attrs)
    t.print_to_log_file = lambda *args, **kwargs: t.printed.append(" ".join(map(str, args)))
    return t


def _selfreg_stand_in(loss: RegularisedSegLoss, epoch: int) -> types.SimpleNamespace:
    from nnunet_selfreg.trainers.selfreg import nnUNetTrainerSelfReg

    t = _trainer_stand_in(epoch, loss=loss, selfreg_use_scr=True, selfreg_use_ifd=True)
    t._selfreg_log_keys = types.MethodType(nnUNetTrainerSelfReg._selfreg_log_keys, t)
    return t


#: M2SNet: the unweighted LossNet term of each step, per rank and epoch (rank 1 has no step in epoch 1)
LOSSNET_STEPS = {0: [[0.5, 1.5], [1.0, 2.0]], 1: [[2.0, 3.0, 4.0], []]}
LOSSNET_WEIGHT = 0.1
#: SS-Net: one row of its five terms (sup, lds, cs_labeled, cs_unlabeled, weight) per step, per rank and epoch
SSNET_STEPS = {
    0: [[[1.0, 0.2, 0.3, 0.4, 0.01], [3.0, 0.6, 0.1, 0.2, 0.02]], []],
    1: [[[0.5, 0.1, 0.5, 0.9, 0.03]], [[2.0, 0.4, 0.2, 0.6, 0.04], [4.0, 0.8, 0.4, 0.2, 0.05]]],
}


class _ConstantLossNet(torch.nn.Module):
    """Returns ``value`` whatever the maps (the real loss module sums it, as it sums VGG-16's term)."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0.0

    def forward(self, prob: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.value) + 0.0 * prob.sum()


def _log_lossnet_epochs(rank: int) -> list[dict]:
    from nnunet_selfreg.losses.lossnet import SegLossWithLossNet
    from nnunet_selfreg.trainers.m2snet import nnUNetTrainerM2SNet

    lossnet = _ConstantLossNet()
    loss = SegLossWithLossNet(lambda output, target: torch.tensor(SEG), lossnet, LOSSNET_WEIGHT, has_regions=False)
    output = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.ones(1, 1, 4, 4)
    record = []
    for epoch, values in enumerate(LOSSNET_STEPS[rank]):
        for v in values:
            lossnet.value = v
            loss(output, target)
        t = _trainer_stand_in(epoch, loss=loss, lossnet_weight=LOSSNET_WEIGHT)
        nnUNetTrainerM2SNet._log_lossnet_epoch(t)
        record.append({"logged": t.logger.logged, "printed": t.printed, "left": loss.epoch_stats.steps})
    return record


def _log_ssnet_epochs(rank: int) -> list[dict]:
    from nnunet_selfreg.epoch_stats import EpochStats
    from nnunet_selfreg.trainers.ssnet import SSNET_TERMS, nnUNetTrainerSSNet

    stats = EpochStats(SSNET_TERMS)
    record = []
    for epoch, rows in enumerate(SSNET_STEPS[rank]):
        for row in rows:
            stats.add(dict(zip(SSNET_TERMS, torch.tensor(row), strict=True)))
        t = _trainer_stand_in(epoch, ssnet_stats=stats)
        nnUNetTrainerSSNet._log_ssnet_epoch(t)
        record.append({"logged": t.logger.logged, "printed": t.printed, "left": stats.steps})
    return record


def _worker(rank: int, init_file: str, out: str) -> None:
    from nnunet_selfreg.trainers.selfreg import nnUNetTrainerSelfReg

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss, taps = _loss()
        record = []
        # epoch 0: different sums and step counts per rank; epoch 1: rank 1 has no step at all
        for epoch, steps in enumerate((RANK_STEPS[rank], EPOCH[2:] if rank == 0 else [])):
            _run_steps(loss, taps, steps)
            t = _selfreg_stand_in(loss, epoch)
            nnUNetTrainerSelfReg._log_selfreg_epoch(t)
            record.append({"logged": t.logger.logged, "printed": t.printed, "left": loss.epoch_stats.steps})
        Path(out, f"{rank}.json").write_text(json.dumps(record))
        Path(out, f"lossnet{rank}.json").write_text(json.dumps(_log_lossnet_epochs(rank)))
        Path(out, f"ssnet{rank}.json").write_text(json.dumps(_log_ssnet_epochs(rank)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_records(tmp_path_factory) -> Path:
    """Both ranks' records of every method's epoch logging (one pair of forked gloo processes)."""
    from nnunet_selfreg import trainers  # noqa: F401 - imported once here, inherited by the forked ranks

    out = tmp_path_factory.mktemp("gloo")
    # fork, not spawn: two fresh interpreters importing nnU-Net's trainer cost ~20 s on a 2-core machine
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True, start_method="fork")
    return out


def test_ddp_reduction_of_epoch_means_over_two_gloo_ranks(gloo_records: Path):
    tmp_path = gloo_records

    records = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]

    all_steps = RANK_STEPS[0] + RANK_STEPS[1]  # sums over ranks / finite steps over ranks (2 + 4)
    expected = [_finite_means(all_steps), _finite_means(EPOCH[2:])]
    assert expected[0] != _finite_means(RANK_STEPS[0]) and expected[0] != _finite_means(RANK_STEPS[1])
    for rank, record in enumerate(records):
        for epoch, rec in enumerate(record):
            for term in TERMS:
                assert rec["logged"][LOG_KEY[term]] == [pytest.approx(expected[epoch][term], rel=1e-6)], (
                    rank, epoch, term,
                )  # fmt: skip
            assert rec["left"] == 0  # the sums were consumed
        assert "(8 steps); WARNING: L_reg was non-finite and skipped in 2 step(s)" in record[0]["printed"][0]
        assert record[1]["printed"][0].endswith("(2 steps)")
    assert records[0][0]["logged"] == records[1][0]["logged"]  # identical on both ranks


def test_ddp_reduction_of_lossnet_epoch_means(gloo_records: Path):
    records = [json.loads((gloo_records / f"lossnet{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        values = LOSSNET_STEPS[0][epoch] + LOSSNET_STEPS[1][epoch]
        mean = sum(values) / len(values)  # epoch 0: 11 / 5, not either rank's own mean (1, 3)
        for rank, record in enumerate(records):
            rec = record[epoch]
            assert rec["logged"]["m2snet_lossnet"] == [pytest.approx(mean, rel=1e-6)], (rank, epoch)
            assert rec["printed"] == [
                f"LossNet epoch mean: {np.round(mean, 6)} (weighted {np.round(LOSSNET_WEIGHT * mean, 6)}, "
                f"{len(values)} steps)"
            ]
            assert rec["left"] == 0


def test_ddp_reduction_of_ssnet_epoch_means(gloo_records: Path):
    from nnunet_selfreg.trainers.ssnet import SSNET_TERMS

    records = [json.loads((gloo_records / f"ssnet{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        rows = np.array(SSNET_STEPS[0][epoch] + SSNET_STEPS[1][epoch])
        means = rows.mean(axis=0)  # what gathering every rank's step outputs and averaging gives
        if epoch == 0:  # both ranks have steps: the global means are neither rank's own
            assert all(not np.allclose(means, np.mean(SSNET_STEPS[r][0], axis=0)) for r in range(2))
        for rank, record in enumerate(records):
            rec = record[epoch]
            for key, mean in zip(SSNET_TERMS, means, strict=True):
                assert rec["logged"][key] == [pytest.approx(mean, rel=1e-6)], (rank, epoch, key)
            (line,) = rec["printed"]
            assert line.startswith(f"SS-Net epoch means: sup {np.round(means[0], 6)}, lds ")
            assert line.endswith(f", weight {np.round(means[4], 6)}")
            assert rec["left"] == 0
