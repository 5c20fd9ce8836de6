"""``nnunet-selfreg analyze``: what the stages of trained U-Nets represent, models side by side."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from nnunet_selfreg.errors import UserError
from nnunet_selfreg.nnunet_folders import parse_model_folder_name

DESCRIPTION = """\
Load trained nnU-Net model folders (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG, any trainer whose
network is nnU-Net's PlainConvUNet or ResidualEncoderUNet), run a few raw cases through each network in
evaluation mode (nnU-Net's own preprocessing, one centre patch per case) and measure every encoder stage
e_1..e_S and decoder stage d_1..d_{S-1}:

  - semantic consistency with the final decoder features F_final: linear CKA and SelfReg's SCR distance,
  - channel redundancy: mean absolute channel correlation and effective rank of the channel covariance,
  - Grad-CAM toward a foreground class, for one case.

Writes report.md, results.json and PNG figures to -o (default ./analysis_DATASET_CONFIG). See docs/analyze.md.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fold(text: str) -> str:
    from nnunet_selfreg.analysis.extract import parse_fold

    try:
        return parse_fold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-stage CKA/SCR to the final features, channel redundancy and Grad-CAM of trained models",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL_FOLDER", help="trained model folders (one or more)")
    p.add_argument("-i", dest="cases", required=True, metavar="CASES", help="folder of raw images CASE_XXXX.ext")
    p.add_argument("-f", dest="fold", type=_fold, default="0", help="fold of every model (default: 0; or 'all')")
    p.add_argument("-o", dest="output", default=None, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--num-cases", type=_positive_int, default=5, metavar="N", help="first N cases of CASES (default: 5)"
    )
    p.add_argument("--cam-class", default=None, help="class for Grad-CAM: name or label value (default: first)")
    p.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (saves memory on large 3D patches)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def _device(text: str | None):
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"device {text!r} is not usable here: {str(e).splitlines()[0]}") from None
    return device


def default_output(model_folder: Path) -> Path:
    """``./analysis_<dataset>_<configuration>`` from the model folder's plans.json and name (``T__P__C``)."""
    import json

    try:
        dataset = json.loads((model_folder / "plans.json").read_text())["dataset_name"]
    except (OSError, ValueError, KeyError, TypeError):
        dataset = model_folder.parent.name
    parts = parse_model_folder_name(model_folder.name)
    configuration = parts[2] if parts else model_folder.name
    return Path.cwd() / re.sub(r"[^A-Za-z0-9._-]+", "-", f"analysis_{dataset}_{configuration}")


def command_line(args: argparse.Namespace, output: Path) -> str:
    parts = ["nnunet-selfreg", "analyze", *args.models, "-i", args.cases, "-f", args.fold, "-o", str(output)]
    parts += ["--checkpoint", args.checkpoint, "--num-cases", str(args.num_cases)]
    parts += ["--device", str(args.device)] if args.device else []
    parts += ["--cam-class", args.cam_class] if args.cam_class else []
    parts += ["--no-gradcam"] if args.no_gradcam else []
    parts += ["--overwrite"] if args.overwrite else []
    return shlex.join(parts)


def _names(models: list) -> list[str]:
    """Trainer names when they tell the models apart, else the folder names (with the dataset if needed)."""
    for key in (
        lambda m: m.trainer,
        lambda m: m.folder.name,
        lambda m: f"{m.folder.parent.name}/{m.folder.name}",
        lambda m: str(m.folder),
    ):
        names = [key(m) for m in models]
        if len(set(names)) == len(names):
            return names
    return [str(m.folder) for m in models]


def _compatibility(models: list) -> list[str]:
    """Raise if the models cannot share the cases; return notes on what differs between them."""
    first = models[0]
    for m in models[1:]:
        if m.channel_names != first.channel_names or m.file_ending != first.file_ending:
            raise UserError(
                f"{m.folder} expects inputs {m.channel_names} ({m.file_ending}) but {first.folder} expects "
                f"{first.channel_names} ({first.file_ending}): analyze them separately"
            )
    notes = []
    for what, key in (
        ("datasets", lambda m: m.dataset),
        ("configurations", lambda m: m.configuration),
        ("plans identifiers", lambda m: m.plans_identifier),
    ):
        values = sorted({key(m) for m in models})
        if len(values) > 1:
            notes.append(f"the models come from different {what} ({', '.join(values)}): compare with care")
    configs = {m.name: m.plans["configurations"].get(m.configuration, m.plans) for m in models}
    first_cfg = configs[first.name]
    differing = [n for n, c in configs.items() if c != first_cfg]
    if differing:
        notes.append(
            f"the plans of {', '.join(differing)} differ from those of {first.name} (architecture, patch size or "
            "preprocessing): each model gets its own preprocessing; stages may not correspond one to one"
        )
    return notes


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _model_record(model, analysis: dict) -> dict:
    stages = analysis["stages"]
    cam = analysis["gradcam"]
    if cam:
        for stage, c in zip(stages, cam["stages"], strict=True):
            stage["cam_max"] = c["max"]
            stage["cam_fraction_in_region"] = c["fraction_in_region"]
    n_enc = sum(s["kind"] == "encoder" for s in stages)
    return {
        "name": model.name,
        "folder": str(model.folder),
        "trainer": model.trainer,
        "plans": model.plans_identifier,
        "configuration": model.configuration,
        "dataset": model.dataset,
        "fold": model.fold,
        "checkpoint": model.checkpoint,
        "architecture": model.configuration_manager.network_arch_class_name,
        "patch_size": list(model.patch_size),
        "n_encoder_stages": n_enc,
        "stages": stages,
        "cases": analysis["cases"],
        "gradcam": {k: v for k, v in cam.items() if k not in ("display", "stages")} if cam else None,
    }


