"""The mutation check (``benchmarks/mutation_check.py``): every listed mutant must make one of its tests fail.

The whole check (which first checks that nnU-Net's trainer lookup imports the copy) is the ``mutation``
tier; ``.ci/run`` runs it after the other tiers. The default run only checks that the list still fits
the code: each mutant's snippet occurs exactly once and its tests exist, so a refactoring that moves
a snippet fails here at once instead of in the long tier.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mutation_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutant_fits_the_current_code():
    check = _module()
    check.check_list()  # raises with the mutant's name and what to update
    assert len(check.MUTANTS) >= 12
    # and a snippet that is gone is reported, not silently skipped
    stale = check.Mutant("stale", "nnunet_selfreg/losses/vat.py", "no such code", "x", ("tests/test_ssnet_losses.py",))
    with pytest.raises(check.MutationCheckError, match="stale: its original snippet occurs 0 times"):
        check.check_list((stale,))


@pytest.mark.mutation
def test_every_mutant_is_killed():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
