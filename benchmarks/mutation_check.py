"""Mutation check: every deliberate bug below (a *mutant*) in a method's core must make a test fail.

The parity and unit tests are only worth something if they fail when the method is wrong. For each
mutant this copies the package and the tests to a fresh temporary folder, replaces the mutant's exact
original snippet (it must occur exactly once, so the list cannot silently rot when the code changes)
and runs the mutant's tests there. The child processes see the copy only: ``PYTHONPATH`` is the copy,
and ``nnUNet_extTrainer`` lists the copy's trainer shim instead of ours, so nnU-Net's own trainer
lookup (and the ``.pth`` start-up hook, which then finds it registered) imports the mutated trainers
too; a probe checks that before any mutant runs. The unmutated copy must pass every listed test
first, so that a failure means the mutant was caught. A mutant is *killed* when at least one of its
tests fails; the check exits 1 if one survives, if its snippet is not found, or if a listed test
does not exist or fails without a mutant.

    python benchmarks/mutation_check.py               # every mutant (docs/testing.md: the table and its cost)
    python benchmarks/mutation_check.py --only m2snet  # mutants whose name contains "m2snet"
    python benchmarks/mutation_check.py --list         # the mutants and their tests, nothing run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: what a copy holds: the package, the tests, and the pytest configuration (markers, default deselection)
COPIED = ("nnunet_selfreg", "tests", "pyproject.toml")
SHIM = Path("nnunet_selfreg", "ext_trainers")
TIMEOUT_S = 1200  # per pytest run; a mutant that hangs a test is reported as killed by the timeout


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids (a function id runs all its parametrisations)
    what: str = ""


_SELFREG_PARITY = "tests/test_parity_selfreg.py::test_regulariser_total_and_gradients_match_reference"
_M2SNET_DECODER = "tests/test_parity_m2snet.py::test_decoder_matches_reference"
_M2SNET_UNIT = "tests/test_parity_m2snet.py::test_subtraction_unit_matches_reference"
_VAT_PARITY = "tests/test_parity_ssnet.py::test_vat_step_matches_the_reference"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "selfreg_taps_e1",
        "nnunet_selfreg/taps.py",
        "        decoder_channels=tuple(reversed(enc_ch[:-1])),\n        first_student=1,\n",
        "        decoder_channels=tuple(reversed(enc_ch[:-1])),\n        first_student=0,\n",
        (
            "tests/test_taps.py::test_stage_with_one_channel_rejected_before_training",
            "tests/test_trainer.py::test_variants_and_options_reach_the_loss",
        ),
        "the U-Net tap declaration makes e_1 a student",
    ),
    Mutant(
        "selfreg_regulariser_includes_e1",
        "nnunet_selfreg/losses/selfreg.py",
        "return list(encoder_features[0 if self.include_first_encoder else 1 :]), list(decoder_features[:-1])",
        "return list(encoder_features), list(decoder_features[:-1])",
        (_SELFREG_PARITY, "tests/test_losses.py::test_first_encoder_map_is_ignored_by_default"),
        "the regulariser's default students include e_1",
    ),
    Mutant(
        "selfreg_ifd_first_half_detached",
        "nnunet_selfreg/losses/selfreg.py",
        "return _IFDLoss.apply(features, order, not detach_first_half)",
        "return _IFDLoss.apply(features, order, False)",
        (
            _SELFREG_PARITY,
            "tests/test_losses.py::test_ifd_gradients_both_halves_or_detached_first_half",
            "tests/test_losses_grad.py::test_ifd_backward_matches_autograd",
        ),
        "IFD's first half never gets a gradient (the paper text, not the reference code)",
    ),
    Mutant(
        "selfreg_ifd_without_l2_normalisation",
        "nnunet_selfreg/losses/selfreg.py",
        "scores = (sums / norms).mean(dim=0) / flat.shape[2]",
        "scores = sums.mean(dim=0) / flat.shape[2]",
        (
            "tests/test_parity_selfreg.py::test_ifd_per_map_matches_reference",
            "tests/test_losses.py::test_ifd_odd_channels_by_hand",
        ),
        "channels ranked by their plain mean, not after L2-normalising each over space",
    ),
    Mutant(
        "selfreg_scr_backward_sign_teacher_side",
        "nnunet_selfreg/losses/selfreg.py",
        "diff.sub_(t).mul_(scale)",
        "diff.sub_(t).mul_(-scale)",
        (_SELFREG_PARITY, "tests/test_losses_grad.py::test_scr_backward_matches_autograd"),
        "SCR gradient sign flipped where the teacher has fewer channels (every U-Net student)",
    ),
    Mutant(
        "selfreg_scr_backward_sign_student_side",
        "nnunet_selfreg/losses/selfreg.py",
        "return grad.sub_(s).mul_(-scale).to(s.dtype), None, None, None",
        "return grad.sub_(s).mul_(scale).to(s.dtype), None, None, None",
        (_SELFREG_PARITY, "tests/test_losses_grad.py::test_scr_backward_matches_autograd"),
        "SCR gradient sign flipped where the student has fewer channels",
    ),
    Mutant(
        "m2snet_depthwise_fixed_kernel",
        "nnunet_selfreg/networks/m2snet.py",
        "        self.mode = mode\n",
        '        self.mode = "depthwise"\n',
        (
            _M2SNET_DECODER,
            _M2SNET_UNIT,
            "tests/test_m2snet.py::test_full_fixed_filter_sums_all_channels_like_the_ones_kernel",
        ),
        "fixed filters ones(C, 1, k, k) per channel instead of the authors' ones(C, C, k, k)",
    ),
    Mutant(
        "m2snet_level_conv_removed",
        "nnunet_selfreg/networks/m2snet.py",
        "levels = [conv(s) for conv, s in zip(self.levels, sums, strict=False)] + [sums[-1]]",
        "levels = list(sums)",
        (_M2SNET_DECODER, "tests/test_m2snet.py::test_residual_encoder_plans_train_step_and_default_width"),
        "level_i = the sum of the units, without its CNA",
    ),
    Mutant(
        "m2snet_encoder_feature_added_to_levels",
        "nnunet_selfreg/networks/m2snet.py",
        "        sums = self.pyramid([reduce(x) for reduce, x in zip(self.reduce, skips, strict=True)])\n"
        "        levels = [conv(s) for conv, s in zip(self.levels, sums, strict=False)] + [sums[-1]]\n",
        "        reduced = [reduce(x) for reduce, x in zip(self.reduce, skips, strict=True)]\n"
        "        sums = self.pyramid(reduced)\n"
        "        levels = [conv(s) + f for conv, s, f in zip(self.levels, sums, reduced, strict=False)] + [sums[-1]]\n",
        (_M2SNET_DECODER,),
        "level_i = CNA(sum of the units) + f_i (the reduced encoder feature)",
    ),
    Mutant(
        "m2snet_joint_norm_statistics_in_unit",
        "nnunet_selfreg/networks/m2snet.py",
        "            diff = diff + (p(a) - p(b)).abs()\n",
        "            pa, pb = p(torch.cat([a, b])).chunk(2)\n            diff = diff + (pa - pb).abs()\n",
        (_M2SNET_DECODER, _M2SNET_UNIT),
        "P_k(A) and P_k(B) normalised with joint batch statistics (one norm call on both)",
    ),
    Mutant(
        "ssnet_vat_normalised_over_the_batch",
        "nnunet_selfreg/losses/vat.py",
        "norm = d.float().flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))",
        "norm = d.float().norm()",
        (_VAT_PARITY, "tests/test_ssnet_losses.py::test_l2_normalize_per_sample"),
        "VAT directions normalised over the whole batch instead of per sample",
    ),
    Mutant(
        "ssnet_soft_dice_plain_denominator",
        "nnunet_selfreg/losses/vat.py",
        "denominator = (q * q).sum(dims) + (p * p).sum(dims)",
        "denominator = q.sum(dims) + p.sum(dims)",
        (_VAT_PARITY, "tests/test_ssnet_losses.py::test_soft_dice_distance_by_hand"),
        "2D soft Dice with Σq + Σp instead of the reference's Σq² + Σp²",
    ),
    Mutant(
        "ssnet_selector_input_not_detached",
        "nnunet_selfreg/losses/class_separation.py",
        "a = _rescaled_sigmoid(selectors[c](zc.detach()))",
        "a = _rescaled_sigmoid(selectors[c](zc))",
        ("tests/test_parity_ssnet.py::test_class_separation_matches_the_reference_with_its_memory_weights",),
        "the feature-side selector's gradient reaches the features",
    ),
    Mutant(
        "ssnet_labelled_patch_never_foreground_forced",
        "nnunet_selfreg/data/mixed_batches.py",
        "forced = self.num_labeled * stock_forced_foreground(reference, self.oversample_foreground_percent)",
        "forced = reference * stock_forced_foreground(self.num_labeled, self.oversample_foreground_percent)",
        ("tests/test_ssnet_trainer.py::test_labeled_patches_get_stock_nnunets_share_of_forced_foreground",),
        "nnU-Net's rule applied to the labelled part alone: a single labelled patch is never forced",
    ),
    Mutant(
        "ssnet_heads_clipped_by_default",
        "nnunet_selfreg/trainers/ssnet.py",
        "self.ssnet_head_grad_clip: float | None = None",
        "self.ssnet_head_grad_clip: float | None = 12.0",
        ("tests/test_ssnet_trainer.py::test_head_gradients_are_clipped_only_when_asked",),
        "the heads' gradients clipped at 12 by default (the reference clips nothing)",
    ),
)


class MutationCheckError(RuntimeError):
    """The mutant list does not fit the code (snippet not found, test missing) or the baseline fails."""


def test_file(node: str) -> Path:
    return REPO / node.split("::", 1)[0]


def check_list(mutants: tuple[Mutant, ...] = MUTANTS, root: Path = REPO) -> None:
    """Every original snippet occurs exactly once, every replacement differs, every test file exists."""
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise MutationCheckError(f"mutant names must be unique: {names}")
    for m in mutants:
        text = (root / m.path).read_text()
        count = text.count(m.original)
        if count != 1:
            raise MutationCheckError(
                f"{m.name}: its original snippet occurs {count} times in {m.path} (expected once); "
                f"the code changed: update the mutant in {Path(__file__).name}"
            )
        if m.replacement == m.original or not m.tests:
            raise MutationCheckError(f"{m.name}: the replacement must differ and at least one test must be listed")
        for node in m.tests:
            path = test_file(node)
            func = node.split("::", 1)[1].split("[", 1)[0] if "::" in node else None
            if not path.is_file() or (func and f"def {func}(" not in path.read_text()):
                raise MutationCheckError(f"{m.name}: test {node} does not exist")


def make_copy(dest: Path) -> Path:
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def child_env(root: Path) -> dict[str, str]:
    """The environment of a run in ``root``: the copy first on the path and in nnU-Net's trainer lookup."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    keep = [
        p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip() and Path(p).parts[-2:] != SHIM.parts
    ]
    env["nnUNet_extTrainer"] = os.pathsep.join([*keep, str(root / SHIM)])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


