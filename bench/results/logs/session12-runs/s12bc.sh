#!/usr/bin/env bash
set -uo pipefail
mkdir -p $OUT/cpp $OUT/py
OUT=$OUT/cpp bash build/runs/s12b.sh
OUT=$OUT/py bash build/runs/s12c.sh
