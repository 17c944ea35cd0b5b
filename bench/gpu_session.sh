#!/usr/bin/env bash
# The GPU evidence run in ONE command, in stages that each have a time budget, writing its
# results as it goes (a command killed at its limit still leaves every finished stage's files):
#
#   setup    nvidia-smi and versions; the comparison providers' wheels from bench/wheels/, offline
#   build    pip install -e . offline: with nvcc and a CUDA torch it builds rlops._C      <= 180 s
#   tests    python3 -m pytest -m gpu tests: every op on both backends at real sizes      <= 180 s
#   bench    rlops bench, one run per op, every provider that imports:                    <= 300 s
#              policy_loss, token_stats  N=16384, V in {32000, 151936}
#              linear_policy_loss        N=16384, V=151936, H=4096
#              gae                       B=512, T=8192
#              packed_policy_loss        its default shapes (N in {16384, 32768}, V=151936)
#              policy_loss               small N (256, 1024; V=151936): the split-vocabulary path
#              objectives                N=16384, V=151936: every objective and option beside the clip
#   profile  rlops profile: Qwen/Qwen2.5-0.5B, batch 4, one response length (4096):
#            a GRPO run, then a PPO run, each eager vs fused vs fused-linear               the rest
#
# The whole session ends within SESSION_SECONDS (default 570: the device tool runs one command
# for at most 600 s). A stage gets min(its cap, the time left minus the floors of the stages
# after it); every command runs under `timeout` with what is left of its stage; time a stage
# does not use goes to the next ones.
#
# Usage:
#   OUT=/some/dir bash bench/gpu_session.sh             on a CUDA machine
#   OUT=/some/dir bash bench/gpu_session.sh --dry-run   on the CPU: the same stages on tiny cases
#                                                       (tests/test_gpu_session.py runs it in CI)
#   bash bench/gpu_session.sh --plan [--dry-run]        print the stages and commands, run nothing
#
# What lands where:
#   $OUT/results.tar.gz   this session's result files as <gpu-name>/<file>, repacked after every
#                         stage and every bench or profile run: `tar -xzf results.tar.gz -C
#                         bench/results` puts them, unchanged, where they are committed
#   $OUT/summary.md       stages (budget, time, status), device, versions, GPU test summary,
#                         skipped providers (also in the tarball as <stamp>-gpu-session.md)
#   $OUT/{session,build,tests,bench,profile}.log   each stage's full output
# That is 7 files, within the device tool's 8 files back from $OUT. The result files themselves
# are written to $RESULTS_ROOT/<gpu-name>/: bench/results/<gpu-name>/ of this checkout on a GPU,
# a temporary folder in a dry run.
#
# Environment (all optional): SESSION_SECONDS; BUDGET_BUILD, BUDGET_TESTS, BUDGET_BENCH (caps, s);
# FLOOR_TESTS, FLOOR_BENCH, FLOOR_PROFILE (time kept for a stage while earlier ones run, s);
# PYTEST_WORKERS (pytest-xdist workers for the GPU tests, default 2; 0: none); RESULTS_ROOT;
# WHEELS (default bench/wheels); PROFILE_MODEL, PROFILE_RESPONSE_LEN; RLOPS_COMMIT (the commit
# to record when the checkout has no .git, as on the device machine); PYTHON (default python3).
set -uo pipefail

DRY=0
PLAN=0
PY=${PYTHON:-python3}
SESSION_SECONDS=${SESSION_SECONDS:-570}
BUDGET_BUILD=${BUDGET_BUILD:-180}
BUDGET_TESTS=${BUDGET_TESTS:-180}
BUDGET_BENCH=${BUDGET_BENCH:-300}
FLOOR_TESTS=${FLOOR_TESTS:-60}
FLOOR_BENCH=${FLOOR_BENCH:-120}
FLOOR_PROFILE=${FLOOR_PROFILE:-60}
BENCH_JOB_FLOOR=${BENCH_JOB_FLOOR:-30}  # time kept for each later bench run while one runs
PYTEST_WORKERS=${PYTEST_WORKERS:-2}
WHEELS=${WHEELS:-bench/wheels}
PROFILE_MODEL=${PROFILE_MODEL:-Qwen/Qwen2.5-0.5B}
PROFILE_RESPONSE_LEN=${PROFILE_RESPONSE_LEN:-4096}

