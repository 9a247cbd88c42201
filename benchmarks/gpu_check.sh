#!/usr/bin/env bash
# The GPU check: the machine, the GPU-only tests, the whole suite with a GPU visible, the GPT-2 throughput
# benchmark and the peers benchmark on the GPU, in at most 9.5 minutes on one H100/H200, from the repo root of
# an environment with acctrain's dependencies (this checkout is used; pytest-xdist for the suite).
#
#     bash benchmarks/gpu_check.sh OUT_DIR            # SUITE=0 skips the suite
#
# Writes OUT_DIR/machine.txt, gpu-tests.log, suite.log, gpu-throughput.log, gpu-throughput.json, peers-gpu.log,
# peers-gpu.json and summary.txt (8 files: what the device tool brings back). Exits 1 if the GPU tests failed
# (or timed out), else 0. Without CUDA it still runs end to end: the tests skip, the benchmarks say there is
# no device (the suite then runs as on any CPU machine).
#
# Budget (BUDGET_S = 560 s from this script's start; each part has its own timeout):
#   machine info ~5 s;
#   GPU tests (timeout 180 s) and, at the same time, the whole suite on 12 workers (timeout 210 s): the suite
#     is CPU work (2-process runs on gloo: with one GPU visible the tests place launches on the CPU), the GPU
#     tests are mostly GPU work, and 16 cores hold both;
#   the GPT-2 throughput benchmark (3 variants, accumulation 1 and 4, 2 rounds, --time-budget cuts rounds that
#     would not fit): up to 200 s, about 130 s for round 1 (compilation) and 60 s for round 2;
#   the peers benchmark on the GPU in what is left (at least 60 s; 7 frameworks x 2 rounds, one process each,
#     ~7 s a process).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
BUDGET_S=560      # from the start of this script to the end of the peers benchmark
THROUGHPUT_S=200  # the GPT-2 benchmark's share
MIN_BENCH_S=120   # round 1 compiles three variants: with less left it could not finish
MIN_PEERS_S=60
WARMUP=${WARMUP:-10}
STEPS=${STEPS:-30}
export PYTHONUNBUFFERED=1  # the logs are complete up to the moment a timeout kills a step

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2

# This checkout's acctrain, whatever is installed (benchmarks/*.py run with benchmarks/ as sys.path[0]).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. The machine.
{
    echo "## nvidia-smi"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(nvidia-smi not available)"
    echo "## versions"
    python -c "import torch, accelerate, safetensors
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())
print('accelerate', accelerate.__version__, '| safetensors', safetensors.__version__)" 2>&1
    echo "## nproc"
    nproc
    echo "## free -g"
    free -g
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 2. The GPU-only tests, and the whole suite beside them (it is CPU work; 16 cores hold both).
SUITE_STATUS="not run (SUITE=0)"
if [ "${SUITE:-1}" = 1 ]; then
    if python -c "import xdist" 2>/dev/null; then WORKERS="-n 12"; else WORKERS=""; fi
    echo; echo "== test suite with a GPU visible ($WORKERS, timeout 210 s), in the background"
    # In a session of its own, so that what a timeout leaves running (xdist workers, launched ranks) can be
    # killed before the benchmarks: left alive, it loaded the machine during the first GPU run's benchmarks.
    setsid timeout -k 10 210 python -m pytest -q $WORKERS -p no:randomly --tb=short -rfE > "$OUT/suite.log" 2>&1 &
    SUITE_PID=$!
fi
echo; echo "== GPU tests (timeout 180 s)"
timeout -k 10 180 python -m pytest -q -rfEs --tb=long tests/test_gpu.py tests/test_gpu_memory.py 2>&1 | tee "$OUT/gpu-tests.log"
GPU_RC=${PIPESTATUS[0]}
case $GPU_RC in
    0) GPU_STATUS="passed (or skipped; see the skip lines)" ;;
    4) GPU_STATUS="NOT RUN: pytest usage error (exit 4), e.g. tests/test_gpu.py does not exist yet" ;;
    5) GPU_STATUS="NOT RUN: no tests collected (exit 5)" ;;
    124|137) GPU_STATUS="FAILED: timed out after 180 s (exit $GPU_RC)" ;;
    *) GPU_STATUS="FAILED (exit $GPU_RC)" ;;
