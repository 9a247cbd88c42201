#!/usr/bin/env bash
# The GPU check, in at most 8 minutes on one H100/H200: the machine, the GPU-only tests and, beside them, the whole
# suite with the GPU visible; then the throughput of the raw loop, the Accelerate loop and the Engine on GPT-2 small
# in bf16 (MFU, and the Engine's step-time breakdown), and bf16 against FP8 on a 0.9B model. Run it from the repo
# root of an environment with acctrain's dev dependencies (pytest-xdist spreads the suite; torchao for FP8):
#
#     bash benchmarks/gpu_check.sh OUT_DIR            # SUITE=0 skips the suite, FP8=0 the FP8 comparison
#
# Writes OUT_DIR/machine.txt, gpu-tests.log, suite.log, gpu-throughput.log/.json, fp8-throughput.log/.json and
# summary.txt (one table: each part, its status, its figures). Exits 1 if the GPU tests or the suite failed (or
# timed out), else 0. Without CUDA it still runs end to end: the GPU tests skip, the benchmarks say there is no
# device, and the suite runs as on any CPU machine.
#
# Budget (BUDGET_S = 470 s from this script's start; each part has its own timeout):
#   machine info ~5 s;
#   the GPU tests (timeout 180 s) and, at the same time, the whole suite over 12 workers (timeout 220 s): the suite
#     is mostly CPU work (with one GPU visible, the tests launch their multi-process runs on the CPU, gloo: two
#     ranks cannot share one GPU under NCCL), its in-process tests share the GPU, which holds them; the GPU tests
#     are GPU work; 16 cores hold both;
#   GPT-2 small in bf16, 3 loops, accumulation 1, one round (compilation included): THROUGHPUT_S = 130 s;
#   the 0.9B model, the Engine in bf16 against the Engine and the raw loop in FP8, one round: what is left (at
#     least MIN_FP8_S).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
BUDGET_S=470
SUITE_S=220
GPU_TESTS_S=180
THROUGHPUT_S=130
MIN_FP8_S=90
WARMUP=${WARMUP:-10}
STEPS=${STEPS:-30}
export PYTHONUNBUFFERED=1  # the logs are complete up to the moment a timeout kills a step

mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2

# This checkout's acctrain, whatever is installed (benchmarks/*.py run with benchmarks/ as sys.path[0]).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status_of() {  # status_of EXIT_CODE TIMEOUT_S: a word for the summary
    case $1 in
        0) echo "passed" ;;
        4) echo "NOT RUN: pytest usage error (exit 4)" ;;
        5) echo "NOT RUN: no tests collected (exit 5)" ;;
        124|137) echo "FAILED: timed out after $2 s (exit $1)" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

# 1. The machine.
{
    echo "## nvidia-smi"
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "(nvidia-smi not available)"
    echo "## versions"
    python -c "import torch, accelerate, safetensors
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())
print('accelerate', accelerate.__version__, '| safetensors', safetensors.__version__)
try:
    import torchao; print('torchao', torchao.__version__)
except ImportError:
    print('torchao: not installed (FP8 is refused without it)')" 2>&1
    echo "## nproc"
    nproc
    echo "## free -g"
    free -g
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 2. The GPU-only tests, and the whole suite beside them.
SUITE_STATUS="not run (SUITE=0)"
SUITE_RC=0
if [ "${SUITE:-1}" = 1 ]; then
    WORKERS=()
    if python -c "import xdist" 2>/dev/null; then WORKERS=(-n 12 --dist loadgroup); fi
    echo; echo "== test suite with a GPU visible (${WORKERS[*]:-no pytest-xdist: one worker}, timeout $SUITE_S s), in the background"
    # In a session of its own, so that what a timeout leaves running (xdist workers, launched ranks) can be
    # killed before the benchmarks: left alive, it would load the machine during them.
    setsid timeout -k 10 "$SUITE_S" python -m pytest -q "${WORKERS[@]}" -p no:randomly --tb=short -rfE > "$OUT/suite.log" 2>&1 &
    SUITE_PID=$!
fi
echo; echo "== GPU tests (timeout $GPU_TESTS_S s)"
timeout -k 10 "$GPU_TESTS_S" python -m pytest -q -rfEs --tb=long tests/test_gpu.py tests/test_gpu_memory.py \
    tests/test_step_time.py 2>&1 | tee "$OUT/gpu-tests.log"
