#!/usr/bin/env bash
# All GPU checks of the project in one command of at most 8 minutes on one H200, plus a CPU dry run.
#
# What it does, each step a section with its own `timeout` (device caps, seconds; they sum to 470 < 480,
# and a global deadline at 465 s stops the next section from starting when time is short; the
# sections run one after the other except the dataset's, so they end by 435 s at the latest):
#   install  25  pip-installs the Python packages the bare GPU machine lacks from .device_wheels/
#                (made here by benchmarks/device_wheels.sh; see "Wheels" below) into a folder outside
#                the checkout (skipped without .device_wheels/ where nnU-Net imports already); this
#                checkout is imported through PYTHONPATH, our trainers are found through
#                nnUNet_extTrainer (the wheel's .pth file does that on a normal install).
#   env      25  torch / CUDA / GPU name, nnunetv2 and our trainers import (the first imports on a fresh
#                machine compile the carried packages' bytecode); the rest is skipped if they fail.
#   step_cost_3d_fullres 150, step_cost_2d 75
#                benchmarks/step_cost.py --device cuda --amp --compile --variants all on nnU-Net's plans
#                for a 128^3 (3d_fullres, batch 2) and a 512^2 (2d, batch 12) dataset: stock
#                nnUNetTrainer, SelfReg, SCR-only, IFD-only, SS-Net, M2SNet, M2SNet without LossNet.
#                M2SNet runs nnUNetTrainerM2SNet_RandomLossNet where it exists (else nnUNetTrainerM2SNet
#                without a weights file, which builds the same random VGG-16): a random LossNet has
#                the ImageNet one's layers and input size, so the same cost, and needs no weights file.
#                Peak GPU memory per trainer from torch.cuda.max_memory_allocated (step_cost.py's doc).
#                --max-seconds keeps each run inside its cap: a trainer whose compile has not finished
#                by 70 % of it is dropped and named in the JSON, so the others are still timed.
#   dataset  35  (in the background during step_cost_3d_fullres) a synthetic 3D dataset
#                (nnunet_selfreg.data.synthetic, 10 cases 16x48x48: a small 4-stage network, quick to
#                compile), nnUNetv2_plan_and_preprocess 3d_fullres.
#   train   125  nnUNetv2_train of nnUNetTrainerSelfReg_Budget (3 epochs x 8 iterations, 2 validation
#                iterations) with nnUNet_compile=t; its log must show "Using torch.compile" and one
#                "SelfReg epoch means: ... (8 steps)" line per epoch with finite values: the taps'
#                hooks fired inside the compiled network (a missed hook raises in the loss).
#   predict  35  nnUNetv2_predict of 2 cases with the trained model (nnUNet_compile=f: the compiled
#                network's sliding-window prediction already ran in the training's final validation).
#
# Output, in the folder given as the argument, else $OUT (8 files at most, so that the folder is quick
# to copy back): summary.json (always written, also when a section fails or times out; the exit status
# is 0 only if it says "ok": true), device_check.log (everything printed), step_cost_3d_fullres.json,
# step_cost_2d.json, nnunet_training_log.txt. docs/performance.md says how to read them. The last
# lines printed are a short table.
#
# Run on the GPU machine, from the repository root of a checkout that holds .device_wheels (made by
# `bash benchmarks/device_wheels.sh` on a machine with PyPI), with a limit of 9 minutes (a minute is
# left for the machine's start):
#   OUT=/path/to/results bash benchmarks/device_check.sh
# Dry run on any machine (CPU, tiny sizes, no AMP / compile, 1 step; tests/test_device_check.py):
#   bash benchmarks/device_check.sh --dry-run OUTDIR
#
# Wheels: the H200 image has Python 3.12 with torch, torchvision, triton, numpy, scipy, scikit-image,
# scikit-learn, pandas, matplotlib, tifffile, einops, timm, httpx, msgpack, rich (as the image lists
# them), but not nnU-Net. benchmarks/device_wheels.sh fetches the 11 wheels it lacks: nnunetv2 2.8.1,
# acvl-utils, batchgenerators, batchgeneratorsv2, dynamic-network-architectures, blosc2, ndindex,
# SimpleITK, nibabel, connected-components-3d, and timm 1.0.22 (pinned below 1.0.23 by
# dynamic-network-architectures; the image's version is unknown). As downloaded they take 69.2 MiB
# (SimpleITK alone 50.3 MiB), more than the 64 MiB the checkout copied to the GPU machine may hold,
# so device_wheels.sh recompresses SimpleITK's wheel with LZMA (still a wheel: pip reads LZMA zip
# members) to 27.4 MiB: 46.3 MiB in all (measured 2026-12-03). If the set ever stops fitting, the
# alternative is two copies in a row: the first holds SimpleITK's wheel alone and installs it into an
# ignored folder of the checkout on that machine, the second holds the rest.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; }