PROBE = (
    "import inspect, json, nnunet_selfreg\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
    "print(json.dumps([nnunet_selfreg.__file__, inspect.getfile(find('nnUNetTrainerSelfReg'))]))\n"
)


def check_discovery(root: Path) -> None:
    """The package and the trainer nnU-Net's lookup returns both come from the copy ``root``."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=root, env=child_env(root), capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise MutationCheckError(f"the discovery probe failed in {root}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    outside = [f for f in files if not Path(f).resolve().is_relative_to(root.resolve())]
    if outside:
        raise MutationCheckError(f"in a copy, these come from outside it: {outside} (PYTHONPATH / nnUNet_extTrainer)")


@dataclass
class Run:
    failed: list[str]
    ran: list[str]
    seconds: float
    timed_out: bool = False
    output: str = ""


def run_tests(root: Path, tests: tuple[str, ...]) -> Run:
    """pytest on ``tests`` in the copy ``root``; failed and executed node ids from its JUnit report."""
    report = root / "report.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=child_env(root), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Run(["(timeout)"], [], time.perf_counter() - start, timed_out=True)
    seconds = time.perf_counter() - start
    failed, ran = [], []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            node = f"{module}.py::{case.get('name')}" if module else case.get("name", "?")
            if case.find("skipped") is not None:
                continue
            ran.append(node)
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(node)
    return Run(failed, ran, seconds, output=proc.stdout[-3000:] + proc.stderr[-2000:])


def check_baseline(root: Path, mutants: tuple[Mutant, ...]) -> float:
    """Every listed test runs and passes on the unmutated copy; returns the run's seconds."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    run = run_tests(root, tests)
    if run.failed or run.timed_out:
        raise MutationCheckError(f"without a mutant these tests fail: {run.failed}\n{run.output}")
    missing = [t for t in tests if not any(r == t or r.startswith(t + "::") or r.startswith(t + "[") for r in run.ran)]
    if missing:
        raise MutationCheckError(f"these listed tests did not run (deselected by a marker, or renamed): {missing}")
    return run.seconds