now() { date +%s; }

# ---- what each stage runs (the plan prints these; the stages run them) ----------------------

pytest_args() {
    if ((DRY)); then  # collect the GPU tests of one op and skip them (no CUDA)
        echo "-m gpu -p no:cacheprovider -q tests/test_advantages_gpu.py"
        return
    fi
    local extra=""
    if ((PYTEST_WORKERS > 0)) && "$PY" -c "import xdist" 2>/dev/null; then
        extra+=" -n $PYTEST_WORKERS --dist loadfile"  # one file per worker: its big tests run in turn
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        extra+=" --timeout 150"  # a hung test fails alone instead of eating the stage
    fi
    echo "-m gpu -p no:cacheprovider -v --durations=25$extra tests"
}

bench_jobs() {  # one `rlops bench` run per line, most important first
    if ((DRY)); then
        echo "--ops gae --quick --providers python-loop"
        return
    fi
    echo "--ops policy_loss --shapes 16384x32000,16384x151936"
    echo "--ops token_stats --shapes 16384x32000,16384x151936"
    echo "--ops linear_policy_loss --shapes 16384x151936x4096"
    echo "--ops gae --shapes 512x8192"
    echo "--ops packed_policy_loss"
    echo "--ops policy_loss --shapes 256x151936,1024x151936"  # small N: the split-vocabulary path
    echo "--ops objectives --shapes 16384x151936"  # each objective's fwd+bwd beside the clip's (issue 14: within 5%)
}

profile_jobs() {  # one `rlops profile` run per line
    local common="--model $PROFILE_MODEL --batch 4 --group-size 4 --response-len $PROFILE_RESPONSE_LEN"
    if ((DRY)); then
        echo "--algo grpo $common --estimate"
        return
    fi
    echo "--algo grpo $common"
    echo "--algo ppo $common"
}

print_plan() {
    local job
    printf 'plan\tsession\t%s\n' "$SESSION_SECONDS"
    build_command
    printf 'plan\tbuild\t%s\t%s\n' "$BUDGET_BUILD" "${BUILD_CMD[*]}"
    printf 'plan\ttests\t%s\t%s -m pytest %s\n' "$BUDGET_TESTS" "$PY" "$(pytest_args)"
    while read -r job; do
        printf 'plan\tbench\t%s\t%s -m rlops bench %s --out RESULTS\n' "$BUDGET_BENCH" "$PY" "$job"
    done < <(bench_jobs)
    while read -r job; do
        printf 'plan\tprofile\trest\t%s -m rlops profile %s --out RESULTS\n' "$PY" "$job"
    done < <(profile_jobs)
}

