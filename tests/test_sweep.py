"""``nnunet-selfreg sweep``'s fast pieces: grid checks, manifest, locks, atomic checkpoints, status, options.

The trainings themselves (SLURM, local workers, preemption, Ctrl-C) are in ``tests/test_sweep_e2e.py``
(marker ``slurm``).
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.evaluation.stats import repeat_of
from nnunet_selfreg.sweep import GridSpec, plan_grid, run_name
from nnunet_selfreg.sweep.executors import parse_slurm_time
from nnunet_selfreg.sweep.job import lock_path
from nnunet_selfreg.sweep.locks import FileLock, is_locked
from nnunet_selfreg.sweep.manifest import Manifest
from nnunet_selfreg.sweep.preemption import _atomic
from nnunet_selfreg.sweep.status import job_statuses
from nnunet_selfreg.tools.main import main
from nnunet_selfreg.tools.sweep import _sbatch_options


def test_run_names_are_what_compare_reads_as_repeats():
    for trainer in ("nnUNetTrainer", "nnUNetTrainerSelfReg_100epochs", "MyTrainer_Budget"):
        assert run_name(trainer, 1) == trainer
        names = [run_name(trainer, k) for k in (2, 3, 11)]
        assert names == [f"{trainer}_Rep2", f"{trainer}_Rep3", f"{trainer}_Rep11"]
        assert {repeat_of(n) for n in names} == {trainer}


def test_grid_is_planned_configuration_fold_trainer_run(nnunet_paths, ds2d, monkeypatch):
    monkeypatch.delenv("NNUNET_SELFREG_BUDGET_EPOCHS", raising=False)
    results = nnunet_paths.results
    before = sorted(p.name for p in results.rglob("*"))
    grid = plan_grid(GridSpec(str(ds2d), ("2d",), ("nnUNetTrainer", "nnUNetTrainerSelfReg"), ("1", "0"), repeats=2))
    keys = [j.key for j in grid.jobs]
    assert keys[:4] == [
        "nnUNetTrainer__nnUNetPlans__2d/fold_1",
        "nnUNetTrainer_Rep2__nnUNetPlans__2d/fold_1",
        "nnUNetTrainerSelfReg__nnUNetPlans__2d/fold_1",
        "nnUNetTrainerSelfReg_Rep2__nnUNetPlans__2d/fold_1",
    ]
    assert len(keys) == 8 and len(set(keys)) == 8 and grid.env_budget is None
    assert grid.dataset.startswith(f"Dataset{ds2d:03d}_")
    assert (nnunet_paths.preprocessed / grid.dataset / "splits_final.json").is_file()  # nnU-Net's own split
    assert sorted(p.name for p in results.rglob("*")) == before  # checking starts nothing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainers": ("nnUNetTrainerDoesNotExist",)}, "cannot find 'nnUNetTrainerDoesNotExist'"),
        ({"trainers": ("nnUNetTrainer", "nnUNetTrainer")}, "listed twice"),
        ({"trainers": ("nnUNetTrainer_7epochs",)}, "cannot find"),
        ({"trainers": ("bad__name",)}, "not a trainer class name"),
        ({"dataset": "997"}, "dataset '997' not found"),
        ({"configurations": ("3d_fullres",)}, "configuration '3d_fullres'"),
        ({"folds": ("7",)}, "fold 7 is not in splits_final.json"),
        ({"folds": ("x",)}, "neither a number nor 'all'"),
        ({"folds": ("0", "0")}, "folds repeat"),
        ({"plans": "nnUNetResEncUNetMPlans"}, "no plans 'nnUNetResEncUNetMPlans'"),
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"trainers": ("nnUNetTrainer_Budget",)}, "NNUNET_SELFREG_BUDGET_EPOCHS"),
    ],
)
def test_bad_grids_are_one_line_errors_before_anything_starts(nnunet_paths, ds2d, monkeypatch, change, message):
    monkeypatch.delenv("NNUNET_SELFREG_BUDGET_EPOCHS", raising=False)
    spec = {"dataset": str(ds2d), "configurations": ("2d",), "trainers": ("nnUNetTrainer",), "folds": ("0",)}
    spec.update(change)
    with pytest.raises(UserError, match=message) as err:
        plan_grid(GridSpec(**spec))
    assert "\n" not in str(err.value)


def test_budget_of_earlier_results_is_checked(nnunet_paths, ds2d, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("NNUNET_SELFREG_BUDGET_EPOCHS", "3")
    monkeypatch.setenv("NNUNET_SELFREG_BUDGET_ITERATIONS", "4")
    spec = GridSpec(str(ds2d), ("2d",), ("nnUNetTrainer_Budget",), ("0",))
    grid = plan_grid(spec)
    assert grid.env_budget == (3, 4, 5)
    fold = grid.jobs[0].fold_dir(grid.results)
    fold.mkdir(parents=True)
    (fold / "debug.json").write_text(json.dumps({"num_epochs": "2", "num_iterations_per_epoch": "4"}))
    with pytest.raises(UserError, match="trained with 2 epochs x 4 iterations, not 3 x 4; they are never overwritten"):
        plan_grid(spec)


def test_cli_errors_are_one_line(nnunet_paths, ds2d, capsys, monkeypatch, tmp_path):
    assert main(["sweep", "-d", str(ds2d), "-c", "2d", "-tr", "NoSuchTrainer", "-f", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-selfreg sweep: error:") and "NoSuchTrainer" in err and "\n" not in err
    assert main(["sweep", "-c", "2d"]) == 2
    assert "sweep needs -d, -tr" in capsys.readouterr().err
    assert main(["sweep", "status", "no-such-sweep"]) == 2
    assert "no sweep named 'no-such-sweep'" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert main(["sweep", "-d", str(ds2d), "-c", "2d", "-tr", "nnUNetTrainer", "--executor", "slurm"]) == 2
    assert "needs SLURM's sbatch and squeue on PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("30", 30), ("90:30", 91), ("24:00:00", 1440), ("1-00", 1440), ("1-12:00", 2160), ("2-00:00:01", 2881)],
)
def test_slurm_time_formats(text, minutes):
    assert parse_slurm_time(text) == minutes


def test_slurm_option_errors():
    with pytest.raises(UserError, match="not a SLURM time"):
        parse_slurm_time("tomorrow")
    assert _sbatch_options(["qos=high", "exclusive", "--constraint=a100"]) == {
        "qos": "high",
        "exclusive": True,
        "constraint": "a100",
    }
    with pytest.raises(UserError, match="KEY=VALUE"):
        _sbatch_options(["=x"])


def _bump(folder: str, key: str, n: int) -> None:
    manifest = Manifest(Path(folder))
    for _ in range(n):
        with manifest.editing() as data:
            data["jobs"][key]["attempts"] += 1
            data["jobs"]["shared"]["attempts"] += 1


def test_manifest_updates_from_many_processes_are_not_lost(tmp_path):
    manifest = Manifest(tmp_path / "sweep")
    jobs = {k: {"trainer": k} for k in ("a", "b", "c", "shared")}
    manifest.record_invocation("t", "Dataset001_X", ["nnunet-selfreg", "sweep"], "local", {}, {}, jobs)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_bump, args=(str(manifest.folder), k, 20)) for k in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    data = manifest.read()
    assert [data["jobs"][k]["attempts"] for k in ("a", "b", "c", "shared")] == [20, 20, 20, 60]
    assert (
        data["invocations"][0]["command"] == "nnunet-selfreg sweep" and "nnunetv2" in data["invocations"][0]["versions"]
    )
    assert not list(manifest.folder.glob(".manifest.json.tmp-*"))


def test_lock_belongs_to_a_process_and_dies_with_it(tmp_path):
    path = tmp_path / "locks" / "job.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nnunet_selfreg.sweep.locks import FileLock\n"
         "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(path)
        assert not FileLock(path).acquire(blocking=False)
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked(path)  # killed: no stale lock
    lock = FileLock(path)
    assert lock.acquire(blocking=False) and is_locked(path)
    lock.release()


def test_checkpoint_writes_are_atomic(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"epoch 49")

    def killed_mid_write(filename: str) -> None:
        Path(filename).write_bytes(b"half of epoch 50")
        raise KeyboardInterrupt  # what a signal raising in the middle of torch.save looks like here

    with pytest.raises(KeyboardInterrupt):
        _atomic(killed_mid_write)(str(target))
    assert target.read_bytes() == b"epoch 49" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    _atomic(lambda f: Path(f).write_bytes(b"epoch 50"))(str(target))
    assert target.read_bytes() == b"epoch 50" and len(list(tmp_path.iterdir())) == 1
    _atomic(lambda f: None)(str(tmp_path / "checkpoint_best.pth"))  # nothing written (rank > 0): nothing moved
    assert len(list(tmp_path.iterdir())) == 1


def test_status_believes_files_and_locks_over_the_manifest(tmp_path):
    results = tmp_path / "results"
    sweep_dir = results / "Dataset001_X" / "sweeps" / "t"
    record = {"configuration": "2d", "base_trainer": "T", "run": 1, "plans": "P", "executor": "local", "attempts": 1}
    data = {"dataset": "Dataset001_X", "jobs": {}}
    for fold, state in ((0, "running"), (1, "running"), (2, "done"), (3, "queued"), (4, "failed")):
        data["jobs"][f"T__P__2d/fold_{fold}"] = {**record, "trainer": "T", "fold": fold, "state": state}
    data["jobs"]["T__P__2d/fold_3"]["queued_by"] = {"host": "elsewhere", "pid": 1}
    data["jobs"]["T__P__2d/fold_4"]["error"] = "RuntimeError: boom"
    done = results / "Dataset001_X" / "T__P__2d" / "fold_1"
    (done / "validation").mkdir(parents=True)
    (done / "checkpoint_final.pth").write_bytes(b"x")
    (done / "validation" / "summary.json").write_text("{}")
    lock = FileLock(lock_path(sweep_dir.parent, "T__P__2d__fold_0"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nnunet_selfreg.sweep.locks import FileLock\n"
         "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(lock.path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        states = [s.state for s in job_statuses(sweep_dir, data, results)]
    finally:
        holder.kill()
        holder.wait()
    # fold 0: its lock is held; 1: the files say done; 2: recorded done but no files; 3: its sweep is gone
    assert states == ["running", "done", "pending", "pending", "failed"]
    states = [s.state for s in job_statuses(sweep_dir, data, results)]
    assert states[0] == "interrupted"  # recorded running, nobody holds the lock: killed


def test_sweep_is_a_listed_tool():
    from nnunet_selfreg.tools.main import TOOLS, build_parser

    assert "sweep" in TOOLS
    help_text = build_parser().format_help()
    assert "sweep" in help_text
