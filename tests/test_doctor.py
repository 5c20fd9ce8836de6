"""``nnunet-selfreg doctor`` when discovery breaks: the failing file is named, the fix fits the cause.

nnU-Net's own trainer lookup runs in a fresh interpreter (through the real ``nnunet-selfreg`` console
script) with a user's trainer folder listed in ``nnUNet_extTrainer``, as a user would have it.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnunet_selfreg import _discovery
from nnunet_selfreg.tools.doctor import check_registration

USER_TRAINER = """import torch
from nnunet_selfreg import nnUNetTrainerSelfReg
import a_package_that_is_not_installed


class nnUNetTrainerMine(nnUNetTrainerSelfReg):
    pass
"""


def _summary(stdout: str) -> list[str]:
    return [ln.strip()[2:] for ln in stdout.split("[summary]", 1)[1].splitlines() if ln.strip().startswith("- ")]


def test_doctor_names_a_users_trainer_file_that_fails_to_import(nnenv, tmp_path: Path):
    mine = tmp_path / "my_trainers"
    mine.mkdir()
    (mine / "a_fine_trainer.py").write_text("from nnunet_selfreg import nnUNetTrainerSelfReg as _Base\n")
    (mine / "my_trainer.py").write_text(USER_TRAINER)

    # the premise: nnU-Net's own lookup of our trainer fails with this folder listed before ours
    probe = (
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
        "f('nnUNetTrainerSelfReg')"
    )
    premise = nnenv.run("python", "-c", probe, check=False, nnUNet_extTrainer=str(mine))
    assert premise.returncode != 0 and "a_package_that_is_not_installed" in premise.stderr

    out = nnenv.run("nnunet-selfreg", "doctor", check=False, nnUNet_extTrainer=str(mine))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "nnU-Net finds nnUNetTrainerSelfReg: NO" in out.stdout
    assert f"our shim folder: {_discovery.EXT_TRAINER_DIR} (listed)" in out.stdout
    problems = _summary(out.stdout)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.startswith(f"{mine / 'my_trainer.py'} (line 3) fails to import (ModuleNotFoundError: ")
    assert "'a_package_that_is_not_installed'" in problem and f"move it out of {mine}" in problem
    assert "export nnUNet_extTrainer" not in out.stdout  # the wrong fix: our folder is listed

    # the file fixed: everything fine again
    (mine / "my_trainer.py").write_text(USER_TRAINER.replace("import a_package_that_is_not_installed\n", ""))
    out = nnenv.run("nnunet-selfreg", "doctor", nnUNet_extTrainer=str(mine))
    assert "nnU-Net finds nnUNetTrainerSelfReg: yes" in out.stdout and "everything looks fine" in out.stdout


def test_doctor_without_our_folder_gives_the_export_fix(nnenv, tmp_path: Path):
    out = nnenv.run(
        "nnunet-selfreg", "doctor", check=False, NNUNET_SELFREG_NO_AUTODISCOVERY="1", nnUNet_extTrainer=str(tmp_path)
    )
    assert out.returncode == 1
    assert "(NOT listed)" in out.stdout and "switched off by NNUNET_SELFREG_NO_AUTODISCOVERY" in out.stdout
    (problem,) = _summary(out.stdout)
    assert "Unset it, or run: export nnUNet_extTrainer=" in problem and _discovery.EXT_TRAINER_DIR in problem


def test_registration_check_reports_what_the_start_up_hook_hides(tmp_path: Path):
    """The .pth hook swallows exceptions; the check runs the same import and registration and shows them."""
    assert check_registration() is None  # the installed package registers
    broken = tmp_path / "shadow" / "nnunet_selfreg"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "_discovery.py").write_text("import os\nraise RuntimeError('a broken copy of the package')\n")
    env = dict(os.environ, PYTHONPATH=str(broken.parent))  # this copy comes first on sys.path
    error = check_registration(env)
    assert error == f"RuntimeError: a broken copy of the package ({broken / '_discovery.py'}:2)"
