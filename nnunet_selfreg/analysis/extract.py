"""Loading trained nnU-Net model folders, preprocessing raw cases as nnU-Net's inference does, and
measuring every tapped stage of the network on them.

The network and its weights come from nnU-Net's own ``nnUNetPredictor.initialize_from_trained_model_folder``;
each case is read and preprocessed by the configuration's own preprocessor (``run_case``: transpose,
crop to non-zero, normalise, resample, exactly what ``nnUNetv2_predict`` does). Instead of the full
sliding window, one patch per case is analysed: the centre crop of the configuration's patch size,
zero-padded where the image is smaller (as nnU-Net pads before its sliding window). For a 2D
configuration on 3D images the central slice is used.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_selfreg.analysis.feature_stats import (
    ChannelMoments,
    CrossMoments,
    channel_correlation,
    effective_rank_of_covariance,
    mean_abs_correlation_of_covariance,
)
from nnunet_selfreg.analysis.gradcam import class_score, grad_cam
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.losses.selfreg import pool_to_common_size, semantic_consistency_loss
from nnunet_selfreg.nnunet_folders import (
    CHECKPOINT_GLOB,
    DATASET_JSON,
    FOLD_PREFIX,
    MODEL_FOLDER_LAYOUT,
    PLANS_JSON,
    fold_folder,
    fold_folders,
    image_file_name,
    parse_model_folder_name,
)
from nnunet_selfreg.taps import UNetFeatureTaps, UnsupportedArchitectureError, check_tappable, unwrap_network

#: random channel pairings averaged per case for the SCR distance (the loss draws one per step)
SCR_DRAWS = 16
#: seed of the SCR channel draws and of the position shuffle of the CKA null
SEED = 0

_CASE_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class AnalyzeInputError(UserError):
    """Bad input to ``nnunet-selfreg analyze`` (printed as one line, exit code 2)."""


@dataclass
class Model:
    """A trained model folder loaded through nnU-Net's predictor."""

    folder: Path
    fold: str
    checkpoint: str
    trainer: str
    plans_identifier: str
    configuration: str
    dataset: str
    plans: dict
    dataset_json: dict
    predictor: object = field(repr=False)
    network: nn.Module = field(repr=False)
    name: str = ""

    @property
    def configuration_manager(self):
        return self.predictor.configuration_manager

    @property
    def plans_manager(self):
        return self.predictor.plans_manager

    @property
    def label_manager(self):
        return self.predictor.label_manager

    @property
    def channel_names(self) -> list[str]:
        return channel_names(self.dataset_json)

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json["file_ending"])

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.configuration_manager.patch_size)


@dataclass
class Case:
    identifier: str
    files: list[Path]


# --------------------------------------------------------------------------- model folders


def channel_names(dataset_json: dict) -> list[str]:
    """The input channels of a dataset.json, in channel order (``channel_names``, or the older ``modality``)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [str(names[k]) for k in sorted(names, key=int)]


def input_spec(folder: Path) -> tuple[str, list[str]]:
    """``(file_ending, channel names)`` from a model folder's dataset.json (read before loading the model)."""
    dataset_json = read_json(Path(folder) / DATASET_JSON, AnalyzeInputError)
    try:
        return str(dataset_json["file_ending"]), channel_names(dataset_json)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise AnalyzeInputError(f"{folder}/{DATASET_JSON} lacks a valid file_ending or channel_names ({e})") from None


