"""``nnunet-selfreg doctor``: versions, trainer discovery, device, nnU-Net folders, and what to fix."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field

from nnunet_selfreg import _discovery
from nnunet_selfreg.nnunet_folders import ENV_VARS, unset_message
from nnunet_selfreg.report_folder import package_version

#: nnU-Net's own trainer lookup, then its own walk of every nnUNet_extTrainer folder (to name a module
#: that fails to import): one fresh interpreter, one JSON line on stdout
_PROBE = r"""
import contextlib, io, json, os, sys, traceback
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

def error(e):
    text = str(e).strip().splitlines()
    return type(e).__name__ + (": " + text[0] if text else "")

def where(e, folder):
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename).startswith(os.path.join(os.path.abspath(folder), ""))]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None

out = {"found": None, "lookup_error": None, "failures": []}
try:
    with contextlib.redirect_stdout(io.StringIO()):
        c = recursive_find_trainer_class_by_name(sys.argv[1])
    out["found"] = c.__module__ + "." + c.__qualname__
except Exception as e:
    out["lookup_error"] = error(e)
for folder in [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]:
    if not os.path.isdir(folder):
        continue
    log = io.StringIO()
    try:  # a class name no module defines: nnU-Net's walk imports every module of the folder
        with contextlib.redirect_stdout(log):
            recursive_find_python_class(folder, "NnunetSelfregDoctorNoSuchClass", None, base_folder=folder,
                                        verbose=True, cleanup_imports_from_base_folder=True)
    except Exception as e:
        inspected = [ln.split(":", 1)[1].strip() for ln in log.getvalue().splitlines()
                     if ln.strip().startswith("Inspecting module:")]
        module = inspected[-1] if inspected else None
        out["failures"].append({"folder": folder, "module": module, "error": error(e), "where": where(e, folder),
                                "file": os.path.join(folder, *module.split(".")) + ".py" if module else None})
print(json.dumps(out))
"""

#: what the .pth start-up hook runs (without its ``except Exception: pass``), on a copy of the environment
#: without our folder, so that the registration really runs and any exception is seen
_REGISTER_PROBE = r"""
import json, os, sys, traceback
env = dict(os.environ)
out = {"error": None, "changed": None, "module": None}
try:
    import nnunet_selfreg._discovery as d
    out["module"] = d.__file__
    ours = os.path.normcase(os.path.realpath(d.EXT_TRAINER_DIR))
    env[d.ENV_VAR] = os.pathsep.join(p for p in env.get(d.ENV_VAR, "").split(os.pathsep)
                                     if p.strip() and os.path.normcase(os.path.realpath(p)) != ours)
    out["changed"] = d.register(env)
except Exception as e:
    last = traceback.extract_tb(e.__traceback__)[-1]
    text = str(e).strip().splitlines()
    out["error"] = f"{type(e).__name__}" + (f": {text[0]}" if text else "") + f" ({last.filename}:{last.lineno})"
print(json.dumps(out))
"""


def _run_json(code: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """Run ``code`` in a fresh interpreter; its last stdout line parsed as JSON, or None and what went wrong."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=dict(os.environ) if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"it did not finish within {timeout:.0f} s"
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except json.JSONDecodeError:
            pass
    tail = (out.stderr or out.stdout).strip().splitlines()
    return None, tail[-1] if tail else f"exit code {out.returncode}"


@dataclass
class Lookup:
    """nnU-Net's answer for one trainer name, and the modules of ``nnUNet_extTrainer`` that fail to import."""

    found: str | None  #: ``module.Class`` nnU-Net returned, or None
    error: str  #: why the lookup failed ("" if found)
    failures: list[dict] = field(default_factory=list)  #: folder, module, file, error, where (first per folder)


def probe_discovery(trainer: str = "nnUNetTrainerSelfReg", timeout: float = 300) -> Lookup:
    """Ask nnU-Net's own trainer lookup, in a fresh interpreter, for ``trainer``; walk the extTrainer folders."""
    result, problem = _run_json(_PROBE, trainer, timeout=timeout)
    if result is None:
        return Lookup(None, f"the lookup failed: {problem}")
    return Lookup(result["found"], result["lookup_error"] or "", result["failures"])


def check_registration(env: dict[str, str] | None = None, timeout: float = 120) -> str | None:
    """Run what the ``.pth`` start-up hook runs, in a fresh interpreter; its exception (one line) or None.

    The hook swallows every exception (an error at interpreter start-up would break every Python
    program), so this is the place where a failing registration gets a reason.
    """
    result, problem = _run_json(_REGISTER_PROBE, timeout=timeout, env=env)
    if result is None:
        return f"the check itself failed: {problem}"
    return result["error"]


def _is_our_folder(folder: str) -> bool:
    want = os.path.normcase(os.path.realpath(_discovery.EXT_TRAINER_DIR))
    return os.path.normcase(os.path.realpath(folder)) == want


def import_failure_fix(failure: dict, blocks_ours: bool) -> str:
    """The problem line for a module of an ``nnUNet_extTrainer`` folder that fails to import.

    ``blocks_ours``: nnU-Net's lookup of our trainers failed (it stops at the first failing module).
    """
    what = failure["file"] or f"a module of {failure['folder']}"
    where = failure.get("where") or ""
    if failure["file"] and where.startswith(failure["file"] + ":"):
        what, where = f"{what} (line {where.rsplit(':', 1)[1]})", ""
    at = f" at {where}" if where else ""
    if _is_our_folder(failure["folder"]):
        return (
            f"our trainer shim {what} fails to import ({failure['error']}{at}): the nnunet-selfreg installation is "
            "broken; reinstall it (pip install --force-reinstall nnunet-selfreg, or pip install . from a clone)"
        )
    return (
        f"{what} fails to import ({failure['error']}{at}). nnU-Net imports every .py file of each folder in "
        f"{_discovery.ENV_VAR} and its trainer lookup stops with that error, so no trainer it has not found "
        f"before that file can be found{' (ours included)' if blocks_ours else ''}: fix the file, or move it out "
        f"of {failure['folder']}"
    )


