"""``demo --repeats K``: K runs of every arm, named as ``sweep`` names them and found by nnU-Net's lookup."""

from __future__ import annotations

import subprocess
import sys

from nnunet_selfreg.tools.demo import runs_of


def test_runs_of_every_arm_are_sweep_names_in_compare_order():
    got = runs_of(["nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_SCROnly_Budget"], 3)
    assert got == [
        "nnUNetTrainer_Budget",
        "nnUNetTrainer_Budget_Rep2",
        "nnUNetTrainer_Budget_Rep3",
        "nnUNetTrainerSelfReg_SCROnly_Budget",
        "nnUNetTrainerSelfReg_SCROnly_Budget_Rep2",
        "nnUNetTrainerSelfReg_SCROnly_Budget_Rep3",
    ]
    assert runs_of(["a", "b"], 1) == ["a", "b"]


def test_repeated_runs_resolve_through_nnunets_lookup_and_train_like_their_arm():
    """In a fresh interpreter, as ``nnUNetv2_train`` finds them: each run subclasses its arm's trainer only by name."""
    code = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "from nnunet_selfreg.tools.demo import runs_of\n"
        "for name in runs_of(['nnUNetTrainer_Budget', 'nnUNetTrainerSelfReg_SCROnly_Budget'], 3):\n"
        "    cls = find(name)\n"
        "    arm = name.split('_Rep')[0]\n"
        "    assert cls.__name__ == name, (cls, name)\n"
        "    assert cls is find(arm) if name == arm else cls.__mro__[1] is find(arm), (cls.__mro__, arm)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-2000:]
