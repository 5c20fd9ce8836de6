"""``nnunet-selfreg doctor``: versions, trainer discovery, device, nnU-Net folders, and what to fix."""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
from importlib import metadata

from nnunet_selfreg import _discovery
from nnunet_selfreg.nnunet_folders import ENV_VARS, unset_message

_PROBE = (
    "import sys\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
    "import contextlib, io\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    c = f(sys.argv[1])\n"
    "print(c.__module__ + '.' + c.__qualname__)\n"
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def probe_discovery(trainer: str = "nnUNetTrainerSelfReg", timeout: float = 300) -> tuple[bool, str]:
    """Ask nnU-Net's own trainer lookup, in a fresh interpreter, for ``trainer``."""
    env = dict(os.environ)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, trainer], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"the lookup did not finish within {timeout:.0f} s"
    if out.returncode == 0:
        return True, out.stdout.strip().splitlines()[-1]
    tail = (out.stderr or out.stdout).strip().splitlines()
    return False, tail[-1] if tail else f"exit code {out.returncode}"


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


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    print("nnunet-selfreg doctor")
    print("\n[versions]")
    print(f"  python {sys.version.split()[0]} ({sys.executable})")
    for dist in ("nnunet-selfreg", "nnunetv2", "dynamic-network-architectures", "torch"):
        print(f"  {dist} {_version(dist)}")
    nnunet_v = _version("nnunetv2")
    if not nnunet_v.startswith("2.8"):
        problems.append(f"nnunetv2 {nnunet_v} is untested: install 'nnunetv2>=2.8,<2.9'")

    print("\n[trainer discovery]")
    pth = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nnunet_selfreg_discovery.pth"))
    print(f"  start-up hook (.pth): {pth[0] if pth else 'not found in ' + sysconfig.get_paths()['purelib']}")
    print(f"  nnUNet_extTrainer = {os.environ.get(_discovery.ENV_VAR, '<unset>')}")
    print(
        f"  our shim folder: {_discovery.EXT_TRAINER_DIR} ({'listed' if _discovery.is_registered() else 'NOT listed'})"
    )
    if not args.skip_lookup:
        ok, detail = probe_discovery()
        print(f"  nnU-Net finds nnUNetTrainerSelfReg: {'yes -> ' + detail if ok else 'NO: ' + detail}")
        if not ok:
            problems.append(
                f"nnU-Net cannot find our trainers. Run: export {_discovery.ENV_VAR}="
                f'"${_discovery.ENV_VAR}{os.pathsep}{_discovery.EXT_TRAINER_DIR}" '
                "(the .pth start-up hook is skipped under 'python -S' and by some environments)"
            )
    if os.environ.get("NNUNET_SELFREG_NO_AUTODISCOVERY", "0") not in ("", "0"):
        print("  automatic discovery is switched off by NNUNET_SELFREG_NO_AUTODISCOVERY")

    print("\n[device]")
    try:
        for line in _device_report():
            print(f"  {line}")
    except Exception as e:  # a broken torch install is itself a finding
        problems.append(f"torch does not import: {e}")

    print("\n[nnU-Net folders]")
    for var in ENV_VARS:
        value = os.environ.get(var)
        state = "unset" if value is None else ("ok" if os.path.isdir(value) else "does not exist")
        print(f"  {var} = {value or '<unset>'} ({state})")
        if value is None:
            problems.append(unset_message(var))
        elif not os.path.isdir(value):
            problems.append(f"{var} points to {value}, which does not exist: create it or fix the variable")

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
