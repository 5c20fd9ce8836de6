#!/usr/bin/env bash
# The repeated-run study on real data (docs/results.md): 5-fold cross-validation of nnUNetTrainer and
# nnUNetTrainerSelfReg, three training runs of each (run k of X trains as X_Rep<k>), on the DSB2018
# nuclei dataset (one real image with expert labels, 25 non-overlapping tiles), all with the same fixed
# budget, then `compare` with runs as replicates (run-level test, run-to-run SD, detectable difference).
#
#   bash benchmarks/cv_dsb2018.sh [WORKDIR] [extra `nnunet-selfreg demo` options]
#
# Budget: 10 epochs x 40 iterations (batch size and patch from nnU-Net's plans: 2 x 112x112), 5 folds x
# 2 trainers x 3 runs = 30 trainings, two at a time (each with one of the two cores). Add the ablation
# with --trainers nnUNetTrainer_Budget nnUNetTrainerSelfReg_Budget nnUNetTrainerSelfReg_SCROnly_Budget
# (trained runs are reused: only the new arm trains). On a GPU, scale it up, e.g.
#   bash benchmarks/cv_dsb2018.sh cv_gpu --epochs 100 --iterations 250 --device cuda --workers 1
# The trainings run through the sweep machinery: the manifest is
# $WORKDIR/nnUNet_results/Dataset950_DSB2018Nuclei/sweeps/demo/manifest.json and
#   nnUNet_results=$WORKDIR/nnUNet_results nnunet-selfreg sweep status demo
# shows each training's state. Trained folds are reused on a re-run with the same budget, interrupted
# ones continued; results are never overwritten. The same grid on a SLURM cluster: docs/sweep.md.
set -euo pipefail
WORKDIR="${1:-cv_dsb2018}"
shift || true
time nnunet-selfreg demo --workdir "$WORKDIR" --folds 0 1 2 3 4 --epochs 10 --iterations 40 --repeats 3 \
    --workers 2 --trainers nnUNetTrainer_Budget nnUNetTrainerSelfReg_Budget "$@"
