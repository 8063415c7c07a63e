#!/usr/bin/env bash
# The op tests (tests/ops) on another torch than CI's main one: .ci/ops-on-torch.sh 2.11.0
#
# Everything happens in a throwaway folder, removed on exit: a venv holding that torch from PyPI, and a copy of
# the checkout's files (tracked, and untracked but not ignored) in which decafa_fast._C is compiled against that
# torch. The copy matters: an editable build writes decafa_fast/_C.<abi>.so in place, and the checkout's own
# _C (compiled against CI's main torch) must not be replaced by one for another torch. The main environment is
# not touched; PYTHONPATH is dropped so the tests import the copy, which is checked before they start.
#
# torch comes from pip's index, PyPI (whose Linux torch wheels are CUDA builds: they import and run on CPU). A
# failed download fails this script, and CI with it: a torch that could not be installed is not a passed run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
    echo "usage: $0 TORCH_VERSION (e.g. 2.11.0)" >&2
    exit 2
fi
version=$1
start=$SECONDS
say() { echo "ops-on-torch $version: $* [$((SECONDS - start)) s]"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/decafa-torch-$version.XXXXXX")
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

say "venv in $work"
python3 -m venv "$work/venv"
py=$work/venv/bin/python
# What tests/ops imports: pytest, numpy, kornia (the conformance and parity tests), ninja and setuptools (the
# build tests, and this build without build isolation). torch brings its Triton with it on Linux x86-64.
# numpy<2.4: Triton 3.6's interpreter (torch 2.11's Triton) calls int() on one-element arrays, which numpy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars" from the interpreted kernels).
if ! "$py" -m pip install --quiet --retries 3 --timeout 60 "torch==$version" "numpy<2.4" ninja \
        "setuptools>=70.1" pytest kornia; then
    echo "ops-on-torch $version: cannot install torch $version and the test tools from PyPI; failing, not" \
         "skipping" >&2
    exit 1
fi

say "copying the checkout"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard |
    tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$work/src"

# FORCE_CUDA=0: the CPU kernels only, even where nvcc is installed (this torch is a CUDA build), here and in
# the tests' own builds; the CUDA kernels are compiled and tested on the GPU machine.
export FORCE_CUDA=0
export XDG_CACHE_HOME="$work/cache" TRITON_CACHE_DIR="$work/cache/triton" DECAFA_EXTENSIONS_DIR="$work/extensions"
cd "$work/src"
say "building decafa_fast._C against torch $version"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install --quiet --no-build-isolation --no-deps -e .

"$py" - "$version" "$work/src" <<'EOF'
import sys
from pathlib import Path

import torch
import triton

from decafa_fast import ops
from decafa_fast.ops import extension

version, src = sys.argv[1], Path(sys.argv[2]).resolve()
assert torch.__version__.split("+")[0] == version, f"torch {torch.__version__} is running, not {version}"
assert extension.extension_error is None, extension.extension_error
for name, path in (("decafa_fast", ops.__file__), ("decafa_fast._C", extension.extension_path)):
    assert Path(path).resolve().is_relative_to(src), f"{name} comes from {path}, not from the copy in {src}"
assert ops.backends()["cpp"] == "available", ops.backends()
print(f"torch {torch.__version__}, triton {triton.__version__}, decafa_fast._C: {extension.extension_path}")
EOF

# The quick op tests, then the op tests' Triton cases (under the interpreter, which is why they are marked slow)
say "tests/ops -m 'not slow'"
"$py" -m pytest tests/ops -q -rs -m "not slow"
say "tests/ops -m slow -k triton"
"$py" -m pytest tests/ops -q -rs -m slow -k triton
say "passed"