build_command() {  # sets BUILD_CMD
    if ((DRY)); then  # no install on the CPU: only that the package imports
        BUILD_CMD=("$PY" -c "import importlib.util; assert importlib.util.find_spec('rlops')")
    else
        BUILD_CMD=("$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .)
    fi
}

# ---- stage machinery ------------------------------------------------------------------------

say() {  # a line of the driver's own, on the console and in session.log
    echo "[gpu_session +$(($(now) - T0))s] $*" | tee -a "$OUT/session.log"
}

# bounded LOG CAP CMD...: runs CMD with at most min(CAP, what is left of the stage) seconds,
# its output on the console and appended to $OUT/LOG. Returns CMD's status (124: timed out) and
# marks the stage failed or timed out accordingly.
bounded() {
    local log=$1 cap=$2 left rc
    shift 2
    left=$((STAGE_END - $(now)))
    ((cap < left)) && left=$cap
    if ((left < 1)); then
        echo "(no time left in the stage for: $*)" | tee -a "$OUT/$log"
        STAGE_STATUS="timeout"
        return 124
    fi
    echo "\$ $* (timeout ${left}s)" | tee -a "$OUT/$log"
    timeout -k 10 "$left" "$@" </dev/null 2>&1 | tee -a "$OUT/$log"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "(timed out after ${left}s: $*)" | tee -a "$OUT/$log"
        STAGE_STATUS="timeout"
    elif ((rc != 0)) && [[ $STAGE_STATUS == ok ]]; then
        STAGE_STATUS="failed (exit $rc)"
    fi
    return "$rc"
}

# stage NAME CAP RESERVE FUNCTION: runs FUNCTION with a budget of min(CAP, time left - RESERVE),
# then records the stage and repacks the results.
stage() {
    local name=$1 cap=$2 reserve=$3 fn=$4 left budget start
    left=$((DEADLINE - $(now)))
    budget=$((left - reserve))
    ((budget > cap)) && budget=$cap
    if ((budget < 1)); then
        say "stage $name: skipped, ${left}s left of the session"
        STAGES+=("| $name | 0 | 0 | skipped: no time left |")
        finish_stage
        return
    fi
    start=$(now)
    STAGE_END=$((start + budget))
    STAGE_STATUS=ok
    say "stage $name: budget ${budget}s (cap $cap s, ${left}s left of the session)"
    "$fn"
    say "stage $name: $STAGE_STATUS after $(($(now) - start))s"
    STAGES+=("| $name | $budget | $(($(now) - start)) | $STAGE_STATUS |")
    finish_stage
}

finish_stage() {
    write_summary
    pack
}

# pack: this session's result files (newer than the session's start) into $OUT/results.tar.gz,
# replaced in one rename so that a kill never leaves half an archive.
pack() {
    local n
    n=$(cd "$RESULTS_ROOT" && find "$SLUG" -type f -newer "$MARK" | wc -l)
    ((n == 0)) && return 0
    (cd "$RESULTS_ROOT" && find "$SLUG" -type f -newer "$MARK" -print0 | sort -z |
        tar --null -T - -czf "$OUT/results.tar.gz.part") &&
        mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz" || return 1
    ((n != PACKED)) && say "packed $n files into results.tar.gz"
    PACKED=$n
    return 0
}

write_summary() {
    local file="$RESULTS/$STAMP-gpu-session.md" row
    {
        echo "# GPU session $STAMP$([[ $DRY == 1 ]] && echo " (dry run on the CPU: tiny cases, nothing timed)")"
        echo
        echo "- device: $DEVICE_INFO"
        echo "- versions: $VERSIONS"
        echo "- commit: $COMMIT"
        echo "- CUDA backend (rlops._C): $CUDA_BACKEND"
        echo "- comparison packages carried: $WHEELS_INSTALLED"
        echo "- session budget: ${SESSION_SECONDS}s"
        echo
        echo "| stage | budget s | took s | status |"
        echo "|---|---|---|---|"
        for row in "${STAGES[@]}"; do echo "$row"; done
        if [[ -s $OUT/tests.log ]]; then
            echo
            echo "## GPU tests"
            echo
            echo '```'
            grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -40
            local last
            last=$(grep -E ' in [0-9.]+s( \([0-9:]+\))?( =+)?$' "$OUT/tests.log" |
                grep -E 'passed|failed|skipped|error|deselected|no tests ran' | tail -1)
            if [[ -n $last ]]; then
                echo "$last"
            else  # cut short: what -v reported before the cut
                echo "no summary (cut short): $(grep -oE '\b(PASSED|FAILED|ERROR|SKIPPED)\b' "$OUT/tests.log" |
                    sort | uniq -c | awk '{printf "%s %s, ", $1, tolower($2)}')before the cut"
            fi
            echo '```'
        fi
        if grep -q ': skipped: ' "$OUT/bench.log" 2>/dev/null; then
            echo
            echo "## Benchmark cases skipped"
            echo
            grep -E ': skipped: ' "$OUT/bench.log" | sed -E 's/^\[[0-9]+\/[0-9]+\] /- /' | head -60
        fi
    } >"$file.part" && mv -f "$file.part" "$file"
    cp -f "$file" "$OUT/summary.md"
}

