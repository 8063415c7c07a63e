"""Bad input gets a clear ValueError / TypeError naming the argument; backend selection is checked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from decafa_fast import ops


def good():
    return torch.randn(2, 3, 4, 5), torch.rand(2, 1, 4, 5), torch.randn(2, 6, 4, 5)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda t, i, e: ops.soft_argmax(t[0]), ValueError, ["logits", "rank 4"]),
        (lambda t, i, e: ops.spatial_softmax(t[None]), ValueError, ["logits", "rank 4"]),
        (lambda t, i, e: ops.soft_argmax(t.to(torch.int32)), TypeError, ["logits", "int32"]),
        (lambda t, i, e: ops.attention_mask(t.numpy()), TypeError, ["logits", "ndarray"]),
        (lambda t, i, e: ops.soft_argmax(t[:, :0]), ValueError, ["L >= 1"]),
        (lambda t, i, e: ops.soft_argmax(t[:, :, :0]), ValueError, ["H >= 1"]),
        (lambda t, i, e: ops.soft_argmax(t, beta=float("inf")), ValueError, ["beta", "finite"]),
        (lambda t, i, e: ops.soft_argmax(t, beta=torch.tensor([1])), TypeError, ["beta", "floating"]),
        (lambda t, i, e: ops.soft_argmax(t, beta="1.0"), TypeError, ["beta", "str"]),
        (lambda t, i, e: ops.soft_argmax(t, beta=torch.ones(4)), ValueError, ["beta", "(B, L)"]),
        (lambda t, i, e: ops.soft_argmax(t, beta=torch.ones(3).to("meta")), ValueError, ["beta", "device"]),
        (lambda t, i, e: ops.decafa_head(t, i[:1], e), ValueError, ["image", "batch"]),
        (lambda t, i, e: ops.decafa_head(t, i, e[:, :, :3]), ValueError, ["embedding", "H=4"]),
        (lambda t, i, e: ops.decafa_head(t, i.double(), e), TypeError, ["image", "dtype"]),
        (lambda t, i, e: ops.decafa_head(t, i, e.to("meta")), ValueError, ["embedding", "device"]),
        (lambda t, i, e: ops.decafa_head(t, i, e, mode="F6"), ValueError, ["mode", "F5"]),
        (lambda t, i, e: ops.decafa_head(t, i, e[0]), ValueError, ["embedding", "rank 4"]),
        (lambda t, i, e: ops.fuse(i, e, i.expand(2, 2, 4, 5)), ValueError, ["mask", "1 channel"]),
        (lambda t, i, e: ops.fuse(i, e.half(), i), TypeError, ["embedding", "dtype"]),
        (lambda t, i, e: ops.fuse(i.long(), e, i), TypeError, ["image", "int64"]),
    ],
)
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call(*good())
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"


def test_every_backend_rejects_bad_input_the_same_way():
    for name in ("reference", "cpp"):
        ops.set_backend(name)
        try:
            with pytest.raises(ValueError, match="logits"):
                ops.soft_argmax(torch.randn(3, 4, 5))
        finally:
            ops.set_backend("auto")


def test_set_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("numba")
    unavailable = [name for name, status in ops.backends().items() if not status.startswith("available")]
    for name in unavailable:
        with pytest.raises(RuntimeError, match=name):
            ops.set_backend(name)
    assert ops.get_backend() == "auto"


def test_backends_reports_every_backend_with_a_reason():
    status = ops.backends()
    assert set(status) == set(ops.BACKENDS)
    assert status["reference"] == "available" and status["cpp"] == "available"
    for name, text in status.items():
        assert text, f"{name} has no status text"


def test_cuda_backend_refuses_cpu_tensors():
    if not ops.backends()["cuda"].startswith("available"):
        pytest.skip("CUDA backend not available: " + ops.backends()["cuda"])
    ops.set_backend("cuda")
    try:
        with pytest.raises(ValueError, match="CUDA tensors"):
            ops.soft_argmax(torch.randn(1, 1, 2, 2))
    finally:
        ops.set_backend("auto")


@pytest.mark.slow
def test_environment_variable_selects_backend():
    code = "from decafa_fast import ops; print(ops.get_backend())"
    env = dict(os.environ, DECAFA_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DECAFA_BACKEND"] = "bogus"
    # a bad value warns in one line naming the variable, the value and the choices, then runs on "auto"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert bad.stdout.strip() == "auto"
    warning = [line for line in bad.stderr.splitlines() if "DECAFA_BACKEND" in line]
    assert len(warning) == 1 and "'bogus'" in warning[0] and "reference" in warning[0]
    assert "Traceback" not in bad.stderr
    # a backend this machine cannot run warns in one line with the reason and runs on "auto" too
    missing = [name for name, why in ops.backends().items() if not why.startswith("available")]
    if missing:
        env["DECAFA_BACKEND"] = missing[0]
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "auto"
        warning = [line for line in out.stderr.splitlines() if "DECAFA_BACKEND" in line]
        assert len(warning) == 1 and "not available" in warning[0] and "Traceback" not in out.stderr


def test_reference_and_cpp_agree_on_auto_for_cpu():
    ops.set_backend("auto")
    t = torch.randn(2, 3, 6, 6)
    ops.set_backend("reference")
    ref = ops.soft_argmax(t)
    ops.set_backend("auto")
    torch.testing.assert_close(ops.soft_argmax(t), ref, rtol=1e-5, atol=1e-5)
