"""Reliability: exported checkpoints predict without this package, interrupted training resumes
exactly, the taps do not leak, non-finite steps are reported, untrusted checkpoints are not unpickled.

Trainers: ``nnUNetTrainerSelfRegTinySeeded`` (``tests/ext_trainers/selfreg_reliability_trainers.py``) through
nnU-Net's CLIs, each run in its own ``nnUNet_results`` root; in-process trainers on a shrunken network.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.tools.export_stock import STOCK_TRAINER, StockNetworkCheck, export_stock, load_checkpoint_safely
from nnunet_selfreg.tools.main import main
from nnunet_selfreg.trainers import nnUNetTrainerSelfReg
from tests.harness import BIN, NNUNetEnv, small_2d_plans

SEEDED = "nnUNetTrainerSelfRegTinySeeded"
FOLD = 3  # test_e2e trains fold 0, test_trainer folds 1 and 2 (in their own trainer folders anyway)
EPOCHS, CRASH_AT = 2, 1
SELFREG_KEYS = ("selfreg_scr", "selfreg_ifd_enc", "selfreg_ifd_dec", "selfreg_weighted")


# --------------------------------------------------------------------------- helpers


def seeded_env(**extra: str) -> dict[str, str]:
    """Budget and single-process data loading (nnU-Net's augmentation then uses the re-seeded global RNGs)."""
    env = dict(
        SELFREG_TEST_EPOCHS=str(EPOCHS),
        SELFREG_TEST_ITERS="2",
        SELFREG_TEST_SKIP_FINAL_VAL="1",
        nnUNet_n_proc_DA="0",
    )
    env.update(extra)
    return env


def train_seeded(nnenv: NNUNetEnv, ds: int, results: Path, *args: str, check: bool = True, **extra: str):
    return nnenv.run(
        "nnUNetv2_train", str(ds), "2d", str(FOLD), "-tr", SEEDED, "-device", "cpu", *args,
        check=check, nnUNet_results=str(results), **seeded_env(**extra),
    )  # fmt: skip


def fold_dir(results: Path) -> Path:
    return next(results.glob(f"Dataset*/{SEEDED}__nnUNetPlans__2d")) / f"fold_{FOLD}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # files these tests wrote themselves


def sha256_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def rss_mb() -> float:
    """Resident set size of this process in MiB (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.fixture(scope="module")
def straight_run(nnenv: NNUNetEnv, ds2d: int, tmp_path_factory) -> Path:
    """An uninterrupted seeded run of EPOCHS epochs in its own results root; returns its fold folder."""
    results = tmp_path_factory.mktemp("results_straight")
    train_seeded(nnenv, ds2d, results)
    return fold_dir(results)


# --------------------------------------------------------------------------- 1. checkpoints travel


def _predict_from_modelfolder(model: Path, out: Path, inp: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start the stock ``nnUNetv2_predict_from_modelfolder`` (the three runs of the test overlap)."""
    cmd = [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out), "-m", str(model),
           "-f", str(FOLD), "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities",
           "--disable_progress_bar"]  # fmt: skip
    with open(f"{out}.log", "w") as log:  # a file, not a pipe: no run waits on a full pipe
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    proc.wait(timeout=900)
    return proc.returncode, Path(f"{proc.args[proc.args.index('-o') + 1]}.log").read_text()


