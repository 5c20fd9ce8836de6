#!/usr/bin/env bash
# Reproducible real-data result (docs/results.md): 5-fold cross-validation of nnUNetTrainer (twice:
# the second run, nnUNetTrainer_Rep2_Budget, gives the run-to-run noise floor), nnUNetTrainerSelfReg,
# _SCROnly and _IFDOnly on the DSB2018 nuclei dataset (one real image with expert labels, 25
# non-overlapping tiles), all with the same fixed budget, then `compare`.
#
#   bash benchmarks/cv_dsb2018.sh [WORKDIR] [extra `nnunet-selfreg demo` options]
#
# Budget: 10 epochs x 40 iterations (batch size and patch from nnU-Net's plans: 2 x 112x112), 5 folds,
# 5 trainings per fold = 25 trainings; 3-4 min each on a quiet 2-core CPU (12-13 s per epoch), about
# 1.5 h in all (docs/results.md). On a GPU, scale it up, e.g.
#   bash benchmarks/cv_dsb2018.sh cv_gpu --epochs 100 --iterations 250 --device cuda
# The trainings run through the sweep machinery (the demo's training loop, one local worker): the
# manifest is $WORKDIR/nnUNet_results/Dataset950_DSB2018Nuclei/sweeps/demo/manifest.json and
#   nnUNet_results=$WORKDIR/nnUNet_results nnunet-selfreg sweep status demo
# shows each training's state. Trained folds are reused on a re-run with the same budget, interrupted
# ones continued; results are never overwritten. The same grid on a SLURM cluster: docs/sweep.md.
set -euo pipefail
WORKDIR="${1:-cv_dsb2018}"
shift || true
time nnunet-selfreg demo --workdir "$WORKDIR" --folds 0 1 2 3 4 --epochs 10 --iterations 40 --repeats 2 \
    --trainers nnUNetTrainer_Budget nnUNetTrainerSelfReg_Budget \
               nnUNetTrainerSelfReg_SCROnly_Budget nnUNetTrainerSelfReg_IFDOnly_Budget "$@"
