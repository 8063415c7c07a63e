#!/usr/bin/env bash
# One GPU check on a fresh CUDA machine with this repository checked out:
#   bench/gpu_check.sh OUTDIR
# 1. install: builds decafa_fast._C with CUDA (CUDA_HOME: see below) and the package, offline if need be;
# 2. tests: the Triton and CUDA op tests natively on the GPU (bf16 included), failures listed (-rfEs);
# 3. head_floor: the Triton and CUDA C++ heads against each other, the floor and (last) the references,
#    every GPU case of every dtype before any torch.compile (bench/head_floor.py);
# 3b. tests_ring, head_floor_ring: the CUDA op tests and the CUDA C++ head again with the new kernel set: the
#    ring kernels of the per-map passes and the pixel kernel's programmatic dependent launch
#    (DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1), old and new kernels side by side;
# 4. bench_model: the whole model, eager B = 1 and B = 64 bf16 for reference, triton and cuda, CUDA graphs
#    at B = 1, and only then torch.compile (bench/model_check.py);
# 3c. triton_kernels: each Triton per-map kernel on its own, persistent vs per-run (bench/triton_kernels.py);
# 5. bench_ops: the pytest-benchmark ops suite, quick subset (its Triton-vs-CUDA races become the auto table);
# 5b. ncu (when ncu exists, with what the budget leaves): one profiled call of each CUDA kernel of the head,
#    forward and forward + backward, float32 and bfloat16 at B = 64, run kernels then ring kernels
#    (bench/ncu_head.py): DRAM bytes and throughput, issue activity, stall reasons, achieved occupancy, waves
#    (the raw CSV in steps.log);
# 6. results: gpu-<date>-<gpu>.json (bench/gpu_results.py): commit, device, clocks, copy rate and one row per
#    timed case of head_floor (both runs), bench_model and bench_ops; commit it under bench/results/.
# Writes into OUTDIR (8 files at most come back from the device machine): report.md (rewritten after every
# step; the tables of rows.jsonl at the end), steps.log (each step's output, appended as the step ends), head_floor.json, model.json,
# rows.jsonl, triton_kernels_table.json (the Triton tuning-table entry for this GPU), auto_table.json (commit it as decafa_fast/auto_table.json so that "auto" runs
# the faster backend on this GPU), gpu-<date>-<gpu>.json. Every step writes its results as it goes; each step and each case inside
# the Python steps checks the deadline, so the whole check ends within 8 minutes; a failing step is reported
# and the rest still run. Exit status: 0 if every step passed, 1 otherwise, 2 without a GPU.
# GPU_CHECK_ALLOW_CPU=1 runs it without a GPU (to test the script itself: the GPU parts then fail or skip).
# PYTHON picks the interpreter (default: the first of python3, python that imports torch).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
else
    PY=python3
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$candidate; break
        fi
    done
fi
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

# The CUDA toolkit of the build: $CUDA_HOME when set, else the toolkit of the nvcc that runs (on the lent
# machines /usr/local/bin/nvcc is a wrapper script: CUDA_HOME=/usr/local would then miss libcudart, so ask
# nvcc where it lives), else the toolkit of torch's CUDA version.
cuda_home() {
    local top version dir
    if command -v nvcc >/dev/null 2>&1; then
        top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
        if [[ -n "$top" && -d "$top" ]]; then (cd "$top" && pwd -P); return; fi
    fi
    version=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
    for dir in "/usr/local/cuda-$version" /usr/local/cuda; do
        if [[ -x "$dir/bin/nvcc" ]]; then echo "$dir"; return; fi
    done
}
if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME=$(cuda_home)
    [[ -n "$CUDA_HOME" ]] && export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
fi

MACHINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
    triton.__version__)" 2>&1
    echo "CUDA_HOME=${CUDA_HOME:-} python=$PY")

# step_limit SECONDS: SECONDS capped by what is left of the budget (10 s kept for the report).
step_limit() {
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    (( left < $1 )) && echo "$left" || echo "$1"
}