def check_model_folder(folder: Path, fold: str, checkpoint: str) -> Path:
    """The checkpoint file of a trained model folder, or a clear :class:`AnalyzeInputError`."""
    layout = MODEL_FOLDER_LAYOUT
    if not folder.exists():
        raise AnalyzeInputError(f"model folder {folder} does not exist (expected {layout})")
    if not folder.is_dir():
        raise AnalyzeInputError(f"{folder} is not a folder: give a trained model folder ({layout})")
    missing = [f for f in (PLANS_JSON, DATASET_JSON) if not (folder / f).is_file()]
    folds = [p.name for p in fold_folders(folder)]
    if missing or not folds:
        what = " and ".join(missing) if missing else f"{FOLD_PREFIX}X folders"
        raise AnalyzeInputError(f"{folder} is not a trained nnU-Net model folder: it has no {what} (expected {layout})")
    fold_dir = fold_folder(folder, fold)
    if not fold_dir.is_dir():
        raise AnalyzeInputError(f"{folder} has no {FOLD_PREFIX}{fold} (it has {', '.join(folds)}): choose one with -f")
    ckpt = fold_dir / checkpoint
    if not ckpt.is_file():
        found = sorted(p.name for p in fold_dir.glob(CHECKPOINT_GLOB))
        hint = f"it has {', '.join(found)}: pass --checkpoint" if found else "is the training finished?"
        raise AnalyzeInputError(f"{fold_dir} has no {checkpoint} ({hint})")
    return ckpt