def _device_report() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
        lines.append("nnU-Net uses the GPU by default (-device cuda) and torch.compile unless nnUNet_compile=0")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("Apple MPS available: use -device mps")
    else:
        lines.append(f"no GPU found: use -device cpu ({os.cpu_count()} CPU cores; training is slow)")
    return lines


def _opted_out() -> bool:
    return os.environ.get("NNUNET_SELFREG_NO_AUTODISCOVERY", "0") not in ("", "0")


def _export_fix() -> str:
    return f'export {_discovery.ENV_VAR}="${_discovery.ENV_VAR}{os.pathsep}{_discovery.EXT_TRAINER_DIR}"'


def _versions_section(problems: list[str]) -> None:
    print("\n[versions]")
    print(f"  python {sys.version.split()[0]} ({sys.executable})")
    for dist in ("nnunet-selfreg", "nnunetv2", "dynamic-network-architectures", "torch"):
        print(f"  {dist} {package_version(dist)}")
    nnunet_v = package_version("nnunetv2")
    if not nnunet_v.startswith("2.8"):
        problems.append(f"nnunetv2 {nnunet_v} is untested: install 'nnunetv2>=2.8,<2.9'")


def _lookup_problems(lookup: Lookup, registration_error: str) -> list[str]:
    """What to do when nnU-Net's own lookup does not find our trainers."""
    problems = [import_failure_fix(f, blocks_ours=not lookup.found) for f in lookup.failures]
    if lookup.found or lookup.failures or registration_error:
        return problems
    if _discovery.is_registered():
        return [*problems, f"nnU-Net's trainer lookup fails although our folder is listed: {lookup.error}"]
    if _opted_out():
        return [
            *problems,
            "nnU-Net cannot find our trainers: NNUNET_SELFREG_NO_AUTODISCOVERY switches the start-up hook "
            f"off. Unset it, or run: {_export_fix()}",
        ]
    return [
        *problems,
        f"nnU-Net cannot find our trainers: our folder is not in {_discovery.ENV_VAR} (the .pth "
        f"start-up hook is skipped under 'python -S' and by some environments). Run: {_export_fix()}",
    ]


def _discovery_section(skip_lookup: bool, problems: list[str]) -> None:
    print("\n[trainer discovery]")
    pth = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nnunet_selfreg_discovery.pth"))
    print(f"  start-up hook (.pth): {pth[0] if pth else 'not found in ' + sysconfig.get_paths()['purelib']}")
    print(f"  nnUNet_extTrainer = {os.environ.get(_discovery.ENV_VAR, '<unset>')}")
    print(
        f"  our shim folder: {_discovery.EXT_TRAINER_DIR} ({'listed' if _discovery.is_registered() else 'NOT listed'})"
    )
    registration_error = check_registration()
    print(f"  start-up registration: {'FAILED: ' + registration_error if registration_error else 'runs'}")
    if registration_error:
        problems.append(
            f"the start-up hook cannot register our trainer folder: {registration_error}. The hook hides this "
            "error (it runs in every Python program); fix the installation, or set the variable yourself: "
            + _export_fix()
        )
    if not skip_lookup:
        lookup = probe_discovery()
        answer = f"yes -> {lookup.found}" if lookup.found else f"NO: {lookup.error}"
        print(f"  nnU-Net finds nnUNetTrainerSelfReg: {answer}")
        for failure in lookup.failures:
            print(f"  fails to import: {failure['file'] or failure['folder']}: {failure['error']}")
        problems += _lookup_problems(lookup, registration_error)
    if _opted_out():
        print("  automatic discovery is switched off by NNUNET_SELFREG_NO_AUTODISCOVERY")


def _device_section(problems: list[str]) -> None:
    print("\n[device]")
    try:
        for line in _device_report():
            print(f"  {line}")
    except Exception as e:  # a broken torch install is itself a finding
        problems.append(f"torch does not import: {e}")


def _folders_section(problems: list[str]) -> None:
    print("\n[nnU-Net folders]")
    for var in ENV_VARS:
        value = os.environ.get(var)
        state = "unset" if value is None else ("ok" if os.path.isdir(value) else "does not exist")
        print(f"  {var} = {value or '<unset>'} ({state})")
        if value is None:
            problems.append(unset_message(var))
        elif not os.path.isdir(value):
            problems.append(f"{var} points to {value}, which does not exist: create it or fix the variable")


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    print("nnunet-selfreg doctor")
    _versions_section(problems)
    _discovery_section(args.skip_lookup, problems)
    _device_section(problems)
    _folders_section(problems)
    print("\n[summary]")
    if problems:
        for p in problems:
            print(f"  - {p}")
        return 1
    print("  everything looks fine")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check versions, trainer discovery, device and nnU-Net folders")
    p.add_argument("--skip-lookup", action="store_true", help="do not run nnU-Net's trainer lookup (saves ~10 s)")
    p.set_defaults(func=run)
