"""``demo --repeats``: the baseline's repeated runs are real, registered nnU-Net trainers."""

from __future__ import annotations

import pytest

from nnunet_selfreg import trainers as ours
from nnunet_selfreg.tools.demo import with_repeats
from nnunet_selfreg.tools.main import UserError


def test_repeats_follow_the_baseline_and_exist_for_nnunet():
    got = with_repeats(["nnUNetTrainer_Budget", "nnUNetTrainerSelfReg_Budget"], 3)
    assert got == [
        "nnUNetTrainer_Budget",
        "nnUNetTrainer_Rep2_Budget",
        "nnUNetTrainer_Rep3_Budget",
        "nnUNetTrainerSelfReg_Budget",
    ]
    for name in got:
        cls = getattr(ours, name)
        assert name in ours.__all__ and cls.__name__ == name  # exported to nnU-Net's trainer lookup
    # a repeat trains exactly like its original: nothing but the name differs
    rep = ours.nnUNetTrainer_Rep2_Budget
    assert rep.__mro__[1] is ours.nnUNetTrainer_Rep2 and rep.__mro__[2].__name__ == "nnUNetTrainer"
    assert with_repeats(["nnUNetTrainer_Budget", "x"], 1) == ["nnUNetTrainer_Budget", "x"]


@pytest.mark.parametrize(
    ("trainers", "repeats", "match"),
    [
        (["nnUNetTrainerSelfReg_IFDOnly_Budget", "x"], 2, "no repeat variants"),
        (["nnUNetTrainer_Budget", "x"], 9, "between 1 and 3"),
    ],
)
def test_bad_repeats_say_what_to_use(trainers, repeats, match):
    with pytest.raises(UserError, match=match):
        with_repeats(trainers, repeats)