DRY_RUN=0
OUTDIR="${OUT:-}"
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
if [[ -z "$OUTDIR" ]]; then
  echo "no output folder: give one as the argument, or set OUT (see --help)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"
SITE="$WORK/site"
SECTIONS="$WORK/sections.tsv"
: >"$SECTIONS"
exec > >(tee -a "$OUTDIR/device_check.log") 2>&1

START=$SECONDS
DATASET_ID=613
if ((DRY_RUN)); then
  # caps only against hangs: on a shared 2-core machine under load 15 the sections took 4-6x their idle times
  MODE=dry-run DEADLINE=1500 DEVICE=cpu
  CAP_INSTALL=0 CAP_ENV=120 CAP_STEP3D=300 CAP_STEP2D=240 CAP_DATASET=600 CAP_TRAIN=600 CAP_PREDICT=400
  STEP_COMMON=(--device cpu --no-amp --no-compile --batch 2 --warmup 0 --steps 1 --threads 1
    --lossnet-input-size 32 --lossnet-max-slices 1)
  PATCH_3D=(--patch 16 16 16) PATCH_2D=(--patch 32 32)
  N_CASES=5 CASE_SHAPE="16 32 32" N_PROC=1 N_PRED_PROC=0 N_PROC_DA=0 COMPILE=f
  EPOCHS=1 ITERATIONS=2 VAL_ITERATIONS=1 N_PREDICT=1
  export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
else
  MODE=device DEADLINE=465 DEVICE=cuda
  CAP_INSTALL=25 CAP_ENV=25 CAP_STEP3D=150 CAP_STEP2D=75 CAP_DATASET=35 CAP_TRAIN=125 CAP_PREDICT=35
  STEP_COMMON=(--device cuda --amp --compile --warmup 2 --steps 10)
  PATCH_3D=() PATCH_2D=()
  N_CASES=10 CASE_SHAPE="16 48 48" N_PROC=8 N_PRED_PROC=2 N_PROC_DA=6 COMPILE=t
  EPOCHS=3 ITERATIONS=8 VAL_ITERATIONS=2 N_PREDICT=2
fi
export REPO PY SITE WORK DEVICE DATASET_ID N_CASES CASE_SHAPE N_PROC N_PRED_PROC N_PREDICT COMPILE
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NNUNET_SELFREG_NO_AUTODISCOVERY=1 nnUNet_extTrainer="$REPO/nnunet_selfreg/ext_trainers"
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
# nnUNet_n_proc_DA for training only: nnU-Net's planner sets torch's threads from it (0 is refused there)
export nnUNet_def_n_proc="$N_PROC" nnUNet_n_proc_DA="$N_PROC" N_PROC_DA
export NNUNET_SELFREG_BUDGET_EPOCHS="$EPOCHS" NNUNET_SELFREG_BUDGET_ITERATIONS="$ITERATIONS"
export NNUNET_SELFREG_BUDGET_VAL_ITERATIONS="$VAL_ITERATIONS"
unset NNUNET_SELFREG_VGG16_WEIGHTS # M2SNet is timed with a random LossNet (same cost)
TRAINER=nnUNetTrainerSelfReg_Budget
export TRAINER

elapsed() { echo $((SECONDS - START)); }
# children_cpu PID: CPU seconds (user + system) of the finished (waited-for) children of shell PID so far
CLK_TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
children_cpu() { awk -v t="$CLK_TCK" '{ sub(/.*\) /, ""); printf "%.1f", ($14 + $15) / t }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run_section NAME CAP COMMAND...: run under `timeout` (the smaller of CAP and the time left before the
# global deadline), and append "name status rc seconds timeout cpu-seconds" to $SECTIONS.
run_section() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(elapsed) - 5))
  local t=$((cap < left ? cap : left))
  if ((t < 5)); then
    echo "=== [$name] skipped: global deadline (${DEADLINE}s) reached"
    printf '%s\tskipped\t\t0\t%s\t0\tglobal deadline\n' "$name" "$cap" >>"$SECTIONS"
    return 1
  fi
  echo "=== [$name] $(date -u +%H:%M:%S), ${t}s at most: $*"
  local t0=$SECONDS me=$BASHPID cpu0 rc status
  cpu0=$(children_cpu "$me")
  timeout -k 10 "$t" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "=== [$name] $status (exit $rc) after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$t" \
    "$(awk -v a="$cpu0" -v b="$(children_cpu "$me")" 'BEGIN { printf "%.1f", b - a }')" >>"$SECTIONS"
  return "$rc"
}

