#!/usr/bin/env bash
# A/B of two builds on one GPU machine in one call. A kernel's time relative to another kernel
# moves by up to 7% from one machine to the next (every device call here may get a fresh one:
# bench/results/README.md, "Session 11"), so a kernel change is judged only against the code it
# replaces, built and timed on the same machine in the same call.
#
#   scripts/ab_build.sh save REV PATH...   here: copies PATH... as of git revision REV into
#                                          build/ab/base (carry build/ab to the GPU machine)
#   scripts/ab_build.sh run CMD...         there: builds and installs the working tree, runs CMD
#                                          in the repository root (output: $OUT/ab-new.txt),
#                                          swaps the saved files in, rebuilds (incrementally:
#                                          only what they touch), runs CMD again
#                                          ($OUT/ab-base.txt), and puts the working tree's
#                                          files back
#
# `run` installs with scripts/deps.sh's install_package, so BSK_WHEELS and BSK_CUDA_ARCHS apply as
# in the other GPU scripts. Example, timing a change to the SparseK kernel against HEAD:
#   scripts/ab_build.sh save HEAD src/kernels/sparsek_fwd_sm90.cuh
#   (device) BSK_CUDA_ARCHS=90a scripts/ab_build.sh run python3 bench/tune/sparsek_variants.py 131072
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-}
shift || true
case "$mode" in
  save)
    rev=${1:?"usage: $0 save REV PATH..."}
    shift
    [ $# -gt 0 ] || { echo "usage: $0 save REV PATH..." >&2; exit 2; }
    rm -rf "$root/build/ab"
    mkdir -p "$root/build/ab/base"
    for f in "$@"; do
      mkdir -p "$root/build/ab/base/$(dirname "$f")"
      git -C "$root" show "$rev:$f" > "$root/build/ab/base/$f" || exit 1
      echo "$f" >> "$root/build/ab/files"
    done
    echo "saved $(wc -l < "$root/build/ab/files") file(s) of $rev in build/ab (carry it)"
    ;;
  run)
    [ $# -gt 0 ] || { echo "usage: $0 run CMD..." >&2; exit 2; }
    [ -f "$root/build/ab/files" ] || { echo "ab_build: no build/ab/files (run 'save' first and carry build/ab)" >&2; exit 2; }
    out=${OUT:-/tmp}
    source "$root/scripts/deps.sh" >/dev/null
    cd "$root"
    install_package "$out/ab-pip-new.log" || exit 1
    "$@" > "$out/ab-new.txt" 2>&1; echo "ab_build: new rc=$?"
    mkdir -p build/ab/new
    while read -r f; do
      mkdir -p "build/ab/new/$(dirname "$f")"
      cp "$f" "build/ab/new/$f" && cp "build/ab/base/$f" "$f"
    done < build/ab/files
    install_package "$out/ab-pip-base.log"; rc=$?
    if [ $rc -eq 0 ]; then
      "$@" > "$out/ab-base.txt" 2>&1; echo "ab_build: base rc=$?"
    fi
    while read -r f; do cp "build/ab/new/$f" "$f"; done < build/ab/files
    exit $rc
    ;;
  *)
    echo "usage: $0 save REV PATH... | run CMD..." >&2
    exit 2
    ;;
esac