def test_export_stock_predicts_without_our_package(nnenv, ds2d, straight_run, tmp_path, capsys):
    model = straight_run.parent
    before = sha256_tree(model)
    out = tmp_path / "exported"
    assert main(["export-stock", str(model), str(out)]) == 0
    assert sha256_tree(model) == before  # the source is never modified
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    ckpts = sorted(p.name for p in straight_run.glob("checkpoint_*.pth"))
    assert written == sorted(
        ["dataset.json", "dataset_fingerprint.json", "plans.json", *(f"fold_{FOLD}/{c}" for c in ckpts)]
    )
    for name in ckpts:
        orig, new = load(straight_run / name), load(out / f"fold_{FOLD}" / name)
        assert orig["trainer_name"] == SEEDED and new["trainer_name"] == STOCK_TRAINER
        assert new["init_args"] == orig["init_args"] and set(new) == set(orig)
        for key in set(orig) - {"trainer_name", "init_args", "network_weights", "optimizer_state"}:
            assert repr(new[key]) == repr(orig[key]), key
        assert all(torch.equal(new["network_weights"][k], v) for k, v in orig["network_weights"].items())
    capsys.readouterr()
    assert main(["export-stock", str(model), str(out)]) == 2  # an existing output is refused
    assert "exists already" in capsys.readouterr().err

    inp = tmp_path / "in"
    inp.mkdir()
    raw = next(nnenv.raw.glob(f"Dataset{ds2d:03d}_*")) / "imagesTr"
    cases = ("case_000", "case_001")
    for case in cases:
        (inp / f"{case}_0000.png").symlink_to(raw / f"{case}_0000.png")
    env_on = nnenv.env(nnUNet_results=str(model.parent.parent))  # tests/ext_trainers listed, our shim appended
    env_off = {k: v for k, v in env_on.items() if k != "nnUNet_extTrainer"}
    env_off["NNUNET_SELFREG_NO_AUTODISCOVERY"] = "1"  # as on a machine without nnunet-selfreg

    runs = [
        _predict_from_modelfolder(model, tmp_path / "p_orig_off", inp, env_off),
        _predict_from_modelfolder(model, tmp_path / "p_orig", inp, env_on),
        _predict_from_modelfolder(out, tmp_path / "p_exported", inp, env_off),
    ]
    (rc_fail, log_fail), (rc_ref, log_ref), (rc_exp, log_exp) = (_finish(p) for p in runs)
    assert rc_fail != 0 and f"Could not find requested nnunet trainer {SEEDED}" in log_fail, log_fail[-3000:]
    assert rc_ref == 0, log_ref[-3000:]
    assert rc_exp == 0, log_exp[-3000:]
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p_orig" / f"{case}.png")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p_exported" / f"{case}.png")))
        assert a.shape == (64, 64) and np.array_equal(a, b)
        pa = np.load(tmp_path / "p_orig" / f"{case}.npz")["probabilities"]
        pb = np.load(tmp_path / "p_exported" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-6)


class _Evil:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do with any code it likes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def fake_model(ds2d, nnenv, tmp_path) -> Path:
    """A model folder with the real plans/dataset.json of ds2d and a placeholder fold_0 checkpoint."""
    pre = next(nnenv.preprocessed.glob(f"Dataset{ds2d:03d}_*"))
    model = tmp_path / "Dataset901_X" / "nnUNetTrainerSelfReg__nnUNetPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text((pre / "nnUNetPlans.json").read_text())
    (model / "dataset.json").write_text((pre / "dataset.json").read_text())
    return model


def _checkpoint(model: Path, **entries) -> Path:
    path = model / "fold_0" / "checkpoint_final.pth"
    base = {"network_weights": {}, "init_args": {"configuration": "2d"}, "trainer_name": "nnUNetTrainerSelfReg"}
    torch.save({**base, **entries}, path)
    return path


def test_export_stock_refuses_unsafe_checkpoints_without_running_them(fake_model, tmp_path):
    marker = tmp_path / "code_ran"
    path = _checkpoint(fake_model, evil=_Evil(marker))
    with pytest.raises(UserError, match="not loaded, because unpickling it could run code"):
        export_stock(fake_model, tmp_path / "out", verbose=False)
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="run code"):
        load_checkpoint_safely(path)
    # the same pickle with weights_only=False would have run it: the test's premise holds
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_export_stock_builds_only_known_network_classes(fake_model, tmp_path, capsys):
    """plans.json names classes that nnU-Net imports and calls: the export's weight check calls none but
    dynamic_network_architectures.* with torch.nn.* building blocks."""
    plans = json.loads((fake_model / "plans.json").read_text())
    plans["configurations"]["2d"]["architecture"]["network_class_name"] = "builtins.exec"
    (fake_model / "plans.json").write_text(json.dumps(plans))
    _checkpoint(fake_model)
    export_stock(fake_model, tmp_path / "out")
    assert "weights not checked against the stock network for 2d (plans name builtins.exec)" in capsys.readouterr().out
    assert load(tmp_path / "out" / "fold_0" / "checkpoint_final.pth")["trainer_name"] == STOCK_TRAINER