esac
if [ -n "${SUITE_PID:-}" ]; then
    wait "$SUITE_PID"
    SUITE_RC=$?
    kill -KILL -- "-$SUITE_PID" 2>/dev/null
    case $SUITE_RC in
        0) SUITE_STATUS="passed" ;;
        124|137) SUITE_STATUS="FAILED: timed out after 210 s (exit $SUITE_RC)" ;;
        *) SUITE_STATUS="FAILED (exit $SUITE_RC)" ;;
    esac
    tail -n 30 "$OUT/suite.log"
fi

# 3. The GPT-2 throughput benchmark.
LEFT=$((BUDGET_S - MIN_PEERS_S - SECONDS))
[ "$LEFT" -gt "$THROUGHPUT_S" ] && LEFT=$THROUGHPUT_S
echo; echo "== throughput benchmark (${LEFT} s; warm-up $WARMUP, timed $STEPS steps)"
if [ "$LEFT" -lt "$MIN_BENCH_S" ]; then
    BENCH_STATUS="NOT RUN: ${LEFT} s left, under the ${MIN_BENCH_S} s that one round needs"
    echo "$BENCH_STATUS" | tee "$OUT/gpu-throughput.log"
else
    timeout -k 5 $((LEFT + 10)) python benchmarks/gpu_throughput.py --rounds 2 --accumulation 1 4 \
        --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/gpu-throughput.json" --time-budget "$LEFT" \
        2>&1 | tee "$OUT/gpu-throughput.log"
    BENCH_RC=${PIPESTATUS[0]}
    case $BENCH_RC in
        0) BENCH_STATUS="finished" ;;
        124|137) BENCH_STATUS="KILLED after $((LEFT + 10)) s (exit $BENCH_RC); the JSON keeps the accumulations done" ;;
        *) BENCH_STATUS="FAILED (exit $BENCH_RC); see gpu-throughput.log" ;;
    esac
fi

# 4. The peers benchmark on the GPU: the tiny MLP's step cost per framework (host overhead).
LEFT=$((BUDGET_S - SECONDS))
echo; echo "== peers benchmark on the GPU (${LEFT} s)"
if [ "$LEFT" -lt "$MIN_PEERS_S" ]; then
    PEERS_STATUS="NOT RUN: ${LEFT} s left, under ${MIN_PEERS_S} s"
    echo "$PEERS_STATUS" | tee "$OUT/peers-gpu.log"
else
    timeout -k 5 $((LEFT + 5)) python benchmarks/peers.py --device cuda --rounds 2 --accumulation 1 4 \
        --k1 100 --k2 600 --time-budget "$LEFT" --json "$OUT/peers-gpu.json" 2>&1 | tee "$OUT/peers-gpu.log"
    PEERS_RC=${PIPESTATUS[0]}
    case $PEERS_RC in
        0) PEERS_STATUS="finished" ;;
        124|137) PEERS_STATUS="KILLED (exit $PEERS_RC)" ;;
        *) PEERS_STATUS="FAILED (exit $PEERS_RC); see peers-gpu.log" ;;
    esac
fi

# 5. The summary.
{
    echo "== summary (${SECONDS} s)"
    echo "GPU tests: $GPU_STATUS"
    # pytest's short summary (-rfEs) and its final count line
    grep -E "^(SKIPPED|FAILED|ERROR)|(passed|failed|skipped|errors?|no tests ran) in [0-9.]+s|not found" \
        "$OUT/gpu-tests.log" | tail -n 20
    echo "suite: $SUITE_STATUS"
    if [ -f "$OUT/suite.log" ]; then tail -n 3 "$OUT/suite.log"; fi
    echo "benchmark: $BENCH_STATUS"
    grep -E "^(\||micro batch|rounds run|  time budget|not run|elapsed|gpu_throughput:|device:)" \
        "$OUT/gpu-throughput.log"
    echo "peers: $PEERS_STATUS"
    grep -E "^(\||peers)" "$OUT/peers-gpu.log"
} > "$OUT/summary.txt"
echo; cat "$OUT/summary.txt"

case $GPU_RC in
    0|4|5) exit 0 ;;
    *) exit 1 ;;
esac
