"""Comparing nnU-Net trainers on their cross-validation results (``nnunet-selfreg compare``).

* :mod:`.results`: read and validate result folders (``summary.json``), pair cases across models;
* :mod:`.metrics`: HD95, normalised surface Dice (MONAI) and instance metrics from the segmentation files;
* :mod:`.model`: the typed comparison (runs, arms, per-case table, results) that ``results.json`` serialises;
* :mod:`.stats`: nnU-Net's means, paired differences (bootstrap CI, Wilcoxon), ranking, verdicts;
* :mod:`.replicates`: training runs as replicates (run-level test, run-aware interval, detectable difference);
* :mod:`.calibration`: the run-level test on simulated A/A data;
* :mod:`.comparison_report`: ``results.json``, ``report.md`` and figures.
"""

from nnunet_selfreg.evaluation.results import CompareInputError, Comparison, load_comparison

__all__ = ["CompareInputError", "Comparison", "load_comparison"]