def test_export_stock_all_copies_the_rest_but_no_links(fake_model, tmp_path):
    plans = json.loads((fake_model / "plans.json").read_text())
    weights = StockNetworkCheck(plans, json.loads((fake_model / "dataset.json").read_text()))._network("2d")
    _checkpoint(fake_model, network_weights=weights.state_dict())
    (fake_model / "fold_0" / "validation").mkdir()
    (fake_model / "fold_0" / "validation" / "summary.json").write_text("{}")
    (fake_model / "fold_0" / "training_log.txt").write_text("log")
    (fake_model / "fold_0" / "outside.txt").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("not part of the model")
    out = tmp_path / "out"
    written = export_stock(fake_model, out, copy_all=True, verbose=False)
    assert sorted(map(str, written)) == [
        "dataset.json", "fold_0/checkpoint_final.pth", "fold_0/training_log.txt",
        "fold_0/validation/summary.json", "plans.json",
    ]  # fmt: skip
    assert not (out / "fold_0" / "outside.txt").exists()
    assert not list(out.rglob(".*.tmp-*"))  # no temporary file left


def test_export_stock_errors_are_clear(fake_model, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(["export-stock", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nnunet-selfreg export-stock: error: "), err
        return err[0]

    out = tmp_path / "out"
    assert "no fold_*/checkpoint_*.pth" in error(fake_model, out)
    assert "does not exist" in error(tmp_path / "nope", out)
    assert "pass the model folder" in error(fake_model / "fold_0", out)
    # a killed run's folder (plans.json, fold_0, no checkpoint) is not offered as a model to export
    no_model = error(fake_model.parent, out)
    assert "pass one of them" not in no_model
    assert f"; {fake_model.name} has no fold_*/checkpoint_*.pth (a training stopped before" in no_model
    _checkpoint(fake_model, network_weights={"conv.weight": torch.zeros(1)})
    killed = fake_model.parent / "nnUNetTrainer__nnUNetPlans__2d"
    (killed / "fold_0").mkdir(parents=True)
    (killed / "plans.json").write_text("{}")
    both = error(fake_model.parent, out)
    assert f"it holds the model folders {fake_model.name}: pass one of them; {killed.name} has no fold_*" in both
    assert "never modified" in error(fake_model, fake_model / "copy")
    assert "do not fit the network that the stock nnUNetTrainer builds" in error(fake_model, out)
    torch.save({"state_dict": {}}, fake_model / "fold_0" / "checkpoint_final.pth")
    assert "lacks network_weights, init_args, trainer_name" in error(fake_model, out)
    (fake_model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    assert "cannot be read as a PyTorch checkpoint" in error(fake_model, out)
    assert not out.exists()  # nothing half-written is left behind
    out.mkdir()
    assert "exists already" in error(fake_model, out)


# --------------------------------------------------------------------------- 2. interrupted training resumes


def test_interrupted_training_resumes_exactly(nnenv, ds2d, straight_run, tmp_path, monkeypatch):
    results = tmp_path / "results_resumed"
    results.mkdir()
    crashed = train_seeded(nnenv, ds2d, results, check=False, SELFREG_TEST_CRASH_AT_EPOCH=str(CRASH_AT))
    assert crashed.returncode == 75, crashed.stderr[-3000:]
    fold = fold_dir(results)
    assert not (fold / "checkpoint_final.pth").exists()
    latest = load(fold / "checkpoint_latest.pth")
    assert latest["current_epoch"] == CRASH_AT

    # the SelfReg curves survive nnU-Net's load_checkpoint (in-process, as --c does it)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "probe_results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(nnenv.preprocessed))
    pre = next(nnenv.preprocessed.glob(f"Dataset{ds2d:03d}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    probe = nnUNetTrainerSelfReg(plans, "2d", FOLD, json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))
    probe.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    logged = probe.logger.local_logger.my_fantastic_logging
    assert all(len(logged[k]) == CRASH_AT for k in SELFREG_KEYS)
    assert logged["selfreg_scr"] == latest["logging"]["selfreg_scr"]
    del probe

    train_seeded(nnenv, ds2d, results, "--c")
    a, b = load(straight_run / "checkpoint_final.pth"), load(fold / "checkpoint_final.pth")
    assert a["current_epoch"] == b["current_epoch"] == EPOCHS
    assert set(a["logging"]) == set(b["logging"]) >= set(SELFREG_KEYS)
    for key, values in a["logging"].items():
        assert len(values) == len(b["logging"][key]) == EPOCHS, key
        if not key.endswith("timestamps"):
            np.testing.assert_allclose(np.asarray(values, float), np.asarray(b["logging"][key], float), rtol=1e-6)
    # weights and optimizer state: equal on CPU with seeded, single-process data loading (observed: bitwise)
    for k, v in a["network_weights"].items():
        torch.testing.assert_close(b["network_weights"][k], v, rtol=0, atol=1e-6, msg=k)
    for i, state in a["optimizer_state"]["state"].items():
        torch.testing.assert_close(b["optimizer_state"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    logs = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"test: simulated crash after epoch {CRASH_AT - 1}" in logs


# --------------------------------------------------------------------------- 3./4. in-process training


class _InProcessTrainer(nnUNetTrainerSelfReg):
    """nnUNetTrainerSelfReg under its own results folder name (no clash with other tests)."""


def tiny_trainer(env: NNUNetEnv, ds: int, fold: int, shrink: bool = True) -> nnUNetTrainerSelfReg:
    """In-process trainer on 32x32 patches; ``shrink`` also narrows the network (4 stages, 4..16 channels)."""
    plans, dataset_json = small_2d_plans(next(env.preprocessed.glob(f"Dataset{ds:03d}_*")), shrink)
    t = _InProcessTrainer(plans, "2d", fold, dataset_json, torch.device("cpu"))
    t.num_val_iterations_per_epoch = 1
    return t


@pytest.fixture
def in_process(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine are ~10x slower, not faster
    yield nnunet_paths
    torch.set_num_threads(threads)


def _train_and_watch(t: nnUNetTrainerSelfReg, steps: int, marks: tuple[int, ...]) -> dict[int, tuple[float, int]]:
    """``steps`` training steps in one epoch; after each, the taps hold nothing; RSS and tensors at ``marks``."""
    t.num_iterations_per_epoch = steps
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    seen, outputs = {}, []
    for i in range(1, steps + 1):
        out = t.train_step(next(t.dataloader_train))
        outputs.append({"loss": np.array(out["loss"])})  # nnU-Net's array views the loss tensor: copy it
        assert not t.selfreg_taps._encoder and not t.selfreg_taps._decoder, f"step {i}: features kept"
        if i in marks:
            seen[i] = (rss_mb(), live_tensors())
    sums, n = t.loss.epoch_stats.state()
    assert n == steps and not sums.requires_grad and sums.grad_fn is None  # no autograd graph carried over
    t.on_train_epoch_end(outputs)
    assert t.loss.epoch_stats.state() == (None, 0)
    t.on_train_end()
    return seen


def test_taps_keep_memory_flat_fast(in_process, ds2d):
    seen = _train_and_watch(tiny_trainer(in_process, ds2d, fold=4), 30, marks=(10, 30))
    (rss10, tensors10), (rss30, tensors30) = seen[10], seen[30]
    print(f"RSS at steps 10/30: {rss10:.1f}/{rss30:.1f} MiB; live tensors {tensors10}/{tensors30}")
    assert tensors30 == tensors10, f"live tensors grew from {tensors10} to {tensors30}"
    assert rss30 - rss10 < 100, f"RSS grew by {rss30 - rss10:.1f} MiB in 20 steps"


@pytest.mark.slow
def test_taps_keep_memory_flat_500_iterations(in_process, ds2d):
    """500 steps of the plans' own network (32x32 patches, batch 2): < 50 MiB RSS growth from step 100 to 500."""
    seen = _train_and_watch(tiny_trainer(in_process, ds2d, fold=4, shrink=False), 500, marks=(100, 300, 500))
    (rss100, tensors100), (rss500, tensors500) = seen[100], seen[500]
    print(f"RSS at steps 100/300/500: {[round(seen[m][0], 1) for m in (100, 300, 500)]} MiB")
    assert tensors500 == tensors100
    assert rss500 - rss100 < 50, f"RSS grew by {rss500 - rss100:.1f} MiB from step 100 to 500"


def test_scr_channel_sampling_restarts_from_seed_fold_and_epoch(in_process, ds2d):
    """The SCR generator is not in nnU-Net's checkpoint: its state must follow from (seed, fold, epoch) alone."""
    t = tiny_trainer(in_process, ds2d, fold=0)
    t.initialize()
    states = {}
    for epoch in (3, 4, 3):
        t.current_epoch = epoch
        t.on_train_epoch_start()
        state = t.loss.generator.get_state()
        assert epoch not in states or torch.equal(states[epoch], state)
        states[epoch] = state
        torch.randperm(16, generator=t.loss.generator)  # a step's draws
    assert not torch.equal(states[3], states[4])
    other = tiny_trainer(in_process, ds2d, fold=1)
    other.initialize()
    other.current_epoch = 3
    other.on_train_epoch_start()
    assert not torch.equal(other.loss.generator.get_state(), states[3])


class _NaNOnce(torch.nn.Module):
    """Wraps the regulariser; all its terms are NaN on call ``bad_call``; records the terms of the other calls."""

    def __init__(self, inner: torch.nn.Module, bad_call: int) -> None:
        super().__init__()
        self.inner, self.bad_call, self.calls = inner, bad_call, 0
        self.finite_terms: list[dict[str, float]] = []

    def forward(self, enc, dec, generator=None):
        terms = self.inner(enc, dec, generator=generator)
        self.calls += 1
        if self.calls == self.bad_call:
            return {k: v * float("nan") for k, v in terms.items()}
        self.finite_terms.append({k: float(v.detach()) for k, v in terms.items()})
        return terms


def test_nonfinite_step_is_counted_and_printed_in_the_training_log(in_process, ds2d):
    t = tiny_trainer(in_process, ds2d, fold=0)  # _InProcessTrainer has its own results folder
    t.num_iterations_per_epoch = 3
    t.on_train_start()
    t.loss.regularizer = _NaNOnce(t.loss.regularizer, bad_call=2)
    t.on_epoch_start()
    t.on_train_epoch_start()
    outputs = [t.train_step(next(t.dataloader_train)) for _ in range(3)]
    assert t.loss.regularizer.calls == 3
    assert all(np.isfinite(o["loss"]) for o in outputs)
    assert all(torch.isfinite(p).all() for p in t.network.parameters())
    t.on_train_epoch_end(outputs)
    log = Path(t.log_file).read_text()
    assert "(3 steps); WARNING: L_reg was non-finite and skipped in 1 step(s)" in log
    # the logged epoch means are those of the two finite steps (the terms the regulariser returned)
    finite = t.loss.regularizer.finite_terms
    assert len(finite) == 2
    expected = {f"selfreg_{k}": np.mean([f[k] for f in finite]) for k in ("scr", "ifd_enc", "ifd_dec")}
    w = t.loss.weight  # λ, or one λ per term
    weighted = [sum(v * f[k] for k, v in w.items()) if isinstance(w, dict) else w * f["total"] for f in finite]
    expected["selfreg_weighted"] = np.mean(weighted)
    for key, value in expected.items():
        assert t.logger.get_value(key, step=-1) == pytest.approx(value, rel=1e-5), key
    t.on_train_end()
