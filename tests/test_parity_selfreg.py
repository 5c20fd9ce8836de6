"""Parity with the authors' SelfReg-UNet code: our regulariser against golden numbers of their ``KDloss``.

``tests/golden/selfreg_kdloss.json`` was produced by running the authors' own ``KDloss`` class
(ChongQingNoSubway/SelfReg-UNet, the commit and file named in the JSON) on a 5-level 2D U-Net feature
set: encoder maps ``e_2 … e_5``, decoder maps ``d_1 … d_3`` and the final map ``d_4`` (their U-Net does
not hand its first, full-resolution block ``e_1`` to the loss). The JSON holds the inputs' recipe, the
command, the reference's channel draws for SCR (recorded from ``random.sample``), each term, the
total and projections of the gradients. The reference code itself is not part of this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_selfreg.losses import SelfRegRegularizer, internal_feature_distillation_loss, semantic_consistency_loss

GOLDEN = json.loads((Path(__file__).parent / "golden" / "selfreg_kdloss.json").read_text())
ENCODER = ["e1", "e2", "e3", "e4", "e5"]
DECODER = ["d1", "d2", "d3", "d4"]
STUDENTS = ["e2", "e3", "e4", "e5", "d1", "d2", "d3"]  # our order of SCR pairs


def _draw(seed: int) -> dict[str, torch.Tensor]:
    """The recipe of the golden inputs: one numpy stream, maps drawn in the JSON's order."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in GOLDEN["shapes"].items():
        values = rng.standard_normal(tuple(shape), dtype=np.float32)
        out[name] = torch.from_numpy(values + np.float32(0.25) if seed == 20241203 else values)
    return out


FEATURES = _draw(20241203)
PROJECTIONS = _draw(7)


def _scr_indices() -> list[tuple[list[int], list[int]]]:
    return [(GOLDEN["scr_draws"][k]["idx_s"], GOLDEN["scr_draws"][k]["idx_t"]) for k in STUDENTS]


def test_ifd_per_map_matches_reference():
    for name, expected in GOLDEN["intra_fd"].items():
        assert internal_feature_distillation_loss(FEATURES[name]).item() == pytest.approx(expected, rel=1e-5), name


def test_scr_per_pair_matches_reference_with_its_channel_draws():
    for name, expected in GOLDEN["inter_fd"].items():
        draws = GOLDEN["scr_draws"][name]
        value = semantic_consistency_loss(FEATURES[name], FEATURES["d4"], indices=(draws["idx_s"], draws["idx_t"]))
        assert value.item() == pytest.approx(expected, rel=1e-5), name


def test_regulariser_total_and_gradients_match_reference():
    x = {k: v.clone().requires_grad_(True) for k, v in FEATURES.items()}
    out = SelfRegRegularizer()([x[k] for k in ENCODER], [x[k] for k in DECODER], scr_indices=_scr_indices())
    # the reference averages IFD over 4 encoder and 3 decoder maps and SCR over 7 pairs
    assert out["total"].item() == pytest.approx(GOLDEN["total"], rel=1e-5)
    out["total"].backward()
    for name, expected in GOLDEN["grads"].items():
        grad = x[name].grad
        assert grad is not None, name
        assert float((grad * PROJECTIONS[name]).sum()) == pytest.approx(expected["dot_proj"], rel=1e-4, abs=1e-7)
        assert float(grad.norm()) == pytest.approx(expected["l2"], rel=1e-5), name
    assert GOLDEN["teacher_grad_is_none"] and x["d4"].grad is None  # the teacher is detached on both sides
    assert x["e1"].grad is None  # e_1 is not a student, as in the reference


def test_tapping_e1_is_an_option_that_departs_from_reference():
    draws = [([0, 1, 2, 3, 4, 5], list(range(6))), *_scr_indices()]
    out = SelfRegRegularizer(include_first_encoder=True)(
        [FEATURES[k] for k in ENCODER], [FEATURES[k] for k in DECODER], scr_indices=draws
    )
    assert abs(out["total"].item() - GOLDEN["total"]) > 1e-3
