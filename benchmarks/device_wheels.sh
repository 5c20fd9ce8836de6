#!/usr/bin/env bash
# Fetch the wheels that benchmarks/device_check.sh installs on the bare GPU machine, into .device_wheels/.
#
# The GPU machine's H200 image (Python 3.12, x86_64) has torch, torchvision, triton, numpy, scipy,
# scikit-image, scikit-learn, pandas, matplotlib, tifffile, einops, timm, httpx, msgpack, rich and
# threadpoolctl, but no nnU-Net, and nothing can be downloaded there. PACKAGES below are the
# distributions that nnU-Net's plan/preprocess, train and predict and our trainers import and that
# image lacks (read off the modules a dry run of device_check.sh imported; nnunetv2's other
# requirements -- yacs, graphviz, imagecodecs, future, unittest2, pydantic -- are never imported
# there), at the versions this project is tested with, plus timm: nnU-Net's trainer lookup imports
# its Primus trainers, whose network module imports timm, and dynamic-network-architectures pins
# timm < 1.0.23; installed first on the path, the carried one shadows the image's.
# --no-deps: exactly these, nothing else.
#
# acvl-utils is published as a source archive only: it is pure Python, so its wheel is built here.
# The checkout copied to the GPU machine may hold 64 MiB in all; as downloaded the set is
# over that (SimpleITK's wheel alone is 50 MiB), so the largest wheels are recompressed with LZMA,
# largest first, until the set fits BUDGET_MIB. They stay wheels (pip reads LZMA zip members;
# file contents and the RECORD hashes are unchanged), which takes a few minutes of CPU here.
#
# Usage, from anywhere (needs pip and PyPI): bash benchmarks/device_wheels.sh
# Then copy .device_wheels with the checkout to the GPU machine (see benchmarks/device_check.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST=.device_wheels
PY="${PYTHON:-python3}"
BUDGET_MIB="${BUDGET_MIB:-58}" # 64 MiB per call, less the checkout (about 2 MiB) and some room
PACKAGES=(
  nnunetv2==2.8.1
  acvl-utils==0.2.6
  batchgenerators==0.25.5
  batchgeneratorsv2==0.3.6
  dynamic-network-architectures==0.4.4
  blosc2==4.15.0
  ndindex==1.10.1
  SimpleITK==2.5.7
  nibabel==5.4.2
  connected-components-3d==4.1.1
  timm==1.0.22 # the image has a timm of unknown version; dynamic-network-architectures 0.4.4 needs < 1.0.23
)
SDIST_ONLY=(acvl-utils==0.2.6)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf "$DEST"
mkdir -p "$DEST"
binary=()
for p in "${PACKAGES[@]}"; do
  [[ " ${SDIST_ONLY[*]} " == *" $p "* ]] || binary+=("$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${binary[@]}"
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" "${SDIST_ONLY[@]}"
printf '%s\n' "${PACKAGES[@]}" >"$DEST/requirements.txt"

"$PY" - "$DEST" "$BUDGET_MIB" "${#PACKAGES[@]}" <<'EOF'
import sys
import zipfile
from pathlib import Path

dest, budget, n_packages = Path(sys.argv[1]), float(sys.argv[2]) * 2**20, int(sys.argv[3])
wheels = sorted(dest.glob("*.whl"))
if len(wheels) != n_packages:
    sys.exit(f"expected {n_packages} wheels in {dest}, found {len(wheels)}: {[w.name for w in wheels]}")


def total() -> int:
    return sum(w.stat().st_size for w in wheels)


print(f"downloaded: {total() / 2**20:.1f} MiB in {len(wheels)} wheels")
for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
    if total() <= budget:
        break
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            member = zipfile.ZipInfo(info.filename, info.date_time)
            member.external_attr, member.create_system = info.external_attr, info.create_system  # file modes
            zout.writestr(member, zin.read(info), compress_type=zipfile.ZIP_LZMA)
    tmp.replace(wheel)
    print(f"recompressed {wheel.name} with LZMA: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"{total() / 2**20:8.2f} MiB  total ({dest}/, budget {budget / 2**20:.0f} MiB)")
if total() > budget:
    sys.exit("the wheels do not fit the budget: see the header of benchmarks/device_check.sh for the alternative")
EOF
