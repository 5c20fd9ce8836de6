"""``nnunet-selfreg sweep`` end to end: a real one-node SLURM cluster and local workers (marker ``slurm``).

Bring the cluster up with ``.ci/slurm_cluster.sh up`` (as root); ``.ci/run`` does, and sets
``NNUNET_SELFREG_REQUIRE_SLURM=1`` so that a missing cluster fails these tests instead of skipping them.
Every training is real nnU-Net on 10 synthetic 64x64 cases with budgets of a few epochs x iterations.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import BIN, NNUNetEnv

pytestmark = pytest.mark.slurm

DATASET = 905
REQUIRE = os.environ.get("NNUNET_SELFREG_REQUIRE_SLURM", "0") not in ("", "0") or os.environ.get("CI") == "true"
SLURM = ("--executor", "slurm", "--cpus-per-job", "1", "--time", "30")
JOB_ENV = {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (apt-get install slurm-client slurmctld slurmd munge)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no SLURM node is up (sinfo: {states}); run .ci/slurm_cluster.sh up"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _cluster_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"the SLURM tests must run here (NNUNET_SELFREG_REQUIRE_SLURM/CI): {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> NNUNetEnv:
    nnenv = NNUNetEnv(tmp_path_factory.mktemp("sweep"))
    nnenv.make_dataset(DATASET, dim=2, num_cases=10, seed=7)
    nnenv.plan_and_preprocess(DATASET, ("2d",))
    return nnenv


def _sweep(env: NNUNetEnv, *args: str, check: bool = True, timeout: float = 1500, **extra: str):
    return env.run("nnunet-selfreg", "sweep", *args, check=check, timeout=timeout, **JOB_ENV, **extra)


def _manifest(env: NNUNetEnv, name: str) -> dict:
    (path,) = env.results.glob(f"Dataset{DATASET:03d}_*/sweeps/{name}/manifest.json")
    return json.loads(path.read_text())


def _fold(env: NNUNetEnv, output_folder: str) -> Path:
    return env.results / output_folder


def _until(what: str, condition, timeout: float = 300, every: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _logs(fold: Path) -> list[str]:
    return [p.read_text() for p in sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)]


def _epochs(log: str) -> list[int]:
    return [int(m) for m in re.findall(r": Epoch (\d+)\s*$", log, re.M)]


def _squeue_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True).stdout
    return next((line.split("|")[1] for line in out.splitlines() if line.split("|")[0] == job_id), None)


def _release(job_id: str) -> None:
    """Start a requeued job now (SLURM holds requeued jobs back ~2 minutes with a BeginTime)."""
    _until(f"{job_id} pending again", lambda: _squeue_state(job_id) == "PENDING", timeout=120)

    def started() -> bool:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        return _squeue_state(job_id) in ("RUNNING", "COMPLETING", None)

    _until(f"{job_id} to start again", started, timeout=120, every=1)


def _stop_message(log: str, signame: str) -> int:
    m = re.search(rf"{signame} received; checkpoint_latest.pth saved .*continues in epoch (\d+)", log)
    assert m, f"no {signame} checkpoint message in the log:\n{log[-2000:]}"
    return int(m.group(1))


def test_grid_on_slurm_ends_with_every_nnunet_file_and_the_same_command_starts_nothing(slurm, env):
    args = ["-d", str(DATASET), "-c", "2d", "-tr", "nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_Budget"]
    args += ["-f", "0", "1", "--repeats", "2", "--device", "cpu", *SLURM, "--name", "grid", "--wait", "--poll", "2"]
    budget = {"NNUNET_SELFREG_BUDGET_EPOCHS": "2", "NNUNET_SELFREG_BUDGET_ITERATIONS": "2"}
    budget["NNUNET_SELFREG_BUDGET_VAL_ITERATIONS"] = "1"
    proc = _sweep(env, *args, **budget)
    assert "8 to run (slurm)" in proc.stdout and "8 done (of 8)" in proc.stdout
    data = _manifest(env, "grid")
    assert len(data["jobs"]) == 8
    trainers = {j["trainer"] for j in data["jobs"].values()}
    assert trainers == {"nnUNetTrainer_Budget", "nnUNetTrainer_Budget_Rep2", "nnUNetTrainerSelfReg_Budget",
                        "nnUNetTrainerSelfReg_Budget_Rep2"}  # fmt: skip
    for job in data["jobs"].values():
        assert job["state"] == "done" and job["attempts"] == 1 and job["slurm_job_id"]
        assert job["history"][0]["outcome"] == "done" and job["history"][0]["overhead_s"] < 5
        fold = _fold(env, job["output_folder"])
        for name in ("checkpoint_final.pth", "validation/summary.json", "progress.png", "debug.json"):
            assert (fold / name).is_file(), f"{fold / name} is missing"
        assert not (fold / "checkpoint_latest.pth").exists()  # nnU-Net removes it at the end, as always
        assert "Epoch 1" in _logs(fold)[-1]
    submissions = sorted(p.name for p in (Path(env.results) / data["dataset"] / "sweeps/grid/slurm").glob("*.sh"))

    again = _sweep(env, *args, "--compare", **budget)
    assert "0 to run (slurm)" in again.stdout and again.stdout.count("done, skipped") == 8
    assert sorted(p.name for p in (env.results / data["dataset"] / "sweeps/grid/slurm").glob("*.sh")) == submissions
    data = _manifest(env, "grid")
    assert len(data["invocations"]) == 2 and all(j["attempts"] == 1 for j in data["jobs"].values())
    report = json.loads((env.results / data["dataset"] / "sweeps/grid/compare_2d/results.json").read_text())
    assert [m["name"] for m in report["setup"]["models"]] == [
        "nnUNetTrainer_Budget",
        "nnUNetTrainer_Budget_Rep2",
        "nnUNetTrainerSelfReg_Budget",
        "nnUNetTrainerSelfReg_Budget_Rep2",
    ]
    status = env.run("nnunet-selfreg", "sweep", "status", "grid")
    assert "8 done (of 8)" in status.stdout


def test_preempted_job_is_requeued_and_continues_in_the_epoch_it_was_stopped_in(slurm, env):
    """The warning signal (USR2, what SLURM sends before a time limit), then ``scontrol requeue`` (SIGTERM)."""
    budget = {"NNUNET_SELFREG_BUDGET_EPOCHS": "5", "NNUNET_SELFREG_BUDGET_ITERATIONS": "12"}
    budget["NNUNET_SELFREG_BUDGET_VAL_ITERATIONS"] = "1"
    args = ["-d", str(DATASET), "-c", "2d", "-tr", "nnUNetTrainer_Budget", "-f", "2", "--device", "cpu", *SLURM]
    _sweep(env, *args, "--name", "preempt", **budget)
    (job,) = _manifest(env, "preempt")["jobs"].values()
    job_id, fold = job["slurm_job_id"], _fold(env, job["output_folder"])

    _until("epoch 1 of the first run", lambda: len(_logs(fold)) == 1 and 1 in _epochs(_logs(fold)[0]))
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _release(job_id)
    first = _logs(fold)[0]
    stopped_1 = _stop_message(first, "SIGUSR2")
    assert stopped_1 >= 1  # not epoch 0 (and nnU-Net's own checkpoint_latest comes every 50 epochs)

    _until(
        "a later epoch of the second run",
        lambda: len(_logs(fold)) == 2 and _epochs(_logs(fold)[1])[-1:] == [stopped_1 + 1],
    )
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _release(job_id)
    status = env.run("nnunet-selfreg", "sweep", "status", "preempt", "--wait", "--poll", "2", timeout=900)
    assert "1 done (of 1)" in status.stdout

    logs = _logs(fold)
    assert len(logs) == 3 and (fold / "checkpoint_final.pth").is_file() and (fold / "validation/summary.json").is_file()
    assert _stop_message(logs[0], "SIGUSR2") == stopped_1
    assert f"continuing from the checkpoint at epoch {stopped_1}" in logs[1] and _epochs(logs[1])[0] == stopped_1
    stopped_2 = _stop_message(logs[1], "SIGTERM")
    assert stopped_2 > stopped_1
    assert f"continuing from the checkpoint at epoch {stopped_2}" in logs[2] and _epochs(logs[2])[0] == stopped_2
    assert _epochs(logs[2])[-1] == 4
    history = _manifest(env, "preempt")["jobs"][job["output_folder"].split("/", 1)[1]]["history"]
    assert [h["outcome"] for h in history] == ["queued", "interrupted", "done"]  # requeued by itself, by SLURM
    assert [h.get("resumed_from_epoch") for h in history] == [None, stopped_1, stopped_2]
    assert [h["slurm_restart_count"] for h in history] == [0, 1, 2]


def test_failed_job_is_reported_and_the_others_finish(slurm, env):
    args = ["-d", str(DATASET), "-c", "2d", "-tr", "nnUNetTrainerTiny", "nnUNetTrainerSweepFails", "-f", "0"]
    args += ["--device", "cpu", *SLURM, "--name", "fails"]
    tiny = {"SELFREG_TEST_EPOCHS": "2", "SELFREG_TEST_ITERS": "2"}
    proc = _sweep(env, *args, "--wait", "--poll", "2", check=False, **tiny)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 done, 1 failed (of 2)" in proc.stdout
    assert "nnUNetTrainerSweepFails fold 0 FAILED" in proc.stdout and "fails on purpose" in proc.stdout
    jobs = {j["trainer"]: j for j in _manifest(env, "fails")["jobs"].values()}
    assert jobs["nnUNetTrainerTiny"]["state"] == "done" and jobs["nnUNetTrainerSweepFails"]["state"] == "failed"
    assert "fails on purpose" in jobs["nnUNetTrainerSweepFails"]["error"]
    status = env.run("nnunet-selfreg", "sweep", "status", "fails", check=False)
    assert status.returncode == 1 and "failed" in status.stdout and "fails on purpose" in status.stdout
    again = _sweep(env, *args, check=False, **tiny)
    assert again.returncode == 1 and "failed before: pass --retry" in again.stdout and "0 to run" in again.stdout


def test_local_workers_stop_on_ctrl_c_and_the_same_command_continues(env):
    args = ["-d", str(DATASET), "-c", "2d", "-tr", "nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_Budget", "-f", "3"]
    args += ["--device", "cpu", "--workers", "2", "--name", "local", "--save-every", "2"]
    budget = {"NNUNET_SELFREG_BUDGET_EPOCHS": "4", "NNUNET_SELFREG_BUDGET_ITERATIONS": "12"}
    budget["NNUNET_SELFREG_BUDGET_VAL_ITERATIONS"] = "1"
    sweep = subprocess.Popen(
        [str(BIN / "nnunet-selfreg"), "sweep", *args],
        env=env.env(**JOB_ENV, **budget),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a test run started in the background by a shell without job control inherits an ignored SIGINT,
        # which Python then keeps ignoring: give the sweep the disposition of a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in sweep.stdout:
        lines.append(line)
        if sum(bool(re.search(r"fold 3: Epoch 1\s*$", x)) for x in lines) == 2:
            break
    sweep.send_signal(signal.SIGINT)  # what Ctrl-C sends to the sweep
    out = "".join(lines) + sweep.stdout.read()
    code = sweep.wait(timeout=300)
    assert code == 130, f"exit code {code}:\n{out[-4000:]}"
    assert "Ctrl-C: 2 running job(s) stop" in out and out.count("SIGINT received; checkpoint_latest.pth saved") == 2
    data = _manifest(env, "local")
    for job in data["jobs"].values():
        assert job["state"] == "interrupted"
        assert (_fold(env, job["output_folder"]) / "checkpoint_latest.pth").is_file()
        assert json.loads((_fold(env, job["output_folder"]) / "debug.json").read_text())["save_every"] == "2"
        pid = job["history"][-1]["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the job process is gone
    stopped = {t: int(m) for t, m in re.findall(r"(\w+) fold 3: nnunet-selfreg sweep: SIGINT .*epoch (\d+)", out)}

    again = _sweep(env, *args, **budget)
    assert again.stdout.count("fold 3: continuing\n") == 2 and "2 done (of 2)" in again.stdout
    for job in _manifest(env, "local")["jobs"].values():
        assert job["state"] == "done" and job["attempts"] == 2
        assert job["history"][-1]["resumed_from_epoch"] == stopped[job["trainer"]]
        logs = _logs(_fold(env, job["output_folder"]))
        assert _epochs(logs[-1])[0] == stopped[job["trainer"]] and _epochs(logs[-1])[-1] == 3
