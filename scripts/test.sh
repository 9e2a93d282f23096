#!/usr/bin/env bash
# The whole test suite, C++ (ctest) then Python (pytest). GPU tests run where a CUDA GPU is
# present; elsewhere they are reported as skipped, with the reason. Installs what it needs
# (pinned, scripts/deps.sh), builds the CUDA code for BSK_CUDA_ARCHS (default "80;90a").
set -euo pipefail
cd "$(dirname "$0")/.."
BSK_WITH_TEST_DEPS=1 source scripts/deps.sh
PY=${PYTHON:-python3}
archs=${BSK_CUDA_ARCHS:-80;90a}
build=${BSK_BUILD_DIR:-build/cmake}
jobs=${BSK_JOBS:-$(nproc)}

echo "== build libbsk + C++ tests (archs: $archs) =="
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBSK_CUDA_ARCHS="$archs" \
  -DBSK_BUILD_TESTS=ON ${BSK_GTEST_SOURCE_DIR:+-DBSK_GTEST_SOURCE_DIR="$BSK_GTEST_SOURCE_DIR"} \
  ${BSK_CMAKE_ARGS:-}
cmake --build "$build" -j"$jobs"

echo "== ctest =="
ctest --test-dir "$build" --output-on-failure -j"$jobs"

echo "== install libbsk, then build and run the find_package example against it =="
cmake --install "$build" --prefix build/install >/dev/null
cmake -S examples/cpp -B build/example -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/install"
cmake --build build/example
./build/example/bsk_example

echo "== pip install . (Python package) =="
BSK_CUDA_ARCHS="$archs" "$PY" -m pip install -q --no-build-isolation .

echo "== pytest =="
"$PY" -m pytest -q -rs tests/python

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== all tests ran, GPU tests included ($("$PY" -c "import torch; print(torch.cuda.get_device_name())")) =="
else
  echo "== CPU tests passed. GPU tests were SKIPPED: no CUDA GPU on this machine" \
       "(torch.cuda.is_available() is False; the C++ GPU tests report cudaGetDeviceCount's error)." \
       "Run scripts/test.sh on a machine with an sm_80+ GPU to run them. =="
fi