# ---- the stages -----------------------------------------------------------------------------

do_setup() {
    DEVICE_INFO="no GPU (dry run)"
    if ((!DRY)); then
        DEVICE_INFO=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
            --format=csv,noheader 2>&1 | head -1)
        timeout 30 nvidia-smi 2>&1 | tee -a "$OUT/session.log"
    fi
    if [[ -z $VERSIONS ]]; then
        VERSIONS=$(timeout 120 "$PY" -c "import platform, torch, triton
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>&1 | tail -1)
    fi
    say "device: $DEVICE_INFO; $VERSIONS"
    WHEELS_INSTALLED="none (bench/fetch_wheels.sh was not run, or $WHEELS was not carried)"
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        say "no wheels in $WHEELS: Liger, TRL's kernel and Cut Cross-Entropy will be skipped"
        return
    fi
    WHEELS_INSTALLED=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1,2; done | paste -sd, - | sed 's/,/, /g')
    if ((DRY)); then
        say "dry run: not installing ${#wheels[@]} wheels ($WHEELS_INSTALLED)"
        return
    fi
    # Into a folder of their own on PYTHONPATH, without their dependencies (the bench needs none
    # that the image lacks; see bench/fetch_wheels.sh), and never from the network.
    local site=/tmp/rlops-gpu-session-site
    if timeout 120 "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "${wheels[@]}" 2>&1 | tee -a "$OUT/session.log"; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        say "installed from $WHEELS: $WHEELS_INSTALLED"
    else
        WHEELS_INSTALLED="install failed ($WHEELS_INSTALLED): see session.log"
        say "$WHEELS_INSTALLED"
    fi
}

