"""benchmarks/step_cost.py plans without forking: a process with torch loaded must not fork workers.

nnU-Net's planner lists a dataset's imagesTr through a ``fork`` Pool unless the dataset.json lists the
files itself. Twice a worker of that Pool sat on a lock until the GPU script's dry run hit its 300 s
cap (docs/performance.md). This runs the benchmark's own planning in a fresh interpreter (nnU-Net
reads its folder variables at import) and counts forks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import importlib.util, json, os, sys
from pathlib import Path
import torch  # loaded before planning, as in step_cost.py
forks = []
os.register_at_fork(before=lambda: forks.append(1))
spec = importlib.util.spec_from_file_location("step_cost", sys.argv[1])
step_cost = sys.modules["step_cost"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_cost)
step_cost.setup_nnunet_env(Path(sys.argv[2]))
out = {}
for config, patch in (("3d_fullres", (16, 16, 16)), ("2d", (32, 32))):
    plans, dataset_json = step_cost.make_plans(config, patch)
    out[config] = step_cost.describe_plans(plans)
print(json.dumps({"forks": len(forks), "plans": out}))
"""


def test_planning_forks_no_worker_and_gives_nnunet_plans(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO / "benchmarks" / "step_cost.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["forks"] == 0, "nnU-Net's planner forked workers: the dataset.json needs its explicit file list"
    assert result["plans"]["3d_fullres"]["patch_size"] == [16, 16, 16]
    assert result["plans"]["3d_fullres"]["network"] == "PlainConvUNet"
    assert result["plans"]["2d"]["patch_size"] == [32, 32]
    assert result["plans"]["2d"]["n_stages"] == 4