GPU_RC=${PIPESTATUS[0]}
GPU_STATUS=$(status_of "$GPU_RC" "$GPU_TESTS_S")
if [ -n "${SUITE_PID:-}" ]; then
    wait "$SUITE_PID"
    SUITE_RC=$?
    kill -KILL -- "-$SUITE_PID" 2>/dev/null
    SUITE_STATUS=$(status_of "$SUITE_RC" "$SUITE_S")
    tail -n 30 "$OUT/suite.log"
fi

# 3. GPT-2 small in bf16: raw, Accelerate, Engine (and the Engine's own breakdown of its step time).
LEFT=$((BUDGET_S - MIN_FP8_S - SECONDS))
[ "$LEFT" -gt "$THROUGHPUT_S" ] && LEFT=$THROUGHPUT_S
echo; echo "== GPT-2 small, bf16 (${LEFT} s; warm-up $WARMUP, timed $STEPS steps)"
timeout -k 5 $((LEFT + 10)) python benchmarks/gpu_throughput.py --rounds 1 --accumulation 1 \
    --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/gpu-throughput.json" --time-budget "$LEFT" \
    2>&1 | tee "$OUT/gpu-throughput.log"
BENCH_STATUS=$(status_of "${PIPESTATUS[0]}" $((LEFT + 10)) | sed 's/^passed$/finished/')

# 4. FP8 against bf16 on the 0.9B model.
LEFT=$((BUDGET_S - SECONDS))
FP8_STATUS="not run (FP8=0)"
if [ "${FP8:-1}" = 1 ]; then
    echo; echo "== 0.9B model, Engine bf16 against FP8 (${LEFT} s)"
    if [ "$LEFT" -lt "$MIN_FP8_S" ]; then
        FP8_STATUS="NOT RUN: ${LEFT} s left, under ${MIN_FP8_S} s"
        echo "$FP8_STATUS" | tee "$OUT/fp8-throughput.log"
    else
        timeout -k 5 $((LEFT + 5)) python benchmarks/gpu_throughput.py --size 1b --micro-batch 8 --rounds 1 \
            --accumulation 1 --variants engine engine-fp8 raw-fp8 --warmup "$WARMUP" --steps "$STEPS" \
            --json "$OUT/fp8-throughput.json" --time-budget "$LEFT" 2>&1 | tee "$OUT/fp8-throughput.log"
        FP8_STATUS=$(status_of "${PIPESTATUS[0]}" $((LEFT + 5)) | sed 's/^passed$/finished/')
    fi
fi

# 5. The summary: one table.
counts() { grep -hoE "[0-9]+ (passed|failed|skipped|errors?)" "$1" 2>/dev/null | tr '\n' ' '; }
figures() {  # the variant rows of a throughput log, one line: "raw: 123.4 ms, 345,678 tok/s, 30.1% MFU, 1 (reference); ..."
    grep -E "^\| (raw|accelerate|engine)" "$1" 2>/dev/null |
        awk -F'|' '{for (i = 2; i <= 6; i++) gsub(/^ +| +$/, "", $i); printf "%s%s: %s ms, %s tok/s, %s MFU, %s;", sep, $2, $3, $4, $5, $6; sep = " "}'
}
{
    echo "== summary (${SECONDS} s of ${BUDGET_S} s)"
    echo "| part | status | figures |"
    echo "|---|---|---|"
    echo "| GPU tests | $GPU_STATUS | $(counts "$OUT/gpu-tests.log") |"
    echo "| suite, GPU visible | $SUITE_STATUS | $(counts "$OUT/suite.log") |"
    echo "| GPT-2 bf16 (ms/step, tokens/s, MFU, vs Accelerate) | $BENCH_STATUS | $(figures "$OUT/gpu-throughput.log") |"
    echo "| Engine step time (GPT-2 bf16) | | $(grep -h "step time (the Engine" "$OUT/gpu-throughput.log" | sed 's/.*: //') |"
    echo "| 0.9B bf16 vs FP8 (ms/step, tokens/s, MFU, vs engine bf16) | $FP8_STATUS | $(figures "$OUT/fp8-throughput.log") |"
    echo "| Engine step time (0.9B) | | $(grep -h "step time (the Engine" "$OUT/fp8-throughput.log" 2>/dev/null | sed 's/ step time (the Engine.s train\/time\/\*)//' | tr '\n' ' ') |"
    echo
    echo "failures:"
    grep -hE "^(FAILED|ERROR)" "$OUT/gpu-tests.log" "$OUT/suite.log" 2>/dev/null | head -n 40
} > "$OUT/summary.txt"
echo; cat "$OUT/summary.txt"

[ "${SUITE:-1}" = 0 ] && SUITE_RC=0
case "$GPU_RC:$SUITE_RC" in
    0:0|4:0|5:0) exit 0 ;;
    *) exit 1 ;;
esac
