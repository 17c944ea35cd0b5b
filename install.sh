#!/usr/bin/env bash
# Sets up rlops for development and testing in the current Python environment.
# Without an NVIDIA GPU it first installs the CPU build of PyTorch, so that pip does not
# pull several GB of CUDA packages; with a GPU, pip keeps (or fetches) a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install -e ".[test]"
# verl 0.9.1 for the parity tests against verl's own functions (tests/test_estimators.py), without its
# dependencies (ray, vLLM, ...), which those functions do not use: the tests stand in for ray, tensordict
# and orjson where they are missing (tests/verl_standins).
"$PYTHON" -m pip install --no-deps "verl==0.9.1" omegaconf "antlr4-python3-runtime==4.9.3" codetiming
