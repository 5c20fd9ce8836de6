"""``nnunet-selfreg compare``: trainers against a baseline, fold by fold and pooled, with paired statistics."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_selfreg.arguments import positive_int
from nnunet_selfreg.errors import UserError
from nnunet_selfreg.evaluation.results import DEFAULT_FOLDS, CompareInputError, Comparison
from nnunet_selfreg.nnunet_folders import (
    CROSSVAL_RESULTS_PREFIX,
    DEBUG_JSON,
    DEFAULT_PLANS,
    FOLD_PREFIX,
    GT_SEGMENTATIONS,
    SPLITS_JSON,
    SUMMARY_JSON,
    VALIDATION_FOLDER,
)

if TYPE_CHECKING:
    from nnunet_selfreg.evaluation.model import Arm

DESCRIPTION = f"""\
Compare nnU-Net trainers on their cross-validation results, case by case. The first -tr is the baseline.

Each -tr is a trainer name (results in
$nnUNet_results/DATASET/TRAINER__PLANS__CONFIG/{FOLD_PREFIX}F/{VALIDATION_FOLDER})
or any results folder under $nnUNet_results/DATASET given by its relative path, e.g.
'ensembles/ensemble___A__P__C___B__P__C___0_1_2_3_4' or 'T__P__C/{CROSSVAL_RESULTS_PREFIX}0_1_2_3_4'
(a folder with one {SUMMARY_JSON} for all cases; its cases are assigned to the folds of the other models,
or of {SPLITS_JSON}).

Repeated training runs: X, X_Rep2, X_Rep3 (and X_Budget_Rep2, X_Rep2_Budget ...) are runs of one arm X;
NAME=RUN,RUN,... makes an arm of any runs. With two or more runs in each arm, every comparison gets a
run-level test, a run-aware interval, the run-to-run SD and the smallest difference the design detects.
With one run per arm, the p-values compare trained models and cannot support a claim about a method.

Dice and IoU come from nnU-Net's {SUMMARY_JSON} files; HD95 and normalised surface Dice (MONAI's values) are
computed from the predictions and $nnUNet_preprocessed/DATASET/{GT_SEGMENTATIONS}, once per case and model
(kept in $nnUNet_results/DATASET/compare_cache; --no-cache recomputes). Writes report.md, results.json and
PNG figures to -o (default $nnUNet_results/DATASET/compare_A_vs_B_..._CONFIG).
"""


def available_cpus() -> int:
    """CPUs this process may use: its affinity (or the machine's count), capped by SLURM's ``--cpus-per-task``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def add_parser(sub: argparse._SubParsersAction) -> None:
    default_num_processes = available_cpus()
    p = sub.add_parser(
        "compare",
        help="compare trainers fold by fold: Dice/IoU, HD95/NSD, paired differences, report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name (e.g. 4 or Dataset004_Hippocampus)")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument(
        "-tr",
        dest="trainers",
        nargs="+",
        required=True,
        metavar="TRAINER",
        help="two or more arms: trainers or result folders (X_Rep2 ... join arm X), or NAME=RUN,RUN,... for an "
        "arm of several runs; the first arm is the baseline",
    )
    p.add_argument("-p", dest="plans", default=DEFAULT_PLANS, help=f"plans identifier (default: {DEFAULT_PLANS})")
    p.add_argument(
        "-f",
        dest="folds",
        nargs="+",
        type=int,
        default=list(DEFAULT_FOLDS),
        metavar="FOLD",
        help="folds to compare (default: 0 1 2 3 4)",
    )
    p.add_argument("-o", dest="output", default=None, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--n-boot", type=positive_int, default=9999, help="bootstrap resamples (default: 9999)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default: 0)")
    p.add_argument(
        "--nsd-tolerance",
        type=float,
        default=1.0,
        metavar="MM",
        help="normalised surface Dice tolerance in mm, in pixels for images without spacing (2D PNG) (default: 1)",
    )
    p.add_argument("--no-surface", action="store_true", help="skip HD95/NSD (Dice and IoU only, fast)")
    p.add_argument(
        "--instances",
        default=None,
        metavar="LABEL",
        help="instance metrics (F1 at IoU 0.5 = RQ, PQ, SQ, AJI) of the connected components of this label",
    )
    p.add_argument(
        "--correction",
        choices=("holm", "bh", "none"),
        default="holm",
        help="multiple-comparison correction of the pooled p-values (default: holm)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        metavar="DICE",
        help="equivalence margin: test whether each arm is within +-DICE of the baseline (TOST on the run means, "
        "or paired on the cases with one run per arm)",
    )
    p.add_argument(
        "--allow-unequal-training",
        action="store_true",
        help=f"compare arms trained for different lengths (epochs x iterations in each fold's {DEBUG_JSON})",
    )
    p.add_argument(
        "-np",
        dest="num_processes",
        type=positive_int,
        default=default_num_processes,
        help=f"processes for the surface metrics (default: the CPUs available, {default_num_processes} here)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute every case's surface/instance metrics; neither read nor write the metric cache "
        "($nnUNet_results/DATASET/compare_cache)",
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> list[Arm]:
    """The arms of ``-tr`` once the arguments are valid."""
    from nnunet_selfreg.evaluation.replicates import parse_arms

    if len(set(args.trainers)) != len(args.trainers):
        raise UserError(f"a trainer is given twice in -tr {' '.join(args.trainers)}")
    arms = parse_arms(args.trainers)
    if len(arms) < 2:
        raise UserError(
            "give at least two trainers (arms) with -tr: the first is the baseline, the others are compared to it "
            f"(-tr {' '.join(args.trainers)} is one arm: {arms[0].name})"
        )
    if any(f < 0 for f in args.folds):
        raise UserError(f"folds must be 0 or more, got {args.folds}")
    if not math.isfinite(args.nsd_tolerance) or args.nsd_tolerance < 0:
        raise UserError(f"--nsd-tolerance must be a finite number of mm >= 0, got {args.nsd_tolerance}")
    if args.margin is not None and not (math.isfinite(args.margin) and 0 < args.margin < 1):
        raise UserError(f"--margin must be a Dice difference between 0 and 1 (e.g. 0.01), got {args.margin}")
    if args.n_boot < 100:
        raise UserError(f"--n-boot {args.n_boot} is too few resamples for a confidence interval (use >= 100)")
    return arms


def default_output(comparison: Comparison, arms: list[str]) -> Path:
    names = "_vs_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", a).strip("-") for a in arms)
    return comparison.results_folder / f"compare_{names}_{comparison.configuration}"