skip_section() {
  echo "=== [$1] skipped: $2"
  printf '%s\tskipped\t\t0\t0\t0\t%s\n' "$1" "$2" >>"$SECTIONS"
}

# An nnU-Net command through its console-script entry point, with this script's Python.
nnunet() {
  local entry
  case "$1" in
    nnUNetv2_plan_and_preprocess) entry=nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry ;;
    nnUNetv2_train) entry=nnunetv2.run.run_training:run_training_entry ;;
    nnUNetv2_predict) entry=nnunetv2.inference.predict_from_raw_data:predict_entry_point ;;
    *) echo "unknown nnU-Net command $1" >&2; return 2 ;;
  esac
  "$PY" -c 'import importlib, sys
module, func = sys.argv[1].split(":")
sys.argv = sys.argv[2:]
sys.exit(getattr(importlib.import_module(module), func)())' "$entry" "$@"
}

install_wheels() {
  local wheels="$REPO/.device_wheels"
  if [[ ! -f "$wheels/requirements.txt" ]]; then
    echo "no $wheels/requirements.txt: run 'bash benchmarks/device_wheels.sh' in the checkout and name" \
      ".device_wheels in the checkout that runs on the GPU machine"
    return 2
  fi
  "$PY" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" -r "$wheels/requirements.txt"
}

check_env() {
  "$PY" - <<'EOF'
import json, os, platform, subprocess, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
import torch
info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,memory.used",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"not available: {e}"
import importlib.metadata as md
import nnunetv2
info["nnunetv2"] = md.version("nnunetv2")
import nnunet_selfreg.trainers as t
info["nnunet_selfreg"] = os.path.dirname(os.path.dirname(os.path.abspath(t.__file__)))
info["random_lossnet_trainer"] = hasattr(t, "nnUNetTrainerM2SNet_RandomLossNet")
from nnunetv2.run.run_training import get_trainer_from_args  # noqa: F401  (nnU-Net's training imports)
missing = [n for n in (os.environ["TRAINER"],) if not hasattr(t, n)]
info["trainer_missing"] = missing
json.dump(info, open(os.path.join(os.environ["WORK"], "env.json"), "w"), indent=1)
print(json.dumps(info, indent=1))
if os.environ["DEVICE"] == "cuda" and not info["cuda_available"]:
    sys.exit("CUDA is not available to torch")
if missing:
    sys.exit(f"trainer {missing} not found in nnunet_selfreg.trainers")
EOF
}

make_dataset() {
  "$PY" -c 'import os
from nnunet_selfreg.data.synthetic import make_synthetic_dataset
make_synthetic_dataset(os.environ["nnUNet_raw"], int(os.environ["DATASET_ID"]), name="DeviceCheck", dim=3,
                       num_cases=int(os.environ["N_CASES"]), shape=tuple(map(int, os.environ["CASE_SHAPE"].split())), seed=0)' &&
    nnunet nnUNetv2_plan_and_preprocess -d "$DATASET_ID" -c 3d_fullres -np "$N_PROC" -npfp "$N_PROC"
}

train() {
  nnUNet_compile=$COMPILE nnUNet_n_proc_DA=$N_PROC_DA nnunet nnUNetv2_train "$DATASET_ID" 3d_fullres 0 -tr "$TRAINER" -device "$DEVICE"
}

# -npp 0 -nps 0 (dry run): nnU-Net predicts in this process, without starting worker processes
predict() {
  local src="$nnUNet_raw/Dataset${DATASET_ID}_DeviceCheck/imagesTr"
  mkdir -p "$WORK/predict_in" "$WORK/predict_out" || return 1
  find "$src" -name '*_0000.nii.gz' | sort | head -n "$N_PREDICT" | xargs -r cp -t "$WORK/predict_in" || return 1
  nnUNet_compile=f nnunet nnUNetv2_predict -i "$WORK/predict_in" -o "$WORK/predict_out" -d "$DATASET_ID" \
    -c 3d_fullres -tr "$TRAINER" -f 0 -device "$DEVICE" -npp "$N_PRED_PROC" -nps "$N_PRED_PROC" --disable_progress_bar
}

export -f nnunet install_wheels check_env make_dataset train predict

