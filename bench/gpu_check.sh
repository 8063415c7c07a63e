#!/usr/bin/env bash
# One GPU check on a fresh CUDA machine with this repository checked out:
#   bench/gpu_check.sh OUTDIR
# 1. installs the package (builds decafa_fast._C with CUDA), with triton and nvidia-ml-py;
# 2. runs the GPU op tests (Triton and CUDA backends natively, bf16 included);
# 3. races the Triton and CUDA C++ heads against each other and their floor (bench/head_floor.py, with a
#    short Triton TUNING sweep);
# 4. runs the pytest-benchmark suites (`pytest bench/ --benchmark-only`, the quick subset);
# and writes into OUTDIR: report.md, steps.log (every step's output), head_floor.json, bench_ops.json,
# bench_model.json, rows.jsonl (every benchmark row, as measured) and auto_table.json (the Triton-vs-CUDA
# races: commit it as decafa_fast/auto_table.json so that "auto" runs the faster backend on this GPU).
# Every step has a timeout so that the whole check ends within 8 minutes on an H100; a failing step is
# reported and the rest still run. Exit status: 0 if every step passed, 1 otherwise, 2 without a GPU.
# GPU_CHECK_ALLOW_CPU=1 runs it without a GPU (to test the script itself: the GPU parts then fail or skip).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PY
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}   # whole check, seconds
REPORT="$OUT/report.md"
FAILED=0

if [[ -z "${GPU_CHECK_ALLOW_CPU:-}" ]] && { ! command -v nvidia-smi >/dev/null 2>&1 \
        || ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; }; then
    echo "gpu_check.sh: no CUDA GPU visible (nvidia-smi missing or torch.cuda.is_available() is False)" | tee "$REPORT" >&2
    exit 2
fi
unset TRITON_INTERPRET

# run_step NAME SECONDS CMD...: runs CMD with a timeout capped by what is left of the budget. Each step
# logs to $LOGS/NAME.log; the logs are joined into OUTDIR/steps.log at the end (the device machine returns
# at most 8 files).
LOGS=$(mktemp -d)
declare -a SUMMARY
run_step() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then
        SUMMARY+=("| $name | skipped: out of time | |"); FAILED=1; return
    fi
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT after ${limit}s"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED (exit $rc)"
    (( rc != 0 )) && FAILED=1
    SUMMARY+=("| $name | $verdict | ${dt}s |")
    echo "[gpu_check] $name: $verdict (${dt}s)"
}

# 1. install. The lent machines are offline: try the full install quickly, then without dependencies
#    (the image already has torch, triton, pytest, pytest-benchmark, nvidia-ml-py ...).
export MAX_JOBS=${MAX_JOBS:-16}
[[ -z "${GPU_CHECK_ALLOW_CPU:-}" ]] && export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "8.0;9.0")}
install() {
    if "$PY" -c "import torch, numpy, cv2, tqdm, matplotlib, pytest, pytest_benchmark, triton" 2>/dev/null; then
        echo "--- dependencies present: building decafa-fast alone ---"
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
    else
        PIP_DEFAULT_TIMEOUT=5 "$PY" -m pip install --retries 0 --no-build-isolation -e ".[dev,gpu]" \
            || { echo "--- full install failed (offline?); installing without dependencies ---";
                 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; }
    fi
    "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "pynvml", "pytest", "pytest_benchmark", "kornia", "decafa_fast._C"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'ok')}")
    except Exception as exc:
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
from decafa_fast import ops
print(ops.backends())
EOF
}
export -f install
echo "[gpu_check] building for sm ${TORCH_CUDA_ARCH_LIST}"
run_step install "${GPU_CHECK_INSTALL_S:-130}" bash -c install

# 2. the op tests natively on the GPU. Kernel compilation dominates on a fresh machine: spread it over
#    4 workers when pytest-xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
run_step tests 80 "$PY" -m pytest -q -p no:cacheprovider -rs $XDIST tests/triton/test_ops_triton.py tests/cuda/test_ops_cuda.py

# 3. the Triton and CUDA C++ heads raced against each other and the floor, then a short Triton tuning sweep
run_step head_floor 80 "$PY" bench/head_floor.py --sweep --budget-s 65 --json "$OUT/head_floor.json"

# 4. pytest-benchmark suites, the quick subset (the whole grid does not fit in the budget;
#    GPU_CHECK_BENCH_ARGS="" runs everything). Rows stream into rows.jsonl as they are measured, so a step cut
#    off by its timeout still reports them; the ops suite saves its Triton-vs-CUDA races as the auto table.
#    Within the budget: no torch.compile'd reference among the ops (head_floor times it for the head), and the
#    model with the fused ops only (each model case compiles the whole network with CUDA graphs).
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS---decafa-quick}
BENCH_COMMON=(--benchmark-only -q -p no:cacheprovider --decafa-no-summary --decafa-rows "$OUT/rows.jsonl")
run_step bench_ops 70 "$PY" -m pytest bench/test_ops.py "${BENCH_COMMON[@]}" $BENCH_ARGS \
    --decafa-backends "${GPU_CHECK_OPS_BACKENDS:-reference,kornia,triton,cuda}" \
    --benchmark-json "$OUT/bench_ops.json" --decafa-auto-table "$OUT/auto_table.json"
run_step bench_model 100 "$PY" -m pytest bench/test_model.py "${BENCH_COMMON[@]}" $BENCH_ARGS \
    --decafa-backends "${GPU_CHECK_MODEL_BACKENDS:-triton,cuda}" --benchmark-json "$OUT/bench_model.json"

# report
{
    echo "# decafa-fast GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
    echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
    echo '```'
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "## Install"; echo '```'; tail -n 12 "$LOGS/install.log" 2>/dev/null; echo '```'
    echo "## Tests"; echo '```'; tail -n 25 "$LOGS/tests.log" 2>/dev/null; echo '```'
    echo "## decafa_head: Triton vs CUDA C++ vs the floor (bench/head_floor.py)"
    grep -E '^(device|backend|FAIL|sweep stopped)|relative error' "$LOGS/head_floor.log" 2>/dev/null | sed 's/^/    /'
    echo
    if grep -q '^|' "$LOGS/head_floor.log" 2>/dev/null; then
        grep '^|' "$LOGS/head_floor.log"
    else  # cut off before its table: the cases it printed as it went
        grep -E ' us( |$)' "$LOGS/head_floor.log" 2>/dev/null | sed 's/^/    /'
    fi
    echo
    echo "## pytest-benchmark, quick subset (every row measured is in rows.jsonl)"
    for log in bench_ops bench_model; do
        grep -E '(passed|failed|error|skipped)' "$LOGS/$log.log" 2>/dev/null | tail -n 2 | sed "s/^/    $log: /"
    done
    if [[ -s "$OUT/rows.jsonl" ]]; then
        "$PY" -m decafa_fast.app.cli bench --report "$OUT/rows.jsonl" 2>&1 | tail -n +3
    fi
    echo
    echo "## The auto backend's table (auto_table.json)"
    echo '```'; head -n 80 "$OUT/auto_table.json" 2>/dev/null; echo '```'
    echo
    echo "total $(( $(date +%s) - START ))s"
} >"$REPORT" 2>&1
for name in install tests head_floor bench_ops bench_model; do
    [[ -f "$LOGS/$name.log" ]] && { echo "===== $name ====="; cat "$LOGS/$name.log"; }
done >"$OUT/steps.log"
rm -rf "$LOGS"
echo "[gpu_check] report: $REPORT ($(( $(date +%s) - START ))s)"
exit $FAILED