def load_model(folder: Path, fold: str, checkpoint: str, device: torch.device) -> Model:
    """Build the network and load the fold's weights with nnU-Net's predictor; check it can be tapped."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = Path(folder).absolute()
    ckpt = check_model_folder(folder, fold, checkpoint)
    plans = read_json(folder / PLANS_JSON, AnalyzeInputError)
    dataset_json = read_json(folder / DATASET_JSON, AnalyzeInputError)
    parts = parse_model_folder_name(folder.name)
    trainer, plans_id, configuration = parts or (folder.name, plans.get("plans_name", "?"), "?")
    log = io.StringIO()  # nnU-Net prints its trainer search and device notes: keep our progress readable
    try:
        with contextlib.redirect_stdout(log):
            predictor = nnUNetPredictor(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device, allow_tqdm=False
            )
            predictor.initialize_from_trained_model_folder(str(folder), (fold,), checkpoint)
    except RuntimeError as e:
        if "Could not find requested nnunet trainer" in str(e):
            raise AnalyzeInputError(
                f"nnU-Net cannot find the trainer class named in {ckpt}: install the package that defines it, "
                "list its folder in nnUNet_extTrainer, or export a stock copy with `nnunet-selfreg export-stock`"
            ) from None
        raise AnalyzeInputError(f"cannot load {ckpt} into the plans' network: {_first_line(e)}") from None
    except (KeyError, OSError, EOFError, ValueError, TypeError, AssertionError) as e:
        raise AnalyzeInputError(
            f"cannot load {ckpt} as an nnU-Net checkpoint: {type(e).__name__}: {_first_line(e)}"
        ) from None
    if predictor.configuration_manager.previous_stage_name is not None:
        raise AnalyzeInputError(
            f"{folder} is a cascade stage (its input includes the segmentation of "
            f"'{predictor.configuration_manager.previous_stage_name}'): analyze the previous stage or a "
            "non-cascaded configuration"
        )
    try:
        network = check_tappable(unwrap_network(predictor.network), min_channels=1)
    except UnsupportedArchitectureError as e:
        raise AnalyzeInputError(f"{folder}: {_first_line(e)}") from None
    if configuration == "?":
        configuration = "unknown configuration"
    network = network.to(device).eval()
    return Model(
        folder=folder,
        fold=fold,
        checkpoint=checkpoint,
        trainer=str(predictor.trainer_name),
        plans_identifier=plans_id,
        configuration=configuration,
        dataset=str(plans.get("dataset_name", folder.parent.name)),
        plans=plans,
        dataset_json=dataset_json,
        predictor=predictor,
        network=network,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- cases


def find_cases(folder: Path, file_ending: str, channel_names: list[str]) -> list[Case]:
    """The cases of a folder of nnU-Net-named raw images (``CASE_XXXX<file_ending>``), channels checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalyzeInputError(f"cases folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith("."))
    if not files:
        raise AnalyzeInputError(
            f"no cases in {folder}: expected images named CASE_XXXX{file_ending} "
            f"(e.g. {image_file_name('case1', file_ending)}), "
            f"the model's {DATASET_JSON} file_ending"
        )
    by_case: dict[str, dict[int, Path]] = {}
    for p in files:
        m = _CASE_FILE.match(p.name[: -len(file_ending)])
        if m is None:
            raise AnalyzeInputError(
                f"{p.name} in {folder} is not named CASE_XXXX{file_ending} (XXXX: the 4-digit channel number)"
            )
        by_case.setdefault(m["case"], {})[int(m["channel"])] = p
    want = list(range(len(channel_names)))
    cases = []
    for identifier, channels in sorted(by_case.items()):
        if sorted(channels) != want:
            found = ", ".join(f"_{c:04d}" for c in sorted(channels))
            expected = ", ".join(f"_{c:04d} ({n})" for c, n in zip(want, channel_names, strict=True))
            raise AnalyzeInputError(
                f"case {identifier} has channel file(s) {found} but the model expects {len(want)} channel(s): "
                f"{expected}"
            )
        cases.append(Case(identifier, [channels[c] for c in want]))
    return cases


def crop_box(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[tuple[int, int]]:
    """Centre crop ``[start, stop)`` per axis of a ``patch`` in an image of ``shape`` (already padded to >= patch)."""
    return [((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, patch, strict=True)]


def preprocess_case(model: Model, case: Case) -> tuple[Tensor, dict]:
    """nnU-Net's preprocessing of one raw case, then one patch: ``(C, *patch_size)`` float32 and what was done."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    cm = model.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data, _, _ = preprocessor.run_case(
                [str(f) for f in case.files], None, model.plans_manager, cm, model.dataset_json
            )
    except Exception as e:  # noqa: BLE001 - unreadable images come in many exception types
        raise AnalyzeInputError(f"cannot read or preprocess case {case.identifier}: {_first_line(e)}") from None
    info: dict = {"case": case.identifier, "preprocessed_shape": list(data.shape[1:])}
    patch = model.patch_size
    if len(patch) == 2 and data.ndim == 4:  # 2D configuration: (C, Z, Y, X), one slice
        z = data.shape[1] // 2
        data = data[:, z]
        info["slice"] = z
    elif data.ndim - 1 != len(patch):
        raise AnalyzeInputError(
            f"case {case.identifier} has {data.ndim - 1} spatial axes after preprocessing, the patch {patch} has "
            f"{len(patch)}"
        )
    data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    data = pad_nd_image(data, patch, "constant", {"value": 0})  # as nnU-Net's sliding window pads
    box = crop_box(tuple(data.shape[1:]), patch)
    info["padded_shape"] = list(data.shape[1:])
    info["crop"] = [list(b) for b in box]
    return data[(slice(None), *(slice(a, b) for a, b in box))].contiguous(), info


def preprocessing_key(model: Model) -> str:
    """Models with equal keys preprocess a case identically (same plans and configuration)."""
    return json.dumps([model.plans, model.configuration, model.dataset_json.get("channel_names")], sort_keys=True)


# --------------------------------------------------------------------------- measuring


def stage_names(num_encoder: int, num_decoder: int) -> list[str]:
    return [f"e_{i + 1}" for i in range(num_encoder)] + [f"d_{j + 1}" for j in range(num_decoder)]


def cam_target(model: Model, requested: str | None) -> tuple[int, str]:
    """Output channel and name of the class Grad-CAM explains (default: the first foreground class)."""
    lm = model.label_manager
    labels = {k: v for k, v in model.dataset_json["labels"].items() if v != lm.ignore_label}
    if lm.has_regions:
        names = [k for k, v in labels.items() if not (v == 0 or v == [0] or v == (0,))]
        channels = {n: i for i, n in enumerate(names)}
    else:
        names = [k for k, v in sorted(labels.items(), key=lambda kv: int(kv[1])) if int(v) != 0]
        channels = {n: int(labels[n]) for n in names}
        channels.update({str(int(labels[n])): int(labels[n]) for n in names})
    if not names:
        raise AnalyzeInputError(f"{model.folder}: {DATASET_JSON} has no foreground class for Grad-CAM")
    if requested is None:
        return channels[names[0]], names[0]
    if requested not in channels:
        raise AnalyzeInputError(
            f"--cam-class {requested!r} is not a foreground class of {model.dataset}: "
            f"{', '.join(names)}" + ("" if lm.has_regions else " (or their label values)")
        )
    channel = channels[requested]
    name = requested if requested in names else next(n for n in names if channels[n] == channel)
    return channel, name


def _central_slice(x: Tensor) -> Tensor:
    """A 2D view for display: the map itself (2D) or its central slice along the first axis (3D)."""
    return x if x.ndim == 2 else x[x.shape[0] // 2]


class _StageStatistics:
    """Running per-stage sums over the cases: CKA moments with ``F_final`` (and shuffled), SCR, channel moments."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cross = [CrossMoments() for _ in names]
        self.own: list[ChannelMoments | None] = [None for _ in names]  # a stage's moments if CKA pools it
        self.scr: list[list[float]] = [[] for _ in names]
        self.shapes: list[dict] = [{} for _ in names]
        self.generator = torch.Generator().manual_seed(SEED)
        self.shuffle_gen = torch.Generator().manual_seed(SEED + 1)

    @torch.no_grad()
    def add_case(self, features: list[Tensor]) -> None:
        """One case's tapped maps ``e_1 … e_S, d_1 … d_{S-1}`` (the last is ``F_final``)."""
        teacher = features[-1].detach().float()
        for s, f in enumerate(features):
            f = f.detach().float()
            self.shapes[s] = {"channels": int(f.shape[1]), "spatial_size": list(f.shape[2:])}
            a, b = pool_to_common_size(f, teacher)
            self.shapes[s]["cka_pooled_size"] = list(a.shape[2:])
            if a.shape != f.shape:  # never in a U-Net (F_final is the largest map), but allowed
                self.own[s] = (self.own[s] or ChannelMoments()).update(f)
            flat = b.flatten(2)
            perm = torch.randperm(flat.shape[2], generator=self.shuffle_gen).to(f.device)
            self.cross[s].update(a, b, flat[:, :, perm].reshape(b.shape))
            if s < len(self.names) - 1:  # (a, b) are what the loss pools to: pooling them again is the identity
                draws = [float(semantic_consistency_loss(a, b, self.generator)) for _ in range(SCR_DRAWS)]
                self.scr[s].append(float(np.mean(draws)))

    def stages(self) -> list[dict]:
        """The per-stage numbers over every case added."""
        out = []
        for s, name in enumerate(self.names):
            moments, cross, scr = self.own[s] or self.cross[s].x, self.cross[s], self.scr[s]
            cov = moments.covariance()
            out.append(
                {
                    "stage": name,
                    "kind": "encoder" if name.startswith("e") else "decoder",
                    **self.shapes[s],
                    "samples": moments.n,
                    "cka_samples": cross.x.n,
                    "cka": cross.cka(),
                    "cka_shuffled": cross.cka(shuffled=True),
                    "scr": float(np.mean(scr)) if scr else None,
                    "scr_per_case": scr if scr else None,
                    "mean_abs_correlation": mean_abs_correlation_of_covariance(cov),
                    "effective_rank": effective_rank_of_covariance(cov),
                    "constant_channels": int((~channel_correlation(cov)[1]).sum()),
                }
            )
            out[-1]["effective_rank_ratio"] = out[-1]["effective_rank"] / self.shapes[s]["channels"]
        return out


def _predicted_fractions(logits: Tensor, has_regions: bool) -> dict[str, float]:
    """Share of the patch each output channel predicts (classes from 1; every region)."""
    if has_regions:
        seg = (logits > 0).long()
        return {str(c): float(seg[:, c].float().mean()) for c in range(logits.shape[1])}
    seg = logits.argmax(1)
    return {str(c): float((seg == c).float().mean()) for c in range(1, logits.shape[1])}


def _cam_record(identifier: str, x: Tensor, region: Tensor, found: bool, cams: list[Tensor]) -> dict:
    """Grad-CAM of one case: per stage its peak and the share inside the class region, and maps to display."""
    stages_cam = []
    for c in cams:
        c = c[0]
        total = float(c.sum())
        inside = float(c[region].sum()) / total if total > 0 and found else math.nan
        stages_cam.append({"max": float(c.max()), "fraction_in_region": inside})
    return {
        "case": identifier,
        "region_found": found,
        "region_fraction": float(region.float().mean()),
        "stages": stages_cam,
        "display": {
            "image": _central_slice(x[0, 0].detach().cpu()).numpy(),
            "region": _central_slice(region.cpu()).numpy(),
            "maps": [_central_slice(c[0].cpu()).numpy() for c in cams],
        },
    }


def analyse_model(
    model: Model,
    inputs: list[tuple[str, Tensor]],
    cam_case: int,
    cam_channel: int,
    gradcam: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every per-stage number for one model on the preprocessed patches ``inputs`` (``(C, *patch)`` each).

    Per stage ``f`` (``e_1 … e_S``, ``d_1 … d_{S-1}``), over all cases: linear CKA with ``F_final`` after
    pooling both to their per-axis minimum size (SCR's own alignment) and the same with ``F_final``'s
    positions shuffled within each case (the chance level), the SCR distance to ``F_final`` (mean of
    ``SCR_DRAWS`` random channel pairings per case), the mean absolute channel correlation and the
    effective rank of the channel covariance at the stage's own resolution. Grad-CAM maps for case
    ``cam_case``. Returns plain Python data plus ``display`` arrays for the figures.
    """
    device = next(model.network.parameters()).device
    net = model.network.eval()
    taps = UNetFeatureTaps(capture_eval=True)
    taps.attach(net, min_channels=1)
    statistics = _StageStatistics(stage_names(taps.num_encoder_stages, taps.num_decoder_stages))
    has_regions = model.label_manager.has_regions
    cases_out: list[dict] = []
    cam: dict = {}
    try:
        for k, (identifier, x) in enumerate(inputs):
            t0 = time.perf_counter()
            want_cam = gradcam and k == cam_case
            x = x[None].to(device)
            with torch.set_grad_enabled(want_cam):
                logits = net(x)
                tapped = taps.pop()
                if tapped is None:
                    raise RuntimeError("the feature taps captured nothing: is the network a supported U-Net?")
                features = [*tapped[0], *tapped[1]]
                if want_cam:
                    score, region, found = class_score(logits, cam_channel, has_regions)
                    cams = grad_cam(features, score, size=x.shape[2:])
            statistics.add_case(features)
            with torch.no_grad():
                fractions = _predicted_fractions(logits, has_regions)
            cases_out.append({"case": identifier, "predicted_fraction_per_output_channel": fractions})
            if want_cam:
                cam = _cam_record(identifier, x, region[0], found, cams)
                del cams, score
            del logits, features, tapped
            if progress is not None:
                extra = ", Grad-CAM" if want_cam else ""
                progress(f"case {k + 1}/{len(inputs)} {identifier} ({time.perf_counter() - t0:.1f} s{extra})")
    finally:
        taps.detach()
    return {"stages": statistics.stages(), "cases": cases_out, "gradcam": cam}


def log(message: str) -> None:
    print(f"[analyze] {message}", file=sys.stderr, flush=True)
