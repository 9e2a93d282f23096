#!/usr/bin/env bash
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
install_package /tmp/pip.log || exit 1
python3 build/runs/lpb13.py 2>&1 | grep -v -i warn
