#!/usr/bin/env bash
# Installs the pinned Python requirements that are missing (pip, from PyPI, or from a local
# wheel folder given as BSK_WHEELS for machines without network). Sourced by the other scripts.
# The install steps run with errexit; a caller without it gets it off again at the end, so a
# GPU script that sources this still goes on past a failing step and reports its status.
case $- in *e*) _bsk_errexit=1 ;; *) _bsk_errexit=0 ;; esac
set -euo pipefail
PY=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pip_install() {
  if [ -n "${BSK_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$BSK_WHEELS" "$@"
  else
    "$PY" -m pip install -q "$@"
  fi
}
missing() { ! "$PY" -c "import $1" >/dev/null 2>&1; }

need=()
missing scikit_build_core && need+=(scikit-build-core==0.11.6)
missing nanobind && need+=(nanobind==2.9.2)
missing ninja && need+=(ninja==1.13.2)
command -v cmake >/dev/null 2>&1 || need+=(cmake==3.31.6)
if [ "${BSK_WITH_TEST_DEPS:-0}" = 1 ]; then
  missing torch && need+=(torch==2.11.0)
  missing numpy && need+=(numpy==2.4.6)
  missing pytest && need+=(pytest==9.2.0)
  missing hypothesis && need+=(hypothesis==6.170.15)
  missing transformers && need+=(transformers==5.17.0)
  missing matplotlib && need+=(matplotlib==3.11.2)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}"
  pip_install "${need[@]}"
fi
"$PY" -c "import importlib.util as u; exit(u.find_spec('cutlass_library') is None)" ||
  { echo "deps: installing nvidia-cutlass==4.2.0.0 (headers only, --no-deps)";
    pip_install --no-deps nvidia-cutlass==4.2.0.0; }
[ "$_bsk_errexit" = 1 ] || set +e
unset _bsk_errexit

# install_package LOG: builds and installs this package (BSK_CUDA_ARCHS decides the GPU targets)
# without touching its dependencies, the pip output in LOG; on failure prints LOG's tail and
# returns 1. Used by the one-call GPU scripts.
install_package() {
  local log=$1 t0=$SECONDS
  "$PY" -m pip install -q --no-build-isolation --no-deps "$root" >"$log" 2>&1 ||
    { tail -30 "$log"; return 1; }
  echo "install: $((SECONDS - t0)) s"
}