# summary.json from the sections and the files they left; always runs (EXIT trap).
write_summary() {
  trap - EXIT
  local log_src
  log_src="$(find "$nnUNet_results" -name 'training_log_*.txt' 2>/dev/null | sort | tail -n 1)"
  [[ -n "$log_src" ]] && cp "$log_src" "$OUTDIR/nnunet_training_log.txt"
  MODE="$MODE" OUTDIR="$OUTDIR" SECTIONS="$SECTIONS" WALL="$(elapsed)" DEADLINE="$DEADLINE" \
    EPOCHS="$EPOCHS" ITERATIONS="$ITERATIONS" N_PREDICT="$N_PREDICT" "$PY" - <<'EOF' || {
import datetime, json, math, os, re
from pathlib import Path

out, work = Path(os.environ["OUTDIR"]), Path(os.environ["WORK"])
mode = os.environ["MODE"]
problems = []
sections = {}
for line in Path(os.environ["SECTIONS"]).read_text().splitlines():
    name, status, rc, seconds, timeout, cpu, *why = line.split("\t")
    sections[name] = {"status": status, "rc": int(rc) if rc else None, "seconds": int(seconds),
                      "timeout_s": int(timeout), "cpu_s": float(cpu)}
    if why:
        sections[name]["why"] = why[0]
    if status not in ("ok", "skipped") or (status == "skipped" and name != "install"):
        problems.append(f"section {name}: {status}" + (f" ({why[0]})" if why else ""))

def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)

step_cost = {}
for config in ("3d_fullres", "2d"):
    f = out / f"step_cost_{config}.json"
    if not f.is_file():
        problems.append(f"step_cost {config}: no JSON")
        continue
    r = json.loads(f.read_text())
    rows = {}
    wall = r.get("step_time", {}).get("wall", {})
    mem = r.get("cuda_memory") or {}
    for v in r.get("variants", []):
        if v in wall:
            s = wall[v]
            rows[v] = {"trainer": v, "median_step_s": s["median_s"], "iqr_s": s["iqr_s"],
                       "paired_ratio": s["paired_ratio_median"], "ratio_of_medians": s["ratio_of_medians"],
                       "steps": s["n"]}
            if v in mem:
                rows[v].update(peak_mib=mem[v]["peak_mib"], resident_mib=mem[v]["resident_mib"],
                               step_peak_increase_mib=mem[v]["step_peak_increase_mib"])
            if not all(finite(x) for k, x in rows[v].items() if k != "trainer"):
                problems.append(f"step_cost {config} {v}: non-finite numbers")
        else:
            rows[v] = {"trainer": v, "error": r.get("errors", {}).get(v, "not measured")}
            problems.append(f"step_cost {config} {v}: {rows[v]['error'][:200]}")
    step_cost[config] = {"device": r.get("device"), "plans": r.get("plans"), "batch_size": r.get("batch_size"),
                         "amp": r.get("amp"), "compile": r.get("compile"), "rounds": r.get("rounds"),
                         "stopped": r.get("stopped"), "error": r.get("error"), "wall_time_s": r.get("wall_time_s"),
                         "rows": rows}

train = {}
log_file = out / "nnunet_training_log.txt"
if log_file.is_file():
    text = log_file.read_text(errors="replace")
    epochs, iterations = int(os.environ["EPOCHS"]), int(os.environ["ITERATIONS"])
    means = []
    for m in re.finditer(r"SelfReg epoch means: (.*?) \((\d+) steps\)(.*)", text):
        values = {k: float(v) for k, v in re.findall(r"(\w+) (-?[\d.eE+-]+|nan|inf|-inf)", m.group(1))}
        means.append({"values": values, "steps": int(m.group(2)), "warning": m.group(3).strip() or None})
    train = {
        "compiled": "Using torch.compile" in text,
        "selfreg_epoch_means": means,
        "epoch_times_s": [float(x) for x in re.findall(r"Epoch time: ([\d.]+) s", text)],
        "train_loss": [float(x) for x in re.findall(r"train_loss (-?[\d.]+)", text)],
        "checkpoint_final": any(Path(os.environ["nnUNet_results"]).rglob("checkpoint_final.pth")),
    }
    train["hooks_fired"] = (
        len(means) == epochs
        and all(e["steps"] == iterations and e["values"] and not e["warning"] for e in means)
        and all(finite(x) for e in means for x in e["values"].values())
    )
    if not train["hooks_fired"]:
        problems.append(f"train: expected {epochs} finite 'SelfReg epoch means' lines of {iterations} steps, "
                        f"got {means}")
    if mode == "device" and not train["compiled"]:
        problems.append("train: the log does not show 'Using torch.compile'")
    if not train["checkpoint_final"]:
        problems.append("train: no checkpoint_final.pth")
else:
    problems.append("train: no nnU-Net training log")
pred_dir = work / "predict_out"
n_pred = len(list(pred_dir.glob("*.nii.gz"))) if pred_dir.is_dir() else 0
predict = {"cases": int(os.environ["N_PREDICT"]), "predicted": n_pred}
if n_pred != predict["cases"]:
    problems.append(f"predict: {n_pred} of {predict['cases']} cases predicted")
for name in ("train", "predict"):
    if name in sections:
        (train if name == "train" else predict)["seconds"] = sections[name]["seconds"]
env_file = work / "env.json"
summary = {
    "mode": mode,
    "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "wall_s": int(os.environ["WALL"]),
    "deadline_s": int(os.environ["DEADLINE"]),
    "ok": not problems,
    "problems": problems,
    "env": json.loads(env_file.read_text()) if env_file.is_file() else None,
    "sections": sections,
    "step_cost": step_cost,
    "train": train,
    "predict": predict,
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))