def _run(args: argparse.Namespace) -> int:
    from nnunet_selfreg import __version__
    from nnunet_selfreg.analysis import extract, report
    from nnunet_selfreg.analysis.extract import AnalyzeInputError, log

    folders = [Path(m).absolute() for m in args.models]
    if len(set(folders)) != len(folders):
        raise UserError("a model folder is given twice")
    for folder in folders:  # cheap checks first: no model is loaded if any folder is wrong
        extract.check_model_folder(folder, args.fold, args.checkpoint)
    output = Path(args.output).absolute() if args.output else default_output(folders[0])
    try:
        report.check_output_folder(output, args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    file_ending, channels = extract.input_spec(folders[0])
    cases = extract.find_cases(Path(args.cases), file_ending, channels)[: args.num_cases]
    device = _device(args.device)
    started = time.perf_counter()
    models = []
    for k, folder in enumerate(folders):
        log(f"loading model {k + 1}/{len(folders)}: {folder} (fold {args.fold}, {args.checkpoint}) on {device}")
        models.append(extract.load_model(folder, args.fold, args.checkpoint, device))
    for model, name in zip(models, _names(models), strict=True):
        model.name = name
    notes = _compatibility(models)
    for n in notes:
        log(f"note: {n}")
    first = models[0]
    cam_channel, cam_class = extract.cam_target(first, args.cam_class)
    for m in models[1:]:
        if extract.cam_target(m, args.cam_class) != (cam_channel, cam_class):
            raise AnalyzeInputError(f"{m.folder} names its classes differently from {first.folder}: no common class")
    log(f"{len(cases)} case(s) from {args.cases}: {', '.join(c.identifier for c in cases)}")

    cache: dict[str, tuple[list, list]] = {}
    records, displays = [], {}
    for k, model in enumerate(models):
        key = extract.preprocessing_key(model)
        if key not in cache:
            inputs, infos = [], []
            for case in cases:
                x, info = extract.preprocess_case(model, case)
                inputs.append((case.identifier, x))
                infos.append(info)
            cache[key] = (inputs, infos)
        inputs, infos = cache[key]
        patch = "x".join(map(str, model.patch_size))
        log(f"model {k + 1}/{len(models)} {model.name}: {len(inputs)} patch(es) of {patch}")
        analysis = extract.analyse_model(
            model,
            inputs,
            cam_case=0,
            cam_channel=cam_channel,
            gradcam=not args.no_gradcam,
            progress=lambda msg, name=model.name: log(f"  {name}: {msg}"),
        )
        record = _model_record(model, analysis)
        record["preprocessing"] = infos
        records.append(record)
        if analysis["gradcam"]:
            displays[model.name] = analysis["gradcam"]["display"]
        model.network.cpu()
        model.predictor.network = None  # release the weights before the next model
        model.network = None

    spatial_dims = len(first.patch_size)
    results = {
        "tool": "nnunet-selfreg analyze",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args, output),
        "setup": {
            "dataset": first.dataset,
            "configuration": first.configuration,
            "fold": args.fold,
            "checkpoint": args.checkpoint,
            "device": str(device),
            "spatial_dims": spatial_dims,
            "cases_folder": str(Path(args.cases).absolute()),
            "cases": [c.identifier for c in cases],
            "crop": "one centre patch of the configuration's patch size per case (zero-padded where the "
            "preprocessed image is smaller, as nnU-Net pads before its sliding window)"
            + ("; central slice of 3D images for a 2D configuration" if spatial_dims == 2 else ""),
            "cka": "linear CKA (Kornblith et al. 2019) between the stage and F_final, both adaptive-average-pooled "
            "to their per-axis minimum spatial size (the stage's size in a U-Net, as SCR pools), samples = "
            "positions of all cases, features = channels; cka_shuffled: F_final's positions shuffled within "
            f"each case (seed {extract.SEED + 1})",
            "scr": f"nnunet_selfreg.losses.selfreg.semantic_consistency_loss(stage, F_final), mean of "
            f"{extract.SCR_DRAWS} random channel pairings per case (seed {extract.SEED}), then mean over cases",
            "redundancy": "Pearson correlation and covariance of the channels over all positions of all cases, at "
            "the stage's own resolution; effective rank (Roy & Vetterli 2007) of the covariance",
            "gradcam": {"case": cases[0].identifier, "class": cam_class, "channel": cam_channel}
            if not args.no_gradcam
            else None,
            "versions": {d: _version(d) for d in ("nnunetv2", "torch", "numpy", "matplotlib")},
            "seconds": None,
        },
        "notes": notes,
        "models": records,
    }
    results["setup"]["seconds"] = round(time.perf_counter() - started, 1)
    try:
        written = report.write_outputs(results, displays, output, args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    log(f"done in {results['setup']['seconds']} s")
    _print_summary(results, written[0])
    return 0


def _print_summary(results: dict, report_path: Path) -> None:
    def mean(values: list) -> float:
        values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    for m in results["models"]:
        cka = mean([s["cka"] for s in m["stages"] if s["kind"] == "encoder"])
        corr = mean([s["mean_abs_correlation"] for s in m["stages"]])
        print(f"  {m['name']}: mean encoder CKA with F_final {cka:.3f}, mean |channel correlation| {corr:.3f}")
    print(f"report: {report_path}")


def run(args: argparse.Namespace) -> int:
    return _run(args)
