#!/usr/bin/env bash
# SS-Net on real data, the way docs/ssnet.md describes it: the demo's DSB2018 nuclei tiles (one real
# image with expert labels, 25 non-overlapping tiles), of which 10 keep their labels and the other 15
# serve as unlabelled images. add-unlabeled -> nnU-Net plan/preprocess -> nnUNetTrainer_LabeledOnly and
# nnUNetTrainerSSNet_FullRampup with the same budget on the same folds -> compare.
#
#   bash benchmarks/ssnet_dsb2018.sh [WORKDIR]            # env: FOLDS="0 1 2 3 4" EPOCHS=10 ITERATIONS=40 DEVICE=cpu
#
# With 10 labelled tiles a validation fold holds 2 cases: this shows the workflow and the cost of
# SS-Net on real data; it is not a benchmark of the method. Finished folds are reused on a re-run.
set -euo pipefail
WORKDIR="$(realpath -m "${1:-ssnet_dsb2018}")"
FOLDS="${FOLDS:-0}"
EPOCHS="${EPOCHS:-10}"
ITERATIONS="${ITERATIONS:-40}"
DEVICE="${DEVICE:-cpu}"
SOURCE_ID=960 LABELED_ID=961 SEMISUP_ID=962
TRAINERS=(nnUNetTrainer_LabeledOnly_Budget nnUNetTrainerSSNet_FullRampup_Budget)

export nnUNet_raw="$WORKDIR/nnUNet_raw" nnUNet_preprocessed="$WORKDIR/nnUNet_preprocessed"
export nnUNet_results="$WORKDIR/nnUNet_results"
export NNUNET_SELFREG_BUDGET_EPOCHS="$EPOCHS" NNUNET_SELFREG_BUDGET_ITERATIONS="$ITERATIONS"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
say() { echo "[ssnet-dsb2018 $(date +%H:%M:%S)] $*"; }

if ! compgen -G "$nnUNet_raw/Dataset${SEMISUP_ID}_*" > /dev/null; then
    say "building the labelled subset (10 tiles) and the unlabelled folder (15 tiles)"
    python - "$WORKDIR" "$SOURCE_ID" "$LABELED_ID" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

from nnunet_selfreg.data.dsb2018 import default_cache_dir, make_dsb2018_dataset

work, source_id, labeled_id = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
raw = work / "nnUNet_raw"
source = next(raw.glob(f"Dataset{source_id}_*"), None)
if source is None:
    info = make_dsb2018_dataset(raw, source_id, default_cache_dir(), offline_fallback=False)
    source = info.folder
cases = sorted(p.name[: -len("_0000.png")] for p in (source / "imagesTr").glob("*_0000.png"))
labeled = cases[::2][:10]  # every other tile of the 5x5 grid, spread over the image
unlabeled = [c for c in cases if c not in labeled]
target = raw / f"Dataset{labeled_id}_DSB2018Labeled10"
for sub in ("imagesTr", "labelsTr"):
    (target / sub).mkdir(parents=True)
for c in labeled:
    shutil.copy(source / "imagesTr" / f"{c}_0000.png", target / "imagesTr")
    shutil.copy(source / "labelsTr" / f"{c}.png", target / "labelsTr")
ds = json.loads((source / "dataset.json").read_text()) | {"numTraining": len(labeled)}
(target / "dataset.json").write_text(json.dumps(ds, indent=2))
for f in source.iterdir():  # licence and provenance files of the demo dataset
    if f.is_file() and f.name != "dataset.json":
        shutil.copy(f, target)
unl = work / "unlabeled"
unl.mkdir(exist_ok=True)
for c in unlabeled:
    shutil.copy(source / "imagesTr" / f"{c}_0000.png", unl)
print(f"labelled: {labeled}\nunlabelled: {unlabeled}")
EOF
    nnunet-selfreg add-unlabeled -d "$LABELED_ID" -i "$WORKDIR/unlabeled" -o "$SEMISUP_ID"
fi
if ! compgen -G "$nnUNet_preprocessed/Dataset${SEMISUP_ID}_*/nnUNetPlans_2d" > /dev/null; then
    say "nnUNetv2_plan_and_preprocess"
    nnUNetv2_plan_and_preprocess -d "$SEMISUP_ID" -c 2d -np 2 -npfp 2 --verify_dataset_integrity
fi
for fold in $FOLDS; do
    for trainer in "${TRAINERS[@]}"; do
        if compgen -G "$nnUNet_results/Dataset${SEMISUP_ID}_*/${trainer}__nnUNetPlans__2d/fold_${fold}/checkpoint_final.pth" > /dev/null; then
            say "$trainer fold $fold: done, reusing it"
            continue
        fi
        say "$trainer fold $fold: $EPOCHS epochs x $ITERATIONS iterations on $DEVICE"
        nnUNetv2_train "$SEMISUP_ID" 2d "$fold" -tr "$trainer" -device "$DEVICE" \
            | grep --line-buffered -E "Epoch time|Mean Validation Dice|SS-Net: batch|Fold $fold:"
    done
done
say "compare"
# shellcheck disable=SC2086
nnunet-selfreg compare -d "$SEMISUP_ID" -c 2d -tr "${TRAINERS[@]}" -f $FOLDS -o "$WORKDIR/report_$(date +%Y%m%d_%H%M%S)"
