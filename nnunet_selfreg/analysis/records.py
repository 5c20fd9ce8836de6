"""The records of an analysis: models named and checked against each other, analysed one after the other,
and everything measured gathered into the ``results.json`` structure that :mod:`.analysis_report` writes.

This is the library side of ``nnunet-selfreg analyze``: the command parses its arguments, loads the models
and prints progress; what is measured and how it is recorded lives here, so a script can run the same
analysis and get the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from nnunet_selfreg.analysis import extract
from nnunet_selfreg.analysis.extract import AnalyzeInputError, Case, Model
from nnunet_selfreg.report_folder import package_version


def model_names(models: Sequence[Model]) -> list[str]:
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


def compatibility_notes(models: Sequence[Model]) -> list[str]:
    """Raise if the models cannot share the cases; return notes on what differs between them."""
    first = models[0]
    for m in models[1:]:
        if m.channel_names != first.channel_names or m.file_ending != first.file_ending:
            raise AnalyzeInputError(
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


def model_record(model: Model, analysis: dict) -> dict:
    """One model's entry of ``results.json`` from :func:`extract.analyse_model`'s output."""
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


def analyse_models(
    models: Sequence[Model],
    cases: Sequence[Case],
    cam_channel: int,
    gradcam: bool,
    log: Callable[[str], None] = extract.log,
) -> tuple[list[dict], dict[str, dict]]:
    """Analyse each model on ``cases`` (preprocessed once per distinct preprocessing) and release its weights
    afterwards; returns the models' records and their Grad-CAM displays (by model name)."""
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
            gradcam=gradcam,
            progress=lambda msg, name=model.name: log(f"  {name}: {msg}"),
        )
        record = model_record(model, analysis)
        record["preprocessing"] = infos
        records.append(record)
        if analysis["gradcam"]:
            displays[model.name] = analysis["gradcam"]["display"]
        model.network.cpu()
        model.predictor.network = None  # release the weights before the next model
        model.network = None
    return records, displays


def build_results(
    models: Sequence[Model],
    records: list[dict],
    cases: Sequence[Case],
    cases_folder: Path,
    *,
    command: str,
    fold: str,
    checkpoint: str,
    device: str,
    cam_class: str,
    cam_channel: int,
    gradcam: bool,
    notes: list[str],
) -> dict:
    """The ``results.json`` structure: the setup (with how each number is measured), notes and the records.
    ``setup.seconds`` is left None for the caller to fill in."""
    from nnunet_selfreg import __version__

    first = models[0]
    spatial_dims = len(first.patch_size)
    return {
        "tool": "nnunet-selfreg analyze",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "setup": {
            "dataset": first.dataset,
            "configuration": first.configuration,
            "fold": fold,
            "checkpoint": checkpoint,
            "device": device,
            "spatial_dims": spatial_dims,
            "cases_folder": str(Path(cases_folder).absolute()),
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
            "gradcam": {"case": cases[0].identifier, "class": cam_class, "channel": cam_channel} if gradcam else None,
            "versions": {d: package_version(d) for d in ("nnunetv2", "torch", "numpy", "matplotlib")},
            "seconds": None,
        },
        "notes": notes,
        "models": records,
    }
