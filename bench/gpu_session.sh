#!/usr/bin/env bash
# One GPU session: install rlops offline, run every test on CUDA, then the benchmarks.
# Usage: OUT=/some/dir bash bench/gpu_session.sh [extra `rlops bench` arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlops-gpu}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -m pytest -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.log"
python3 -m rlops bench --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log"
