"""Shared fixtures: one temporary nnU-Net environment per test session, datasets preprocessed once."""

from __future__ import annotations

import shutil

import pytest

from tests.harness import NNUNetEnv

DS_2D = 901
DS_3D = 902
DS_SEMISUP_SOURCE = 903
DS_SEMISUP = 904


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


@pytest.fixture(scope="session")
def semisup2d(nnenv: NNUNetEnv, tmp_path_factory) -> int:
    """10 labelled + 6 unlabelled synthetic 64x64 cases (``scan00`` … ``scan05``), checked and preprocessed for 2d."""
    from nnunet_selfreg.data.semisupervised import build_semi_supervised_dataset
    from nnunet_selfreg.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("semisup")
    source = nnenv.make_dataset(DS_SEMISUP_SOURCE, dim=2, num_cases=10, seed=5)
    extra = make_synthetic_dataset(tmp / "gen", 1, dim=2, num_cases=6, seed=6)
    unlabeled = tmp / "unlabeled"
    unlabeled.mkdir()
    for i, image in enumerate(sorted((extra / "imagesTr").glob("*.png"))):
        shutil.copy(image, unlabeled / f"scan{i:02d}_0000.png")
    build_semi_supervised_dataset(source, unlabeled, nnenv.raw, DS_SEMISUP)
    nnenv.plan_and_preprocess(DS_SEMISUP, ("2d",), "--verify_dataset_integrity")
    return DS_SEMISUP


@pytest.fixture
def nnunet_paths(nnenv: NNUNetEnv, monkeypatch) -> NNUNetEnv:
    """Point this (in-process) test's nnU-Net paths at the session environment."""
    monkeypatch.setenv("nnUNet_raw", str(nnenv.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(nnenv.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(nnenv.results))
    monkeypatch.setenv("nnUNet_def_n_proc", "2")
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    return nnenv
