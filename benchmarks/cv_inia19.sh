#!/usr/bin/env bash
# 3D real-data cross-validation (docs/inia19.md): 5 folds of nnUNetTrainer vs nnUNetTrainerSelfReg,
# configuration 3d_fullres, on the INIA19 macaque template (20 non-overlapping 32^3 blocks of 0.5 mm,
# NeuroMaps atlas grouped into 5 classes; Debian mricron-data .deb, sha256-checked), same fixed
# budget for both trainers, then `compare`.
#
#   bash benchmarks/cv_inia19.sh [WORKDIR] [extra `nnunet-selfreg demo` options, e.g. --deb FILE]
#
# Budget: 20 epochs x 50 iterations (1000 SGD steps of nnU-Net's planned batch: 2 x 32^3), 5 validation
# iterations per epoch, 5 folds, 2 trainers = 10 trainings. Not run yet. Estimated from measured CPU
# time (about 3.3 CPU-seconds per training iteration with data augmentation, baseline and SelfReg alike;
# docs/inia19.md): about 55 CPU-minutes per training, 5-6 h on an idle 2-core CPU, much longer on a
# shared one. Add the ablations with
#   --trainers nnUNetTrainer_Budget nnUNetTrainerSelfReg_Budget \
#              nnUNetTrainerSelfReg_SCROnly_Budget nnUNetTrainerSelfReg_IFDOnly_Budget   (twice the time)
# On a GPU, scale it up, e.g.
#   bash benchmarks/cv_inia19.sh cv_inia19_gpu --epochs 100 --iterations 250 --val-iterations 20 --device cuda
# Trained folds are reused on a re-run with the same budget; results are never overwritten.
set -euo pipefail
WORKDIR="${1:-cv_inia19}"
shift || true
time nnunet-selfreg demo --dataset inia19 --workdir "$WORKDIR" --folds 0 1 2 3 4 \
    --epochs 20 --iterations 50 --val-iterations 5 \
    --trainers nnUNetTrainer_Budget nnUNetTrainerSelfReg_Budget "$@"
