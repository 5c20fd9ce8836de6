"""``nnunet-selfreg analyze`` end to end: two tiny trained 2D models, a 3D model, and bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnunet_selfreg._discovery import EXT_TRAINER_DIR
from nnunet_selfreg.analysis.analysis_report import METRICS
from nnunet_selfreg.data.synthetic import make_synthetic_dataset
from nnunet_selfreg.tools.main import main
from tests.harness import TEST_EXT_TRAINERS

TRAINERS = ("nnUNetTrainerTiny", "nnUNetTrainerSelfRegTiny")  # tests/ext_trainers: tiny budgets
DATASET_2D = "Dataset901_SelfRegSynthetic"
FIGURES = ("cka.png", "scr.png", "channel_correlation.png", "effective_rank.png", "gradcam.png")


pytestmark = pytest.mark.cli_e2e  # trains two small models first: 207 s in a full run at load 4-7 (2026-12-03)


@pytest.fixture(scope="module")
def models_2d(nnenv, ds2d, tmp_path_factory) -> list[Path]:
    """A baseline and a SelfReg model, 1 epoch x 2 iterations, in a results folder of their own."""
    results = tmp_path_factory.mktemp("analyze_results")

    def train(trainer: str) -> None:
        nnenv.train(
            ds2d, "2d", 0, trainer, SELFREG_TEST_EPOCHS="1", SELFREG_TEST_ITERS="2", nnUNet_results=str(results)
        )

    with ThreadPoolExecutor(2) as pool:  # two subprocesses at once: about 10 s less on a 2-core machine
        list(pool.map(train, TRAINERS))
    return [results / DATASET_2D / f"{t}__nnUNetPlans__2d" for t in TRAINERS]


@pytest.fixture
def env(nnunet_paths, monkeypatch, tmp_path):
    """In-process nnU-Net paths, the test trainers findable by name, and a fresh working directory."""
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(TEST_EXT_TRAINERS), EXT_TRAINER_DIR]))
    monkeypatch.chdir(tmp_path)
    return nnunet_paths


def analyze(*args: str | Path) -> int:
    return main(["analyze", *map(str, args), "--device", "cpu"])


def error_of(capsys, *args: str | Path) -> str:
    capsys.readouterr()
    assert analyze(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _check_results(folder: Path, n_models: int, spatial_dims: int) -> dict:
    for name in ("report.md", "results.json", *FIGURES):
        assert (folder / name).is_file(), name
    for name in FIGURES:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    r = json.loads((folder / "results.json").read_text())
    assert r["setup"]["spatial_dims"] == spatial_dims and len(r["models"]) == n_models
    for m in r["models"]:
        s = m["n_encoder_stages"]
        names = [st["stage"] for st in m["stages"]]
        assert names == [f"e_{i + 1}" for i in range(s)] + [f"d_{j + 1}" for j in range(s - 1)]
        for st in m["stages"]:
            for key in ("cka", "cka_shuffled", "mean_abs_correlation", "effective_rank", "cam_max"):
                assert isinstance(st[key], float) and math.isfinite(st[key]), (m["name"], st["stage"], key)
            assert 0.0 <= st["cka"] <= 1.0 + 1e-9 and 0.0 <= st["mean_abs_correlation"] <= 1.0
            assert 1.0 - 1e-9 <= st["effective_rank"] <= st["channels"] + 1e-6
            assert st["cam_max"] >= 0.0
        assert m["stages"][-1]["cka"] == pytest.approx(1.0) and m["stages"][-1]["scr"] is None
        assert all(math.isfinite(st["scr"]) and st["scr"] >= 0 for st in m["stages"][:-1])
    return r


def test_two_trained_2d_models(env, models_2d, capsys):
    cases = env.raw / DATASET_2D / "imagesTr"
    assert analyze(*models_2d, "-i", cases, "--num-cases", "3") == 0
    captured = capsys.readouterr()
    assert "[analyze] model 2/2 nnUNetTrainerSelfRegTiny" in captured.err and "case 3/3" in captured.err
    out = Path.cwd() / f"analysis_{DATASET_2D}_2d"  # default output folder
    r = _check_results(out, 2, 2)
    assert [m["name"] for m in r["models"]] == list(TRAINERS)
    assert r["setup"]["cases"] == ["case_000", "case_001", "case_002"]
    assert r["setup"]["gradcam"] == {"case": "case_000", "class": "ellipse", "channel": 1}
    report = (out / "report.md").read_text()
    for text in ("## Setup", "## Semantic consistency with F_final", "## Channel redundancy", "## Grad-CAM",
                 "## How to read this", "| `e_1` |", "(F_final)", *TRAINERS):  # fmt: skip
        assert text in report, text
    for _, title, _, figure in METRICS:  # each metric's figure is linked under its own title, and was written
        assert f"![{title}]({figure})" in report and (out / figure).is_file(), figure
    err = error_of(capsys, *models_2d, "-i", cases)  # checked before any model is loaded
    assert "already exists" in err and "--overwrite" in err


# --------------------------------------------------------------------------- numbers recomputed independently


def _stage_features(model: Path, case: str, preprocessed: Path) -> list[np.ndarray]:
    """``[e_1 … e_S, d_1 … d_{S-1}]`` of one case, ``(C, H, W)`` float64 each, without our package.

    The network is built from plans.json by nnU-Net, loaded with the fold's weights, and fed nnU-Net's
    own preprocessed copy of the case (``nnUNetv2_plan_and_preprocess``'s file); the stage outputs are
    taken with plain forward hooks on ``encoder.stages`` and ``decoder.stages``.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads((model / "plans.json").read_text())
    config = plans["configurations"]["2d"]
    arch = config["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3, deep_supervision=False
    )
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net.load_state_dict(checkpoint["network_weights"])
    data = np.asarray(nnUNetDatasetBlosc2(str(preprocessed)).load_case(case)[0][:])[:, 0]  # (C, H, W)
    assert list(data.shape[1:]) == config["patch_size"], "the case is one patch: no crop or padding to redo"
    outputs: list[np.ndarray] = []
    stages = [*net.encoder.stages, *net.decoder.stages]
    handles = [s.register_forward_hook(lambda m, i, o: outputs.append(o[0].double().numpy().copy())) for s in stages]
    with torch.no_grad():
        net.eval()(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None])
    for h in handles:
        h.remove()
    assert len(outputs) == len(stages)
    return outputs


