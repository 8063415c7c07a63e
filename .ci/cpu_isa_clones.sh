#!/usr/bin/env bash
# The CPU op tests once per clone of the C++ kernels (AVX-512, AVX2, baseline; csrc/cpu/isa.h), each forced
# with DECAFA_CPU_ISA, so that the clones the CI machine would not pick by itself run too. Needs the built
# extension (.ci/run's install). A clone the CPU cannot run is reported and skipped (DECAFA_REQUIRE_ALL_CLONES=1
# makes that an error). The subset: the ops tests that call the C++ kernels (the cpp backend's cases of
# test_ops, test_ops_autograd, test_ops_contract, test_cpu_large_outputs, test_beta_overflow), -m "not slow",
# without the float64 gradchecks (float64 takes std::exp, not the clones' vector exp, and they are most of the
# time); test_cpu_simd.py, which sets DECAFA_CPU_ISA in its own subprocesses, runs once in the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TESTS=(tests/ops/test_ops.py tests/ops/test_ops_autograd.py tests/ops/test_ops_contract.py
       tests/ops/test_cpu_large_outputs.py tests/ops/test_beta_overflow.py)
SELECT="not triton and not cuda and not gradcheck"

missing=0
for isa in avx512 avx2 baseline; do
  active=$(DECAFA_CPU_ISA=$isa "$PYTHON" -c \
    "import sys; sys.path.insert(0, 'tests/ops'); from test_cpu_simd import active_isa; print(active_isa())")
  if [ "$active" != "$isa" ]; then
    echo "cpu_isa_clones: this CPU cannot run the $isa clone (DECAFA_CPU_ISA=$isa ran $active): not tested here"
    missing=1
    continue
  fi
  echo "cpu_isa_clones: DECAFA_CPU_ISA=$isa"
  start=$SECONDS
  DECAFA_CPU_ISA=$isa "$PYTHON" -m pytest "${TESTS[@]}" -q -m "not slow" -k "$SELECT" -p no:cacheprovider
  echo "cpu_isa_clones: $isa passed in $((SECONDS - start)) s"
done
if [ "$missing" = 1 ] && [ "${DECAFA_REQUIRE_ALL_CLONES:-0}" = 1 ]; then
  echo "cpu_isa_clones: DECAFA_REQUIRE_ALL_CLONES=1 and a clone could not run on this CPU" >&2
  exit 1
fi