print(f"\n== device_check {mode}: {'OK' if not problems else 'PROBLEMS'} after {summary['wall_s']} s")
for name, s in sections.items():
    print(f"  {name:22s} {s['status']:8s} {s['seconds']:4d} s (cap {s['timeout_s']}, CPU {s['cpu_s']:.0f} s)")
for config, sc in step_cost.items():
    print(f"  step_cost {config} ({sc['rounds']} timed rounds, AMP {sc['amp']}, compile {sc['compile']}):")
    for v, row in sc["rows"].items():
        if "error" in row:
            print(f"    {v:16s} not measured: {row['error'][:100]}")
        else:
            mem = f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else ""
            print(f"    {v:16s} {row['median_step_s'] * 1e3:9.1f} ms/step, x{row['paired_ratio']:.3f} paired{mem}")
if "compiled" in train:
    print(f"  train: compiled {train['compiled']}, hooks fired {train['hooks_fired']}, "
          f"epoch times {train['epoch_times_s']} s; predict: {n_pred}/{predict['cases']} cases")
for p in problems:
    print(f"  PROBLEM: {p}")
print(f"wrote {out / 'summary.json'}")
EOF
    echo "the summary script failed; writing a minimal summary.json"
    printf '{"mode": "%s", "ok": false, "problems": ["summary script failed"], "wall_s": %s}\n' \
      "$MODE" "$(elapsed)" >"$OUTDIR/summary.json"
  }
  rm -rf "$WORK"
  grep -q '"ok": true' "$OUTDIR/summary.json" || exit 1
}
trap write_summary EXIT
trap 'echo "interrupted"; exit 130' INT TERM

echo "device_check ($MODE) in $REPO with $PY; output in $OUTDIR; global deadline ${DEADLINE}s"
if ((DRY_RUN)); then
  skip_section install "dry run: $PY's own packages"
elif [[ ! -d "$REPO/.device_wheels" ]] && "$PY" -c "import nnunetv2, SimpleITK, blosc2" 2>/dev/null; then
  skip_section install "no .device_wheels/, and $PY has nnU-Net already (a GPU machine of your own)"
else
  run_section install "$CAP_INSTALL" bash -c install_wheels
fi
run_section env "$CAP_ENV" bash -c check_env
env_rc=$?
if ((env_rc == 0 || env_rc == 124 || env_rc == 137)); then # a slow first import is no reason to stop
  run_section dataset "$CAP_DATASET" bash -c make_dataset >"$WORK/dataset.log" 2>&1 &
  DATASET_PID=$!
  for config in 3d_fullres 2d; do
    if [[ $config == 3d_fullres ]]; then cap=$CAP_STEP3D patch=("${PATCH_3D[@]}"); else cap=$CAP_STEP2D patch=("${PATCH_2D[@]}"); fi
    run_section "step_cost_$config" "$cap" "$PY" "$REPO/benchmarks/step_cost.py" --config "$config" \
      "${STEP_COMMON[@]}" "${patch[@]}" --variants all --no-memory --no-inference --max-seconds $((cap - 20)) \
      --json "$OUTDIR/step_cost_$config.json"
  done
  wait "$DATASET_PID"
  dataset_rc=$?
  cat "$WORK/dataset.log"
  if ((dataset_rc != 0)); then
    skip_section train "the dataset section failed"
    skip_section predict "the dataset section failed"
  elif run_section train "$CAP_TRAIN" bash -c train; then
    run_section predict "$CAP_PREDICT" bash -c predict
  else
    skip_section predict "training failed"
  fi
else
  for s in dataset step_cost_3d_fullres step_cost_2d train predict; do skip_section "$s" "environment check failed"; done
fi
true
