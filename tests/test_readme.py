"""The README's code as a user runs it, and the package's top level that it imports from.

Every ``python`` code block of README.md is executed as written; each nnU-Net trainer it defines is
built on the tests' preprocessed 2d dataset and initialised (network, loss, the hyper-parameters'
checks), so a missing import or a wrong attribute in the README fails here. The CPU quick start
(a ``bash`` block) runs as written in a fresh folder (``cli_e2e``: it trains two models).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_selfreg
from nnunet_selfreg import trainers
from tests.harness import BIN

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_importing_the_package_stays_light():
    """The .pth start-up hook imports the package in every Python process: no torch, no nnU-Net there."""
    code = "import sys, nnunet_selfreg; print(sorted(m for m in ('torch', 'nnunetv2', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_trainers_a_user_subclasses_are_at_the_top_level():
    from nnunet_selfreg import SelfRegMixin, nnUNetTrainerM2SNet, nnUNetTrainerSelfReg, nnUNetTrainerSSNet

    assert nnUNetTrainerSelfReg is trainers.nnUNetTrainerSelfReg and issubclass(nnUNetTrainerSelfReg, SelfRegMixin)
    assert (nnUNetTrainerSSNet, nnUNetTrainerM2SNet) == (trainers.nnUNetTrainerSSNet, trainers.nnUNetTrainerM2SNet)
    for name in trainers.__all__:  # every trainer and variant nnU-Net finds, e.g. nnUNetTrainerSelfReg_5epochs
        assert getattr(nnunet_selfreg, name) is getattr(trainers, name), name
    with pytest.raises(AttributeError, match="has no trainer 'nnUNetTrainerSelfRegg'"):
        nnunet_selfreg.nnUNetTrainerSelfRegg  # noqa: B018
    with pytest.raises(ImportError):
        from nnunet_selfreg import torch  # noqa: F401  (only trainers and the names of the docs)


def test_every_readme_python_block_runs_as_written(nnunet_paths, ds2d, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))  # the trainers create their output folders
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    pre = next(nnunet_paths.preprocessed.glob(f"Dataset{ds2d:03d}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    built = []
    for i, block in enumerate(blocks):
        namespace: dict = {"__name__": f"readme_block_{i}"}
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        defined = [
            v
            for v in namespace.values()
            if isinstance(v, type) and issubclass(v, nnUNetTrainer) and v.__module__ == namespace["__name__"]
        ]
        for cls in defined:
            trainer = cls(plans | {"continue_training": False}, "2d", 0, dataset_json, torch.device("cpu"))
            trainer.initialize()  # builds the network and the loss, checks the hyper-parameters
            assert trainer.was_initialized
            built.append(trainer)
    assert built, "the README defines no trainer"
    selfreg = [t for t in built if hasattr(t, "selfreg_term_weights")]
    assert selfreg and all(all(w > 0 for w in t.selfreg_term_weights().values()) for t in selfreg)


def readme_section_bash(title: str) -> str:
    section = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.cli_e2e
def test_the_cpu_quick_start_runs_as_written(tmp_path):
    block = readme_section_bash("First steps on a CPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_SELFREG_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    root = tmp_path / "first_steps"
    results = root / "nnUNet_results" / "Dataset901_SelfRegSynthetic"
    for trainer in ("nnUNetTrainerSelfReg_Budget", "nnUNetTrainer_Budget"):
        fold = results / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["current_epoch"] == 2 and checkpoint["trainer_name"] == trainer
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    assert len(list((root / "predictions").glob("case_*.png"))) == 10
