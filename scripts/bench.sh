#!/usr/bin/env bash
# Builds and installs the package, then runs the main job: our dense attention side by side with
# PyTorch SDPA (FlashAttention-2 and cuDNN backends) on the seed configuration, printing a table.
# Extra arguments go to the benchmark (e.g. --suite long).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
PY=${PYTHON:-python3}
BSK_CUDA_ARCHS="${BSK_CUDA_ARCHS:-80;90a}" "$PY" -m pip install -q --no-build-isolation .
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--suite seed)
"$PY" -m blackwell_sparsek.bench --out bench/results "${args[@]}"
