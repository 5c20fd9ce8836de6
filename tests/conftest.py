"""Shared fixtures: one temporary nnU-Net environment per test session, datasets preprocessed once."""

from __future__ import annotations

import pytest

from tests.harness import NNUNetEnv

DS_2D = 901
DS_3D = 902


@pytest.fixture(scope="session")
def nnenv(tmp_path_factory) -> NNUNetEnv:
    return NNUNetEnv(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def ds2d(nnenv: NNUNetEnv) -> int:
    """10 synthetic 64x64 cases, planned and preprocessed for 2d by the real nnU-Net CLI."""
    nnenv.make_dataset(DS_2D, dim=2, num_cases=10, seed=1)
    nnenv.plan_and_preprocess(DS_2D, ("2d",))
    return DS_2D


@pytest.fixture(scope="session")
def ds3d(nnenv: NNUNetEnv) -> int:
    """8 synthetic anisotropic 3D cases (spacing 2.5 x 1 x 1), preprocessed for 3d_fullres."""
    nnenv.make_dataset(DS_3D, dim=3, num_cases=8, shape=(16, 40, 40), spacing=(2.5, 1.0, 1.0), seed=2)
    nnenv.plan_and_preprocess(DS_3D, ("3d_fullres",))
    return DS_3D


@pytest.fixture
def nnunet_paths(nnenv: NNUNetEnv, monkeypatch) -> NNUNetEnv:
    """Point this (in-process) test's nnU-Net paths at the session environment."""
    monkeypatch.setenv("nnUNet_raw", str(nnenv.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(nnenv.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(nnenv.results))
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    return nnenv