# run_step NAME SECONDS CMD...: runs CMD with a timeout of step_limit SECONDS (the command may read it as
# $STEP_LIMIT). Logs to $LOGS/NAME.log, appended to OUTDIR/steps.log when the step ends; the report is
# rewritten after every step that ran.
LOGS=$(mktemp -d)
: >"$OUT/steps.log"
declare -a SUMMARY
run_step() {
    local name=$1 limit; shift 1
    limit=$(step_limit "$1"); shift 1
    if (( limit < 15 )); then
        SUMMARY+=("| $name | skipped: out of time | |"); FAILED=1; return
    fi
    export STEP_LIMIT=$limit
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT after ${limit}s"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED (exit $rc)"
    (( rc != 0 )) && FAILED=1
    SUMMARY+=("| $name | $verdict | ${dt}s |")
    { echo "===== $name ($verdict, ${dt}s) ====="; cat "$LOGS/$name.log"; } >>"$OUT/steps.log"
    echo "[gpu_check] $name: $verdict (${dt}s)"
    write_report
}

write_report() {
    {
        echo "# decafa-fast GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo '```'
        echo "$MACHINE"
        echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
        echo '```'
        echo
        echo "| step | result | time |"
        echo "|---|---|---|"
        printf '%s\n' "${SUMMARY[@]}"
        echo
        echo "## Install"; echo '```'; tail -n 12 "$LOGS/install.log" 2>/dev/null; echo '```'
        echo "## Tests (failures listed by -rfEs)"; echo '```'
        grep -E '^(FAILED|ERROR|SKIPPED)' "$LOGS/tests.log" 2>/dev/null | head -n 40
        tail -n 3 "$LOGS/tests.log" 2>/dev/null; echo '```'
        echo "## decafa_head: Triton vs CUDA C++ vs the floor (bench/head_floor.py)"
        grep -E '^(device|backend|FAIL|sweep stopped|skipped)|relative error' "$LOGS/head_floor.log" 2>/dev/null \
            | sed 's/^/    /'
        echo
        if grep -q '^|' "$LOGS/head_floor.log" 2>/dev/null; then
            grep '^|' "$LOGS/head_floor.log"
        else  # cut off before its table: the cases it printed as it went
            grep -E ' us( |$)' "$LOGS/head_floor.log" 2>/dev/null | sed 's/^/    /'
        fi
        echo
        echo "## decafa_head, CUDA C++ with the ring kernels and the programmatic launch (DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1)"
        grep -E '^(device|FAIL|skipped)|relative error' "$LOGS/head_floor_ring.log" 2>/dev/null | sed 's/^/    /'
        grep '^|' "$LOGS/head_floor_ring.log" 2>/dev/null
        grep -E '^(FAILED|ERROR)' "$LOGS/tests_ring.log" 2>/dev/null | head -n 20
        tail -n 1 "$LOGS/tests_ring.log" 2>/dev/null | sed 's/^/    tests with the ring: /'
        echo
        echo "## The whole model (bench/model_check.py)"
        if grep -q '^|' "$LOGS/bench_model.log" 2>/dev/null; then
            grep '^|' "$LOGS/bench_model.log"
        else
            grep -E ' ms|FAILED|skipped' "$LOGS/bench_model.log" 2>/dev/null | sed 's/^/    /'
        fi
        echo
        echo "## pytest-benchmark ops suite, quick subset (every row measured is in rows.jsonl)"
        grep -E '(passed|failed|error|skipped)' "$LOGS/bench_ops.log" 2>/dev/null | tail -n 2 | sed "s/^/    /"
        if [[ "${1:-}" == final && -s "$OUT/rows.jsonl" ]]; then  # (a Python start: only once, at the end)
            "$PY" -m decafa_fast.app.cli bench --report "$OUT/rows.jsonl" 2>&1 | tail -n +3
        fi
        echo
        echo "## The auto backend's table (auto_table.json)"
        echo '```'; head -n 80 "$OUT/auto_table.json" 2>/dev/null; echo '```'
        echo
        echo "total $(( $(date +%s) - START ))s"
    } >"$REPORT" 2>&1
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
echo "[gpu_check] building for sm ${TORCH_CUDA_ARCH_LIST} with CUDA_HOME=${CUDA_HOME:-unset}"
run_step install "${GPU_CHECK_INSTALL_S:-120}" bash -c install

# 2. the op tests natively on the GPU. Kernel compilation dominates on a fresh machine: spread it over
#    4 workers when pytest-xdist is there.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
run_step tests 60 "$PY" -m pytest -q -p no:cacheprovider -rfEs $XDIST tests/triton/test_ops_triton.py \
    tests/cuda/test_ops_cuda.py

# 3. the Triton and CUDA C++ heads raced against each other and the floor (every GPU case first), then the
#    references, then a short Triton tuning sweep; each case checks the step's deadline before it starts.
run_step head_floor 75 bash -c '"$PY" bench/head_floor.py --sweep --budget-s $((STEP_LIMIT - 15)) \
    --json "$0/head_floor.json"' "$OUT"

# 3b. the ring kernels beside the run kernels: the CUDA op tests, then the CUDA head raced again (its json
#     stays with the logs: gpu_results.py folds its cuda rows into the record, marked maps=ring).
run_step tests_ring 25 env DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    tests/cuda/test_ops_cuda.py
run_step head_floor_ring 35 env DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1 bash -c '"$PY" bench/head_floor.py --backends cuda \
    --no-compile --budget-s $((STEP_LIMIT - 10)) --json "$0/head_floor_ring.json"' "$LOGS"

# 3c. each Triton per-map kernel on its own, persistent vs per-run kernels, B = 1 (eager and CUDA graph) and 64
#     (its json stays with the logs: gpu_results.py folds its rows into the record; its tuning-table entry
#     goes to the report's folder, to be copied into decafa_fast/triton/tuning_table.json)
run_step triton_kernels 50 bash -c '"$PY" bench/triton_kernels.py --reps 10 --budget-s $((STEP_LIMIT - 15)) \
    --json "$0/triton_kernels.json" --table-out "$0/triton_kernels_table.json"' "$LOGS"

# 4. the whole model: eager B = 1 and 64 (bf16) for reference, triton, cuda; CUDA graphs at B = 1; then the
#    compiled variants while the step's time lasts.
run_step bench_model 60 bash -c '"$PY" bench/model_check.py --budget-s $((STEP_LIMIT - 25)) \
    --json "$0/model.json"' "$OUT"

# 5. the pytest-benchmark ops suite, quick subset (GPU_CHECK_BENCH_ARGS="" runs everything). Rows stream
#    into rows.jsonl as they are measured, so a step cut off by its timeout still reports them; the suite
#    saves its Triton-vs-CUDA races as the auto table. No torch.compile'd reference here (head_floor times it).
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS---decafa-quick}
run_step bench_ops 45 "$PY" -m pytest bench/test_ops.py --benchmark-only -q -p no:cacheprovider -rfEs \
    --decafa-no-summary --decafa-rows "$OUT/rows.jsonl" $BENCH_ARGS \
    --decafa-backends "${GPU_CHECK_OPS_BACKENDS:-reference,kornia,triton,cuda}" \
    --benchmark-json "$LOGS/bench_ops.json" --decafa-auto-table "$OUT/auto_table.json"

