#!/usr/bin/env bash
# One GPU session: install rlops offline, run every test on CUDA, then the benchmarks and the
# memory profiles (issue 6's table: one GRPO and one PPO step of a 0.5B-class model at
# T in {1024, 4096}, eager vs fused vs fused-linear, with and without gradient checkpointing).
# Usage: OUT=/some/dir bash bench/gpu_session.sh [extra `rlops bench` arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlops-gpu}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# With the image's CUDA torch and nvcc this also builds the CUDA backend (rlops._C).
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, rlops._C; print('rlops._C built')" 2>&1 | tee "$OUT/cuda_build.log"
python3 -m pytest -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.log"
python3 -m rlops bench --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log"
for extra in "" "--gradient-checkpointing"; do
    python3 -m rlops profile --model Qwen/Qwen2.5-0.5B --batch 4 --group-size 4 --response-len 1024 4096 \
        $extra --out "$OUT/results" 2>&1 | tee -a "$OUT/profile.log"
done
