#!/usr/bin/env bash
# One GPU check on a fresh CUDA machine with this repository checked out:
#   bench/gpu_check.sh OUTDIR
# 1. installs the package (builds decafa_fast._C with CUDA), with triton and nvidia-ml-py;
# 2. runs the GPU tests (Triton and CUDA backends natively, bf16 included, and every test marked `cuda`);
# 3. times the Triton head and the CUDA C++ head against their floor (bench/triton_floor.py with a small
#    TUNING sweep, bench/cuda_floor.py);
# 4. runs the pytest-benchmark suites (`pytest bench/ --benchmark-only`);
# and writes OUTDIR/report.md, OUTDIR/bench.json, OUTDIR/triton_floor.json and the logs of each step.
# Every step has a timeout so that the whole check ends within 8 minutes on an H100; a failing step is
# reported and the rest still run. Exit status: 0 if every step passed, 1 otherwise, 2 without a GPU.
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

if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA GPU visible (nvidia-smi missing or torch.cuda.is_available() is False)" | tee "$REPORT" >&2
    exit 2
fi
unset TRITON_INTERPRET

# run_step NAME SECONDS LOG CMD...: runs CMD with a timeout capped by what is left of the budget.
declare -a SUMMARY
run_step() {
    local name=$1 limit=$2 log=$3; shift 3
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    (( left < limit )) && limit=$left
    if (( limit < 15 )); then
        SUMMARY+=("| $name | skipped: out of time | |"); FAILED=1; return
    fi
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
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
export MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
install() {
    PIP_DEFAULT_TIMEOUT=5 "$PY" -m pip install --retries 0 --no-build-isolation -e ".[dev,gpu]" \
        || { echo "--- full install failed (offline?); installing without dependencies ---";
             "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; }
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
run_step "install (build decafa_fast._C for sm_${TORCH_CUDA_ARCH_LIST/./})" 130 "$OUT/install.log" bash -c install

# 2. tests: the op tests natively on the GPU, then whatever else is marked `cuda`.
#    Kernel compilation dominates on a fresh machine: spread it over 4 workers when pytest-xdist is there.
OP_TESTS=$(ls tests/test_ops_triton.py tests/test_ops_cuda.py 2>/dev/null | tr '\n' ' ')
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
run_step "GPU op tests ($OP_TESTS$XDIST)" 100 "$OUT/tests.log" \
    "$PY" -m pytest -q -p no:cacheprovider -rs $XDIST $OP_TESTS
# 3. the Triton head against its floor, with a short tuning sweep (forward only)
run_step "bench/triton_floor.py --sweep" 90 "$OUT/triton_floor.log" \
    "$PY" bench/triton_floor.py --sweep --budget-s 75 --json "$OUT/triton_floor.json"

# 3b. the CUDA C++ head against the same floor (its table goes to the log and the report; the device
#     machine returns at most 8 files)
run_step "bench/cuda_floor.py" 70 "$OUT/cuda_floor.log" "$PY" bench/cuda_floor.py

# 4. pytest-benchmark suites (the quick subset by default: the full grid does not fit in the budget;
#    GPU_CHECK_BENCH_ARGS="" runs everything)
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS---decafa-quick}
run_step "pytest bench/ --benchmark-only $BENCH_ARGS" 60 "$OUT/bench.log" \
    "$PY" -m pytest bench/ -q -p no:cacheprovider --benchmark-only $BENCH_ARGS --benchmark-json "$OUT/bench.json"

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
    echo "## Install"; echo '```'; tail -n 12 "$OUT/install.log" 2>/dev/null; echo '```'
    echo "## Tests"; echo '```'; tail -n 25 "$OUT/tests.log" 2>/dev/null; echo '```'
    echo "## Triton head vs floor (bench/triton_floor.py)"
    grep -v '^|' "$OUT/triton_floor.log" 2>/dev/null | grep -E 'device|error|FAIL|sweep' | sed 's/^/    /'
    echo
    grep '^|' "$OUT/triton_floor.log" 2>/dev/null
    echo
    echo "## CUDA C++ head vs floor (bench/cuda_floor.py)"
    echo '```'; tail -n 30 "$OUT/cuda_floor.log" 2>/dev/null; echo '```'
    echo
    echo "## pytest-benchmark (bench.json)"
    if [[ -s "$OUT/bench.json" ]]; then
        "$PY" - "$OUT/bench.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
print("| benchmark | median (us) | extra |\n|---|---|---|")
for b in data.get("benchmarks", []):
    extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.get("extra_info", {}).items()
                      if not isinstance(v, (dict, list)))
    print(f"| {b['name']} | {b['stats']['median'] * 1e6:.1f} | {extra[:200]} |")
EOF
    else
        echo '```'; tail -n 20 "$OUT/bench.log" 2>/dev/null; echo '```'
    fi
    echo
    echo "total $(( $(date +%s) - START ))s"
} >"$REPORT" 2>&1
echo "[gpu_check] report: $REPORT ($(( $(date +%s) - START ))s)"
exit $FAILED