# 5b. ncu metrics per kernel, both kernel sets (skipped without ncu; last, since it gets what the budget leaves)
NCU_SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats"
if command -v ncu >/dev/null 2>&1; then
    export NCU_SECTIONS
    run_step ncu 120 bash -c 'for maps in onchip ring; do echo "=== DECAFA_CUDA_MAPS=$maps ==="; \
        DECAFA_CUDA_MAPS=$maps ncu --profile-from-start off --csv --page details $NCU_SECTIONS \
        "$PY" bench/ncu_head.py --batch 64 || exit 1; done'
else
    SUMMARY+=("| ncu | skipped: ncu not found | |")
fi

# 6. the machine-readable record (clocks as read now, after the run)
CLOCKS=$(nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null \
    | head -n 1)
"$PY" bench/gpu_results.py --head-floor "$OUT/head_floor.json" --head-floor-ring "$LOGS/head_floor_ring.json" \
    --model "$OUT/model.json" --ops-rows "$OUT/rows.jsonl" --triton-kernels "$LOGS/triton_kernels.json" --clocks "$CLOCKS" --out-dir "$OUT" || FAILED=1
[ -f "$LOGS/triton_kernels_table.json" ] && cp "$LOGS/triton_kernels_table.json" "$OUT/"
write_report final
rm -rf "$LOGS"
echo "[gpu_check] report: $REPORT ($(( $(date +%s) - START ))s)"
exit $FAILED