def command_line(args: argparse.Namespace, output: Path) -> str:
    """The command with every option explicit (what reproduces this report)."""
    parts = [
        "nnunet-selfreg",
        "compare",
        "-d",
        str(args.dataset),
        "-c",
        args.configuration,
        "-tr",
        *args.trainers,
        "-p",
        args.plans,
        "-f",
        *map(str, args.folds),
        "-o",
        str(output),
        "--n-boot",
        str(args.n_boot),
        "--seed",
        str(args.seed),
        "--nsd-tolerance",
        str(args.nsd_tolerance),
    ]
    parts += ["--correction", args.correction]
    parts += ["--margin", str(args.margin)] if args.margin is not None else []
    parts += ["--instances", args.instances] if args.instances is not None else []
    parts += ["--no-surface"] if args.no_surface else []
    parts += ["--allow-unequal-training"] if args.allow_unequal_training else []
    parts += ["--no-cache"] if args.no_cache else []
    parts += ["--overwrite"] if args.overwrite else []
    return shlex.join(parts)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class _Progress:
    """Per-case progress on stderr with the elapsed time and an ETA; without a terminal, a line per 5 %
    of the cases or per minute."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, i: int, n: int, case: str) -> None:
        now = time.monotonic()
        if i == 0:
            self.start = self.last = now
            return
        elapsed = now - self.start
        line = f"[compare] surface metrics: case {i}/{n} ({case}), {_clock(elapsed)} elapsed"
        line += f", ETA {_clock(elapsed / i * (n - i))}" if i < n else ""
        if sys.stderr.isatty():
            print(f"\r{line}\033[K", end="\n" if i == n else "", file=sys.stderr, flush=True)
        elif i in (1, n) or i % max(1, n // 20) == 0 or now - self.last >= 60:
            self.last = now
            print(line, file=sys.stderr, flush=True)


def _announce(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def surface_metrics(comparison: Comparison, args: argparse.Namespace) -> tuple[dict | None, dict]:
    """File-based metrics per case (HD95/NSD and/or instance metrics, or None) and how they were obtained."""
    from nnunet_selfreg.evaluation.metric_cache import CACHE_FOLDER
    from nnunet_selfreg.evaluation.metrics import comparison_file_metrics

    return comparison_file_metrics(
        comparison,
        tolerance_mm=args.nsd_tolerance,
        surface=not args.no_surface,
        instances=args.instances,
        num_processes=args.num_processes,
        progress=_Progress(),
        announce=_announce,
        cache_folder=None if args.no_cache else comparison.results_folder / CACHE_FOLDER,
    )


STATISTICS = {
    "confidence_level": 0.95,
    "method": "BCa (percentile if BCa is undefined)",
    "wilcoxon": "two-sided, zero_method=wilcox",
    "run_level": "Student's two-sample t-test on the per-run means (scipy.stats.ttest_ind), df = runs - 2; "
    "smallest detectable difference at 80% power, alpha = 0.05 (statsmodels TTestIndPower)",
    "run_aware_interval": "percentile interval of a hierarchical bootstrap: in every fold, each arm's runs "
    "(deviations scaled by sqrt(K/(K-1))) and the fold's cases drawn with replacement, the same cases for "
    "both arms",
    "rank_stability": "1000 resamples of runs and cases (as for the run-aware interval), arms ranked by the "
    "mean per-case foreground Dice",
}


def _run(args: argparse.Namespace) -> int:
    from nnunet_selfreg.evaluation.comparison_report import (
        build_result,
        check_output_folder,
        console_summary,
        write_outputs,
    )
    from nnunet_selfreg.evaluation.results import build_table, check_prediction_files, emptiness, load_comparison
    from nnunet_selfreg.evaluation.stats import analyse

    arms = _check_args(args)
    runs = [run for arm in arms for run in arm.runs]
    comparison = load_comparison(
        args.dataset, args.configuration, runs, args.plans, args.folds, arms, args.allow_unequal_training
    )
    output = Path(args.output).absolute() if args.output else default_output(comparison, [a.name for a in arms])
    check_output_folder(output, args.overwrite)
    check_prediction_files(comparison, surface=not args.no_surface, instances=args.instances is not None)
    surface, surface_info = surface_metrics(comparison, args)
    table = build_table(comparison, surface)
    analysis = analyse(table, comparison.arms, args.n_boot, args.seed, args.correction, args.margin)
    statistics = {
        **STATISTICS,
        "n_resamples": args.n_boot,
        "seed": args.seed,
        "correction": args.correction,
        "equivalence_margin": args.margin,
    }
    settings = {"command": command_line(args, output), "surface": surface_info, "statistics": statistics}
    result = build_result(comparison, analysis, table, emptiness(comparison), settings)
    write_outputs(result, output, args.overwrite)
    print("\n".join(console_summary(result, output)))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CompareInputError as e:
        raise UserError(str(e)) from None
