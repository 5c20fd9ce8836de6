"""``nnunet-selfreg sweep``: trainer x fold x run grids of nnU-Net trainings, locally or on SLURM.

The machinery, kept apart from its command line (``nnunet_selfreg/tools/sweep.py``) as submitit keeps
its executors apart from jobs:

- :mod:`~nnunet_selfreg.sweep.grid`: the grid and its checks (nnU-Net's lookup, plans, folds);
- :mod:`~nnunet_selfreg.sweep.manifest`: the JSON record of a sweep (locked, atomic updates);
- :mod:`~nnunet_selfreg.sweep.job`: one training, nnU-Net's own entry point, resumable;
- :mod:`~nnunet_selfreg.sweep.preemption`: stop signals, safe points, atomic checkpoints;
- :mod:`~nnunet_selfreg.sweep.executors`: local workers or a submitit SLURM job array;
- :mod:`~nnunet_selfreg.sweep.status` and :mod:`~nnunet_selfreg.sweep.state`: what is done, running,
  queued or failed, from nnU-Net's files, locks and ``squeue``;
- :mod:`~nnunet_selfreg.sweep.launch`: plan, launch, wait, compare.

docs/sweep.md describes its use.
"""

from nnunet_selfreg.sweep.executors import LocalExecutor, Reporter, SlurmExecutor, SlurmOptions
from nnunet_selfreg.sweep.grid import GridSpec, Job, plan_grid, run_name
from nnunet_selfreg.sweep.launch import RunOptions, SweepResult, compare_grid, find_sweep, launch, wait

__all__ = [
    "GridSpec",
    "Job",
    "LocalExecutor",
    "Reporter",
    "RunOptions",
    "SlurmExecutor",
    "SlurmOptions",
    "SweepResult",
    "compare_grid",
    "find_sweep",
    "launch",
    "plan_grid",
    "run_name",
    "wait",
]
