"""Variant names answered on demand (``X_Rep2``, ``X_5epochs``, ``X_Budget``) for any trainer, a user's own included.

The lookups run in fresh interpreters through nnU-Net's own ``recursive_find_trainer_class_by_name``,
with only a user's temporary folder in ``nnUNet_extTrainer`` (our start-up hook appends our shim); one
on-demand name of the user's trainer is trained with ``nnUNetv2_train`` and predicted with
``nnUNetv2_predict``, which find it by the name stored in the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_selfreg.trainers.on_demand import VariantName, parse_variant_name

USER_TRAINERS = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class MyUserTrainer(nnUNetTrainer):
    """A user's own trainer: tiny budget, and a marker attribute the variants must inherit."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.user_marker = "mine"
'''

PROBE = """
import contextlib, inspect, io, json, pickle, sys
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find

out = {}
for name in sys.argv[1:]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cls = find(name)
    except RuntimeError:
        out[name] = None
        continue
    out[name] = {
        "name": cls.__name__,
        "module": cls.__module__,
        "mro": [c.__name__ for c in cls.__mro__[:4]],
        "pickles": pickle.loads(pickle.dumps(cls)) is cls,
        "signature": list(inspect.signature(cls.__init__).parameters)
        == list(inspect.signature(nnUNetTrainer.__init__).parameters),
    }
import nnunet_selfreg.trainers.on_demand as on_demand
out["hasattr"] = {n: hasattr(on_demand, n) for n in ("Foo_Rep2", "nnUNetTrainer_Rep1", "x", "__wrapped__")}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X_Rep2", VariantName("X", "repeat", 2)),
        ("nnUNetTrainerSelfReg_100epochs_Rep12", VariantName("nnUNetTrainerSelfReg_100epochs", "repeat", 12)),
        ("nnUNetTrainer_Rep2_100epochs", VariantName("nnUNetTrainer_Rep2", "epochs", 100)),
        ("MyTrainer_1epoch", VariantName("MyTrainer", "epochs", 1)),
        ("MyTrainer_Rep3_Budget", VariantName("MyTrainer_Rep3", "budget")),
        ("X_Rep1", None),  # run 1 is X itself
        ("X_Rep02", None),
        ("X_7epochs", None),  # not one of nnU-Net's lengths
        ("X_1epochs", None),
        ("_Rep2", None),
        ("nnUNetTrainer", None),
    ],
)
def test_variant_names_parse_from_the_last_suffix(name, expected):
    assert parse_variant_name(name) == expected


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "my_ext_trainers"
    folder.mkdir()
    (folder / "my_trainers.py").write_text(USER_TRAINERS)
    return folder


def test_nnunet_lookup_answers_variants_of_a_users_trainer(nnenv, user_folder):
    names = [
        "MyUserTrainer_Rep2",
        "MyUserTrainer_5epochs",
        "MyUserTrainer_Budget",
        "nnUNetTrainer_Rep2_100epochs",
        "nnUNetTrainerSelfReg_100epochs_Rep2",
        "MyUserTrainer_Rep1",
        "NoSuchTrainer_Rep2",
    ]
    proc = nnenv.run("python", "-c", PROBE, *names, nnUNet_extTrainer=str(user_folder))
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["MyUserTrainer_Rep2"]["mro"][:3] == ["MyUserTrainer_Rep2", "MyUserTrainer", "nnUNetTrainer"]
    assert out["MyUserTrainer_5epochs"]["mro"][:2] == ["MyUserTrainer_5epochs", "MyUserTrainer"]
    assert out["MyUserTrainer_Budget"]["mro"][:2] == ["MyUserTrainer_Budget", "MyUserTrainer"]
    assert out["nnUNetTrainer_Rep2_100epochs"]["mro"][:3] == [
        "nnUNetTrainer_Rep2_100epochs",
        "nnUNetTrainer_Rep2",
        "nnUNetTrainer",
    ]
    assert out["nnUNetTrainerSelfReg_100epochs_Rep2"]["mro"][1] == "nnUNetTrainerSelfReg_100epochs"
    for name in names[:5]:
        info = out[name]
        assert info["name"] == name and info["module"] == "nnunet_selfreg.trainers.on_demand"
        assert info["pickles"] and info["signature"]  # checkpoints, DDP and nnU-Net's re-instantiation
    assert out["MyUserTrainer_Rep1"] is None and out["NoSuchTrainer_Rep2"] is None  # nnU-Net's own error
    assert out["hasattr"] == {"Foo_Rep2": False, "nnUNetTrainer_Rep1": False, "x": False, "__wrapped__": False}


@pytest.mark.cli_e2e  # 70 s at load 6 (2026-12-05)
def test_on_demand_variant_trains_and_predicts_through_nnunet_clis(nnenv, ds2d, user_folder, tmp_path):
    """``nnUNetv2_train -tr MyUserTrainer_Rep2``, then ``nnUNetv2_predict`` finds it again by name."""
    env = {"nnUNet_extTrainer": str(user_folder)}
    nnenv.train(ds2d, "2d", 0, "MyUserTrainer_Rep2", **env)
    fold = nnenv.model_folder(ds2d, "MyUserTrainer_Rep2", "2d") / "fold_0"
    assert (fold / "validation" / "summary.json").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "MyUserTrainer_Rep2" and ckpt["current_epoch"] == 1  # the user's budget
    debug = json.loads((fold / "debug.json").read_text())
    assert debug["user_marker"] == "mine"  # the user's __init__ ran
    images = sorted((nnenv.raw / fold.parents[1].name / "imagesTr").iterdir())[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).symlink_to(image)
    out = tmp_path / "pred"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(ds2d),
         "-c", "2d", "-f", "0", "-tr", "MyUserTrainer_Rep2", "-device", "cpu", "-npp", "1", "-nps", "1"],
        env=nnenv.env(**env), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 2
