"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter on CPU tensors: that has to be
decided before triton or decafa_fast is imported, so it is set here, first."""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from decafa_fast import ops

COMPILED_BACKENDS = ("cpp", "triton", "cuda")


def backend_device(name: str) -> torch.device:
    """The device a backend runs on here: CUDA for "cuda", and for "triton" when a GPU is present."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(name: str) -> bool:
    return name == "triton" and not torch.cuda.is_available()


# Under the interpreter (no GPU) the Triton case of every backend-parametrised test takes seconds, not
# milliseconds: a quick run (-m "not slow") leaves it to tests/triton/, which covers the kernels on their own.
_BACKEND_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if interpreted(name) else name
                   for name in COMPILED_BACKENDS]


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request):
    """Each compiled backend in turn (skipped, with the reason, where it is not available); restores "auto"."""
    status = ops.backends()[request.param]
    if not status.startswith("available"):
        pytest.skip(f"backend {request.param!r}: {status}")
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


@pytest.fixture
def reference_backend():
    ops.set_backend("reference")
    yield
    ops.set_backend("auto")