def grouped(nodes: list[str]) -> list[str]:
    """Failed node ids per test function: ``tests/f.py::test_x`` [param, param]."""
    params: dict[str, list[str]] = {}
    for node in nodes:
        base, _, param = node.partition("[")
        params.setdefault(base, []).append(param.rstrip("]"))
    return [f"`{base}`" + (f" [{', '.join(p)}]" if any(p) else "") for base, p in params.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = parser.parse_args(argv)
    mutants = tuple(m for m in MUTANTS if args.only in m.name)
    if not mutants:
        print(f"no mutant name contains {args.only!r}", file=sys.stderr)
        return 2
    check_list(mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name}  ({m.path}: {m.what})\n    " + "\n    ".join(m.tests))
        return 0
    start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    results: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        base = make_copy(Path(tmp) / "unmutated")
        check_discovery(base)
        seconds = check_baseline(base, mutants)
        print(f"unmutated copy: every listed test passes ({seconds:.0f} s); nnU-Net's trainer lookup uses the copy")
        for i, m in enumerate(mutants, 1):
            root = make_copy(Path(tmp) / m.name)
            path = root / m.path
            path.write_text(path.read_text().replace(m.original, m.replacement))
            run = results[m.name] = run_tests(root, m.tests)
            verdict = f"KILLED by {len(run.failed)} test(s)" if run.failed else "SURVIVED"
            print(f"[{i}/{len(mutants)}] {m.name}: {verdict} ({run.seconds:.0f} s)", flush=True)
            shutil.rmtree(root)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("\n| mutant | file | what it breaks | failing tests |\n|---|---|---|---|")
    for m in mutants:
        shown = "; ".join(grouped(results[m.name].failed))
        print(f"| `{m.name}` | `{m.path}` | {m.what} | {shown or '**SURVIVED**'} |")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"\n{len(mutants)} mutants, wall {time.perf_counter() - start:.0f} s, CPU of the test runs {cpu:.0f} s")
    survivors = [m.name for m in mutants if not results[m.name].failed]
    if survivors:
        print(f"SURVIVED: {', '.join(survivors)}: strengthen or add a test that catches each", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
