"""``nnunet-selfreg analyze``: what the stages of trained U-Nets represent, models side by side."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import time
from pathlib import Path

from nnunet_selfreg.arguments import positive_int
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.json_files import read_json
from nnunet_selfreg.nnunet_folders import FINAL_CHECKPOINT, PLANS_JSON, parse_fold, parse_model_folder_name

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


def _fold(text: str) -> str:
    try:
        return str(parse_fold(text))
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
    p.add_argument("--checkpoint", default=FINAL_CHECKPOINT, help="checkpoint file (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--num-cases", type=positive_int, default=5, metavar="N", help="first N cases of CASES (default: 5)")
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
    try:
        dataset = read_json(model_folder / PLANS_JSON)["dataset_name"]
    except (UserError, KeyError, TypeError):
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


def _run(args: argparse.Namespace) -> int:
    from nnunet_selfreg.analysis import analysis_report, extract, records
    from nnunet_selfreg.analysis.extract import AnalyzeInputError, log

    folders = [Path(m).absolute() for m in args.models]
    if len(set(folders)) != len(folders):
        raise UserError("a model folder is given twice")
    for folder in folders:  # cheap checks first: no model is loaded if any folder is wrong
        extract.check_model_folder(folder, args.fold, args.checkpoint)
    output = Path(args.output).absolute() if args.output else default_output(folders[0])
    try:
        analysis_report.check_output_folder(output, args.overwrite)
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
    for model, name in zip(models, records.model_names(models), strict=True):
        model.name = name
    notes = records.compatibility_notes(models)
    for n in notes:
        log(f"note: {n}")
    first = models[0]
    cam_channel, cam_class = extract.cam_target(first, args.cam_class)
    for m in models[1:]:
        if extract.cam_target(m, args.cam_class) != (cam_channel, cam_class):
            raise AnalyzeInputError(f"{m.folder} names its classes differently from {first.folder}: no common class")
    log(f"{len(cases)} case(s) from {args.cases}: {', '.join(c.identifier for c in cases)}")

    model_records, displays = records.analyse_models(models, cases, cam_channel, not args.no_gradcam, log)
    results = records.build_results(
        models,
        model_records,
        cases,
        Path(args.cases),
        command=command_line(args, output),
        fold=args.fold,
        checkpoint=args.checkpoint,
        device=str(device),
        cam_class=cam_class,
        cam_channel=cam_channel,
        gradcam=not args.no_gradcam,
        notes=notes,
    )
    results["setup"]["seconds"] = round(time.perf_counter() - started, 1)
    try:
        written = analysis_report.write_outputs(results, displays, output, args.overwrite)
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