do_build() {
    build_command
    if ((DRY)); then
        bounded build.log "$BUDGET_BUILD" "${BUILD_CMD[@]}"
        CUDA_BACKEND="not built (dry run)"
        return
    fi
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # PyTorch takes CUDA_HOME from `which nvcc` when it is unset: a wrapper script in /usr/local/bin
    # (as on the CPU machines here) gives it /usr/local, where cuda_runtime.h is not.
    if [[ -z ${CUDA_HOME:-} ]] && [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export CUDA_HOME=/usr/local/cuda
    fi
    if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then  # this GPU's architecture only: one nvcc pass per file
        TORCH_CUDA_ARCH_LIST=$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        [[ -n $TORCH_CUDA_ARCH_LIST ]] && export TORCH_CUDA_ARCH_LIST
    fi
    # Keep 30 s of the stage for the fallback: rlops without the CUDA backend still runs every
    # Triton test and provider.
    if ! bounded build.log $((STAGE_END - $(now) - 30)) "${BUILD_CMD[@]}"; then
        say "the CUDA build failed or ran out of time: installing rlops without it (RLOPS_BUILD_CUDA=0)"
        bounded build.log 60 env RLOPS_BUILD_CUDA=0 "${BUILD_CMD[@]}"
    fi
    if "$PY" -c "import torch, rlops._C" >>"$OUT/build.log" 2>&1; then
        CUDA_BACKEND="built ahead of time (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset})"
    else
        # One build per session: no process after this one retries it just in time (a minute
        # each). The CUDA-backend tests then fail with the reason; the bench skips rlops-cuda.
        export RLOPS_CUDA_JIT=0
        CUDA_BACKEND="not built (see build.log): RLOPS_CUDA_JIT=0 for the later stages"
    fi
    say "CUDA backend: $CUDA_BACKEND (CUDA_HOME=${CUDA_HOME:-unset})"
}

do_tests() {
    # shellcheck disable=SC2046  # the arguments are words
    bounded tests.log "$BUDGET_TESTS" "$PY" -m pytest $(pytest_args)
}

do_bench() {
    local jobs job i
    mapfile -t jobs < <(bench_jobs)
    for i in "${!jobs[@]}"; do
        job=${jobs[$i]}
        # Each later run keeps BENCH_JOB_FLOOR seconds: one slow provider cannot starve the rest.
        # shellcheck disable=SC2086
        bounded bench.log $((STAGE_END - $(now) - BENCH_JOB_FLOOR * (${#jobs[@]} - i - 1))) \
            "$PY" -m rlops bench $job --out "$RESULTS"
        write_summary
        pack
    done
}

do_profile() {
    local job
    while read -r job; do
        # shellcheck disable=SC2086
        bounded profile.log "$SESSION_SECONDS" "$PY" -m rlops profile $job --out "$RESULTS"
        write_summary
        pack
    done < <(profile_jobs)
}

# init_session: the session's clock, deadline, folders and names (the test sets OUT, SLUG and
# RESULTS_ROOT and calls this, then `stage` with commands of its own).
init_session() {
    T0=$(now)
    DEADLINE=$((T0 + SESSION_SECONDS))
    OUT=${OUT:-/tmp/rlops-gpu}
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
    export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    MARK=$(mktemp)
    STAMP=$(date -u +%Y%m%dT%H%M%S)
    COMMIT=${RLOPS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo "unknown (no .git; set RLOPS_COMMIT)")}
    if [[ -z ${RLOPS_COMMIT:-} ]] && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        COMMIT+="+dirty"
    fi
    VERSIONS=""
    if [[ -z ${SLUG:-} ]]; then  # the GPU's name as rlops bench names its folder, and the versions
        local info
        info=$(timeout 120 "$PY" -c "import platform, re, torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-'))
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')
" 2>&1)
        SLUG=$(sed -n 1p <<<"$info")
        VERSIONS=$(sed -n 2p <<<"$info")
        if [[ ! $SLUG =~ ^[a-z0-9-]+$ ]]; then
            VERSIONS="unknown: $(tail -1 <<<"$info")"
            SLUG=unknown-device
        fi
    fi
    TMP_RESULTS=""
    if [[ -z ${RESULTS_ROOT:-} ]]; then
        if ((DRY)); then
            TMP_RESULTS=$(mktemp -d)  # a dry run leaves nothing in the checkout: its files are in the tarball
            RESULTS_ROOT=$TMP_RESULTS
        else
            RESULTS_ROOT=$PWD/bench/results
        fi
    fi
    trap 'rm -rf "$MARK" ${TMP_RESULTS:+"$TMP_RESULTS"}' EXIT
    RESULTS=$RESULTS_ROOT/$SLUG
    mkdir -p "$RESULTS"
    DEVICE_INFO="" CUDA_BACKEND="not built yet" WHEELS_INSTALLED=""
    STAGES=()
    PACKED=0
}

main() {
    while (($#)); do
        case $1 in
        --dry-run) DRY=1 ;;
        --plan) PLAN=1 ;;
        -h | --help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            return 0
            ;;
        *)
            echo "gpu_session.sh: unknown argument $1 (use --dry-run, --plan or --help)" >&2
            return 2
            ;;
        esac
        shift
    done
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 2
    if ((PLAN)); then
        print_plan
        return 0
    fi
    init_session
    say "session $STAMP ($([[ $DRY == 1 ]] && echo "dry run" || echo "GPU run")), ${SESSION_SECONDS}s," \
        "results in $RESULTS, logs in $OUT"
    do_setup
    stage build "$BUDGET_BUILD" $((FLOOR_TESTS + FLOOR_BENCH + FLOOR_PROFILE)) do_build
    stage tests "$BUDGET_TESTS" $((FLOOR_BENCH + FLOOR_PROFILE)) do_tests
    stage bench "$BUDGET_BENCH" "$FLOOR_PROFILE" do_bench
    stage profile "$SESSION_SECONDS" 0 do_profile
    say "done in $(($(now) - T0))s; results: $OUT/results.tar.gz (tar -xzf it -C bench/results)"
    local row
    for row in "${STAGES[@]}"; do
        [[ $row == *"| ok |" ]] || return 1
    done
    return 0
}

# Sourcing the file (tests/test_gpu_session.py does) defines the functions and runs nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