def _pool(t: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Average pooling of a ``(C, H, W)`` map to ``size`` (whole blocks: U-Net sizes divide evenly)."""
    (c, h, w), (sh, sw) = t.shape, size
    assert h % sh == 0 and w % sw == 0
    return t.reshape(c, sh, h // sh, sw, w // sw).mean(axis=(2, 4))


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``(C_x, n)`` and ``(C_y, n)`` samples: ‖Y_c X_cᵀ‖² / (‖X_c X_cᵀ‖ ‖Y_c Y_cᵀ‖), rows centred."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(y @ x.T) ** 2 / (np.linalg.norm(x @ x.T) * np.linalg.norm(y @ y.T)))


def _effective_rank(x: np.ndarray) -> float:
    eig = np.clip(np.linalg.eigvalsh(np.cov(x)), 0, None)
    p = eig[eig > 0] / eig.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_stage_numbers_recomputed_from_the_network(env, models_2d, tmp_path):
    """CKA (and its shuffled baseline), SCR and effective rank of every stage, recomputed with numpy."""
    from nnunet_selfreg.analysis.extract import SCR_DRAWS, SEED  # the documented seeds and draw count

    model = models_2d[1]
    one = tmp_path / "one_case"
    one.mkdir()
    (one / "case_000_0000.png").symlink_to(env.raw / DATASET_2D / "imagesTr" / "case_000_0000.png")
    assert analyze(model, "-i", one, "-o", tmp_path / "out", "--no-gradcam") == 0
    stages = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["stages"]

    feats = _stage_features(model, "case_000", env.preprocessed / DATASET_2D / "nnUNetPlans_2d")
    assert len(feats) == len(stages)
    teacher = feats[-1]  # F_final
    scr_gen = torch.Generator().manual_seed(SEED)  # one stream over the stages, student drawn before teacher
    shuffle_gen = torch.Generator().manual_seed(SEED + 1)
    for s, (f, stage) in enumerate(zip(feats, stages, strict=True)):
        t = _pool(teacher, f.shape[1:])
        x, y = f.reshape(f.shape[0], -1), t.reshape(t.shape[0], -1)
        shuffled = y[:, torch.randperm(y.shape[1], generator=shuffle_gen).numpy()]
        assert stage["channels"] == f.shape[0] and stage["spatial_size"] == list(f.shape[1:])
        assert stage["cka"] == pytest.approx(_cka(x, y), rel=1e-5), stage["stage"]
        assert stage["cka_shuffled"] == pytest.approx(_cka(x, shuffled), rel=1e-5), stage["stage"]
        assert stage["effective_rank"] == pytest.approx(_effective_rank(x), rel=1e-5), stage["stage"]
        if s == len(feats) - 1:
            assert stage["scr"] is None  # the teacher has none
            continue
        k = min(f.shape[0], t.shape[0])
        draws = []
        for _ in range(SCR_DRAWS):
            ps = torch.randperm(f.shape[0], generator=scr_gen).numpy()[:k]
            pt = torch.randperm(t.shape[0], generator=scr_gen).numpy()[:k]
            draws.append(np.mean((f[ps] - t[pt]) ** 2))
        assert stage["scr"] == pytest.approx(float(np.mean(draws)), rel=1e-5), stage["stage"]

    # near F_final the stages share its spatial layout: well above the shuffled-position baseline
    for stage in stages[-2:]:
        assert stage["cka"] > 2 * stage["cka_shuffled"], stage


def _write_model(folder: Path, plans: dict, dataset_json: dict, configuration: str, seed: int = 0) -> Path:
    """A model folder as nnU-Net writes it, with the weights of an untrained network built from ``plans``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    arch = plans["configurations"][configuration]["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3, deep_supervision=False
    )
    checkpoint = {
        "network_weights": net.state_dict(),
        "trainer_name": "nnUNetTrainer",
        "init_args": {"configuration": configuration},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _plans_3d(plans_2d: dict) -> dict:
    """The 2D plans with a small anisotropic 3d_fullres configuration (3 stages, patch 8x32x32)."""
    plans = copy.deepcopy(plans_2d)
    plans["image_reader_writer"] = "SimpleITKIO"
    plans["original_median_spacing_after_transp"] = [2.5, 1.0, 1.0]
    config = copy.deepcopy(plans["configurations"]["2d"])
    config.update(
        data_identifier="nnUNetPlans_3d_fullres", patch_size=[8, 32, 32], spacing=[2.5, 1.0, 1.0],
        median_image_size_in_voxels=[12, 40, 40],
    )  # fmt: skip
    config["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 16], conv_op="torch.nn.modules.conv.Conv3d",
        norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
    )  # fmt: skip
    plans["configurations"] = {"3d_fullres": config}
    return plans


def test_3d_models_and_mixing_with_2d(env, models_2d, tmp_path, capsys):
    plans_2d = json.loads((models_2d[0] / "plans.json").read_text())
    dataset_json = json.loads((models_2d[0] / "dataset.json").read_text())
    plans = _plans_3d(plans_2d)
    dataset_3d = {**dataset_json, "file_ending": ".nii.gz"}
    results = tmp_path / "results" / "Dataset903_Toy3D"
    a = _write_model(results / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset_3d, "3d_fullres", seed=0)
    b = _write_model(results / "nnUNetTrainerSelfReg__nnUNetPlans__3d_fullres", plans, dataset_3d, "3d_fullres", 1)
    raw = make_synthetic_dataset(tmp_path / "raw", 903, dim=3, num_cases=2, shape=(12, 40, 40), spacing=(2.5, 1, 1))
    assert analyze(a, b, "-i", raw / "imagesTr", "-o", tmp_path / "out3d", "--cam-class", "box") == 0
    r = _check_results(tmp_path / "out3d", 2, 3)
    assert [m["n_encoder_stages"] for m in r["models"]] == [3, 3]
    assert r["models"][0]["patch_size"] == [8, 32, 32] and r["setup"]["gradcam"]["channel"] == 2
    assert r["models"][0]["stages"][0]["spatial_size"] == [8, 32, 32]
    assert r["models"][0]["stages"][1]["spatial_size"] == [8, 16, 16]  # stride (1, 2, 2)
    assert r["models"][0]["stages"][2]["spatial_size"] == [4, 8, 8]  # then (2, 2, 2)

    # an existing report is kept unless --overwrite; then it is replaced
    assert "already exists" in error_of(capsys, a, b, "-i", raw / "imagesTr", "-o", tmp_path / "out3d")
    assert analyze(a, "-i", raw / "imagesTr", "-o", tmp_path / "out3d", "--overwrite", "--no-gradcam") == 0
    r = json.loads((tmp_path / "out3d" / "results.json").read_text())
    assert len(r["models"]) == 1 and r["setup"]["gradcam"] is None and r["models"][0]["gradcam"] is None
    assert not (tmp_path / "out3d" / "gradcam.png").exists() and (tmp_path / "out3d" / "cka.png").is_file()

    err = error_of(capsys, a, models_2d[0], "-i", raw / "imagesTr", "-o", tmp_path / "mixed")
    assert "expects inputs" in err and "analyze them separately" in err


def test_bad_input_gives_one_line_errors(env, models_2d, tmp_path, capsys):
    model = models_2d[0]
    cases = env.raw / DATASET_2D / "imagesTr"
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    assert "is not a trained nnU-Net model folder" in error_of(capsys, not_a_model, "-i", cases)
    assert "does not exist" in error_of(capsys, tmp_path / "nope", "-i", cases)
    assert "has no fold_3 (it has fold_0)" in error_of(capsys, model, "-i", cases, "-f", "3")
    err = error_of(capsys, model, "-i", cases, "--checkpoint", "checkpoint_nope.pth")
    assert "has no checkpoint_nope.pth" in err and "checkpoint_final.pth" in err

    two_channels = tmp_path / "two_channels"
    two_channels.mkdir()
    for suffix in ("_0000.png", "_0001.png"):
        shutil.copy(cases / "case_000_0000.png", two_channels / f"case_000{suffix}")
    err = error_of(capsys, model, "-i", two_channels)
    assert "case case_000 has channel file(s) _0000, _0001 but the model expects 1 channel(s)" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no cases in" in error_of(capsys, model, "-i", empty)
    assert "is not a foreground class" in error_of(capsys, model, "-i", cases, "--cam-class", "nope")
    assert "given twice" in error_of(capsys, model, model, "-i", cases)
