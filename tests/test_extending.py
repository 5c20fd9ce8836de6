"""docs/extending.md's example method, taken from the page itself and trained through ``nnUNetv2_train``.

The page's ``# file: NAME`` code blocks are written into a folder listed in ``nnUNet_extTrainer`` (as a
user would save them), so the documented code cannot rot: the ``_Budget`` variant that
``register_trainer`` / ``define_trainers`` create must be found by nnU-Net's own lookup, train one epoch
of 3 iterations on the tests' 2d dataset, and leave its term's epoch mean in the training log and in
the checkpoint's logger. The registry's refusals are checked in-process.
"""

from __future__ import annotations

import math
import re
import types
from pathlib import Path

import pytest
import torch

from nnunet_selfreg.trainers import core

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
TRAINER = "nnUNetTrainerDecorr_Budget"


def doc_files() -> dict[str, str]:
    """``{file name: code}`` of the page's python blocks that start with ``# file: NAME``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    files = {}
    for block in blocks:
        first, _, rest = block.partition("\n")
        m = re.fullmatch(r"# file: (\w+\.py)", first.strip())
        if m:
            files[m.group(1)] = rest
    return files


def test_the_pages_method_trains_through_the_cli(nnenv, ds2d, tmp_path):
    files = doc_files()
    assert set(files) == {"decorr_loss.py", "decorr_trainer.py"}
    ext = tmp_path / "my_trainers"
    ext.mkdir()
    for name, code in files.items():
        (ext / name).write_text(code)

    nnenv.train(
        ds2d, "2d", 0, TRAINER,
        nnUNet_extTrainer=str(ext),  # the package's .pth adds its own shim beside it
        NNUNET_SELFREG_BUDGET_EPOCHS="1", NNUNET_SELFREG_BUDGET_ITERATIONS="3",
        NNUNET_SELFREG_BUDGET_VAL_ITERATIONS="1",
    )  # fmt: skip
    fold = nnenv.model_folder(ds2d, TRAINER, "2d") / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    lines = [ln for ln in log.splitlines() if "Decorr epoch means: decorr " in ln]
    assert len(lines) == 1 and lines[0].rstrip().endswith("(3 steps)"), lines
    logged = float(re.search(r"decorr (\S+) \(", lines[0]).group(1))
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 1
    (value,) = ckpt["logging"]["decorr"]
    # a mean of squared correlations lies in [0, 1]; a term never computed would be NaN or missing
    assert math.isfinite(value) and 0.0 < value <= 1.0 and value == pytest.approx(logged, abs=1e-6)


def test_the_pages_loss_by_hand():
    namespace: dict = {}
    exec(compile(doc_files()["decorr_loss.py"], "decorr_loss.py", "exec"), namespace)
    decorrelation = namespace["channel_decorrelation"]
    a = torch.tensor([1.0, -1.0, 2.0, 0.5])
    b = torch.tensor([1.0, 1.0, -1.0, 3.0])
    b = b - b.mean() - ((b - b.mean()) @ (a - a.mean())) / (a - a.mean()).square().sum() * (a - a.mean())
    same = torch.stack([a, 2 * a + 1]).reshape(1, 2, 2, 2)  # correlation 1: (1 + 1) / (2 · 1)
    assert decorrelation(same).item() == pytest.approx(1.0, abs=1e-5)
    orthogonal = torch.stack([a, b]).reshape(1, 2, 2, 2)  # centred channels orthogonal: correlation 0
    assert decorrelation(orthogonal).item() == pytest.approx(0.0, abs=1e-6)
    opposite = torch.stack([a, -a, a]).reshape(1, 3, 4)  # every pair ±1: 6 · 1 / (3 · 2)
    assert decorrelation(opposite).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="C >= 2"):
        decorrelation(torch.ones(1, 1, 4))


def test_registry_refusals(monkeypatch):
    monkeypatch.setattr(core, "_REGISTRY", {})  # a registry of this test's own
    monkeypatch.setattr(core, "_DEFINED", set())
    # two different trainers under one name: nnU-Net would pick one of them silently
    first = types.new_class("nnUNetTrainerClash")
    second = types.new_class("nnUNetTrainerClash")
    first.__module__, second.__module__ = "one_module", "another_module"
    core.register_trainer(first, epochs=False, budget=False)
    with pytest.raises(ValueError, match="two trainers are registered as nnUNetTrainerClash"):
        core.register_trainer(second)
    # the same module imported again (nnU-Net re-imports nnUNet_extTrainer modules) replaces it
    again = types.new_class("nnUNetTrainerClash")
    again.__module__ = "one_module"
    assert core.register_trainer(again, epochs=False, budget=False) is again
    namespace = {"__name__": "one_module"}
    assert core.define_trainers(namespace) == ["nnUNetTrainerClash"] and namespace["nnUNetTrainerClash"] is again
    assert core.define_trainers(namespace) == []  # defined once
    # a module of the package must leave the definitions to nnunet_selfreg.trainers
    with pytest.raises(RuntimeError, match="remove the define_trainers"):
        core.define_trainers({"__name__": "nnunet_selfreg.trainers.mymethod"})
    # the cost benchmark's marks are the two it knows
    with pytest.raises(ValueError, match="timed must be None or one of"):
        core.register_trainer(types.new_class("nnUNetTrainerTimed"), timed="sometimes")


def test_taps_attach_and_detach_through_one_function_each():
    calls = []
    with_taps = types.SimpleNamespace(
        attach_feature_taps=lambda: calls.append("attach"), detach_feature_taps=lambda: calls.append("detach")
    )
    core.attach_feature_taps(with_taps)
    core.detach_feature_taps(with_taps)
    core.attach_feature_taps(types.SimpleNamespace())  # a trainer without taps: nothing to do
    core.detach_feature_taps(types.SimpleNamespace())
    assert calls == ["attach", "detach"]
