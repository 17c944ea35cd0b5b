#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels of the benchmark's comparison providers
# that the GPU machine lacks, into bench/wheels/ (git-ignored). bench/gpu_session.sh installs them
# there offline (pip install --no-index --find-links bench/wheels --no-deps) when the folder is
# carried along, and goes on without them otherwise: `rlops bench` skips a provider that does not
# import, with the reason.
#
#   bash bench/fetch_wheels.sh            then, with the device tool: carry ["bench/wheels"]
#
# What is fetched (pure-Python wheels, about 2 MB together; the GPU image already has torch,
# triton, transformers, accelerate, numpy, pandas, pyarrow and pytest-benchmark):
#   liger-kernel        policy_loss "liger" (triton_grpo_loss), linear_policy_loss "liger"
#                       (LigerFusedLinearGRPOLoss); needs torch and triton only
#   trl                 token_stats "trl-triton" (trl.kernels.logprob_entropy); importing that
#                       module needs transformers only, so trl's other requirements (datasets,
#                       ...) are not fetched and --no-deps skips them
#   cut-cross-entropy   linear_policy_loss "cce" (linear_cross_entropy); needs torch and triton
# Left out:
#   flash-attn          token_stats "flash-attn" (its Triton cross-entropy). PyPI has only its
#                       source; the build compiles the CUDA attention kernels (hours, and a
#                       binary of hundreds of MB, far past the 64 MiB a device call carries), and
#                       its Triton cross-entropy cannot be imported without them, because
#                       flash_attn/__init__.py imports the compiled flash_attn_2_cuda. That
#                       provider stays skipped.
#
# Versions are pinned so that a session's results name what they ran against; override with
# PACKAGES="liger-kernel==X trl==Y ..." (one version each: two of one package stop the install).
# PYTHON_VERSION is the GPU machine's Python (3.12); WHEELS the folder (default bench/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
read -r -a PACKAGES <<<"${PACKAGES:-liger-kernel==0.8.5 trl==1.16.0 cut-cross-entropy==25.1.1}"
LIMIT_MIB=${LIMIT_MIB:-16}  # the device tool carries 64 MiB in all, the working tree included

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest "$tmp" "${PACKAGES[@]}"
size=$(du -sm "$tmp" | cut -f1)
if ((size > LIMIT_MIB)); then
    echo "fetch_wheels.sh: the wheels take ${size} MiB, over LIMIT_MIB=${LIMIT_MIB}: not replacing $WHEELS" >&2
    exit 1
fi
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl  # one version of each package: replace the whole set
mv "$tmp"/*.whl "$WHEELS"/
ls -l "$WHEELS"
echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, ${size} MiB in $WHEELS (git-ignored): carry it," \
    "e.g. the device tool's run with carry [\"$WHEELS\"]"
