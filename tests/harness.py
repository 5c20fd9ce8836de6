"""End-to-end test harness: real nnU-Net CLIs on small generated datasets, in temporary folders.

Every CLI runs in a subprocess with its own ``nnUNet_raw/_preprocessed/_results`` and with
``nnUNet_extTrainer`` listing only ``tests/ext_trainers`` (the "user's own folder"): our package's
``.pth`` start-up hook must add its own shim beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nnunet_selfreg.data.synthetic import make_synthetic_dataset

TESTS_DIR = Path(__file__).resolve().parent
TEST_EXT_TRAINERS = TESTS_DIR / "ext_trainers"
BIN = Path(sys.executable).parent


def verify_with_nnunet(folder: Path, timeout: float = 600) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` on a raw dataset folder, in a fresh interpreter.

    nnU-Net lists a dataset's images through a ``fork`` Pool, whose workers twice hung in a benchmark
    (docs/performance.md). Forked from the test process (torch loaded and used, its threads running)
    they would inherit far more state, so the check runs where ``nnUNetv2_plan_and_preprocess
    --verify_dataset_integrity`` runs it, first thing in a new process.
    """
    code = (
        "import sys\n"
        "from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
        "verify_dataset_integrity(sys.argv[1], num_processes=1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"nnU-Net's dataset check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def small_2d_plans(preprocessed_dataset: Path, shrink: bool = True) -> tuple[dict, dict]:
    """(plans, dataset.json) of a preprocessed dataset with 32x32 patches for in-process trainers.

    ``shrink`` also narrows the network to 4 stages with 4..16 channels (fast on a CPU).
    """
    plans = json.loads((preprocessed_dataset / "nnUNetPlans.json").read_text()) | {"continue_training": False}
    config = plans["configurations"]["2d"]
    config["patch_size"] = [32, 32]
    if shrink:
        kw = config["architecture"]["arch_kwargs"]
        kw.update(n_stages=4, features_per_stage=[4, 8, 16, 16], n_conv_per_stage_decoder=[1, 1, 1])
        for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
            kw[key] = kw[key][:4]
    return plans, json.loads((preprocessed_dataset / "dataset.json").read_text())


class NNUNetEnv:
    """nnU-Net folders under ``root`` and a runner for nnU-Net's console scripts."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.raw = self.root / "nnUNet_raw"
        self.preprocessed = self.root / "nnUNet_preprocessed"
        self.results = self.root / "nnUNet_results"
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
        env.update(
            nnUNet_raw=str(self.raw),
            nnUNet_preprocessed=str(self.preprocessed),
            nnUNet_results=str(self.results),
            nnUNet_extTrainer=str(TEST_EXT_TRAINERS),
            nnUNet_def_n_proc="2",
            nnUNet_n_proc_DA="2",
            OMP_NUM_THREADS="2",
            OMP_WAIT_POLICY="PASSIVE",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout: float = 900, check: bool = True, **extra_env: str):
        exe = shutil.which(cmd[0], path=str(BIN)) or cmd[0]
        proc = subprocess.run(
            [exe, *cmd[1:]], env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}\n--- stdout (tail)\n"
                f"{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}"
            )
        return proc

    def make_dataset(self, dataset_id: int, dim: int, **kwargs) -> Path:
        return make_synthetic_dataset(self.raw, dataset_id, dim=dim, **kwargs)

    def plan_and_preprocess(self, dataset_id: int, configurations: tuple[str, ...], *extra: str) -> None:
        self.run(
            "nnUNetv2_plan_and_preprocess",
            "-d",
            str(dataset_id),
            "-c",
            *configurations,
            "-np",
            *(["2"] * len(configurations)),
            "-npfp",
            "2",
            *extra,
        )

    def train(
        self, dataset_id: int, configuration: str, fold: int, trainer: str, *extra: str, check: bool = True, **env: str
    ):
        return self.run(
            "nnUNetv2_train",
            str(dataset_id),
            configuration,
            str(fold),
            "-tr",
            trainer,
            "-device",
            "cpu",
            *extra,
            check=check,
            **env,
        )

    def predict(self, inputs: Path, output: Path, dataset_id: int, configuration: str, trainer: str, *folds: int):
        """``nnUNetv2_predict`` on CPU with one preprocessing and one export process."""
        return self.run(
            "nnUNetv2_predict", "-i", str(inputs), "-o", str(output), "-d", str(dataset_id), "-c", configuration,
            "-f", *map(str, folds or (0,)), "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
        )  # fmt: skip

    def model_folder(self, dataset_id: int, trainer: str, configuration: str, plans: str = "nnUNetPlans") -> Path:
        matches = sorted(self.results.glob(f"Dataset{dataset_id:03d}_*"))
        assert matches, f"no results for dataset {dataset_id} in {self.results}"
        return matches[0] / f"{trainer}__{plans}__{configuration}"
