"""Outputs of 32 MiB and more take the CPU kernels' streaming-store paths (csrc/cpu/stream_store.h: the fusion
output, grad E, grad T) and come from the output cache: at the paper's shape they must match the reference
as the small shapes of test_ops.py do (tests/harness.py's ROUNDED_REFERENCE profile), and a second call, on
reused blocks, or on one thread instead of several, must give the same bits."""
from __future__ import annotations

import pytest
import torch

from decafa_fast import ops, reference
from harness import ROUNDED_REFERENCE, make_inputs, outputs_and_grads

pytestmark = pytest.mark.skipif(ops.backends()["cpp"] != "available", reason="the C++ extension is not built")

STREAMING_BYTES = 32 << 20  # csrc/cpu/stream_store.h kStreamingBytes


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_paper_shape_head_forward_and_backward_match_the_reference(beta):
    # B = 8, L = 98, 128 x 128, C = 64, float32: F 68 MB, grad T 51 MB, grad E 33.5 MB, all streamed
    inputs = make_inputs(8, 98, 128, 128, ci=1, c=64, seed=3)
    assert inputs[2].nbytes >= STREAMING_BYTES and inputs[0].nbytes >= STREAMING_BYTES

    def head(t, i, e):
        with ops.use_backend("cpp"):
            return ops.decafa_head(t, i, e, "F5", beta)

    outs, grads = outputs_and_grads(head, inputs)
    ref_outs, ref_grads = outputs_and_grads(lambda t, i, e: reference.decafa_head(t, i, e, "F5", beta), inputs)
    for what, a, b in zip(("z", "F"), outs, ref_outs):
        ROUNDED_REFERENCE.assert_close(a, b, torch.float32, what=what)
    for what, a, b in zip(("grad T", "grad I", "grad E"), grads, ref_grads):
        ROUNDED_REFERENCE.assert_close(a, b, torch.float32, grad=True, what=what)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again, grads_again = outputs_and_grads(head, inputs)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(outs + tuple(grads), again + tuple(grads_again)))


def test_paper_shape_softmax_matches_the_reference():
    t = make_inputs(8, 98, 128, 128, seed=4)[0]
    with ops.use_backend("cpp"):
        phi = ops.spatial_softmax(t)
    ROUNDED_REFERENCE.assert_close(phi, reference.spatial_softmax(t), torch.float32, what="Phi")
