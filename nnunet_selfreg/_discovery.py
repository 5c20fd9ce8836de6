"""Make nnU-Net's trainer lookup find our trainers with no manual step.

nnU-Net 2.8 looks for trainer classes in its own package first, then in every folder listed in
the ``nnUNet_extTrainer`` environment variable (``os.pathsep``-separated). The wheel ships a
``.pth`` file that calls :func:`register` at interpreter start-up; it *appends* our shim folder
(``nnunet_selfreg/ext_trainers``) to the variable, so a user's own folders keep working and keep
precedence. The shim re-exports our trainers by absolute import, so the classes stay
``nnunet_selfreg.trainers.*`` objects (picklable, one class object per name).

This module must stay import-light (standard library only): it runs in every Python process.
"""

from __future__ import annotations

import os

ENV_VAR = "nnUNet_extTrainer"
EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def _entries(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p.strip()]


def is_registered(environ: dict[str, str] | None = None) -> bool:
    """True if our shim folder is listed in ``nnUNet_extTrainer``."""
    env = os.environ if environ is None else environ
    want = os.path.normcase(os.path.realpath(EXT_TRAINER_DIR))
    return any(os.path.normcase(os.path.realpath(p)) == want for p in _entries(env.get(ENV_VAR)))


def register(environ: dict[str, str] | None = None) -> bool:
    """Append our shim folder to ``nnUNet_extTrainer`` unless it is listed already.

    Returns True if the variable was changed. Set ``NNUNET_SELFREG_NO_AUTODISCOVERY=1`` to opt out.
    """
    env = os.environ if environ is None else environ
    if env.get("NNUNET_SELFREG_NO_AUTODISCOVERY", "0") not in ("", "0"):
        return False
    if is_registered(env):
        return False
    env[ENV_VAR] = os.pathsep.join([*_entries(env.get(ENV_VAR)), EXT_TRAINER_DIR])
    return True
