"""The Triton backend (decafa_triton::*) against decafa_fast.reference: values, gradients, layouts, edge sizes,
opcheck, torch.compile, determinism.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1: float32 and
float16, and bfloat16 where the interpreter has it - Triton 3.9's does, older ones skip it with the reason).
With a GPU the same tests run natively on CUDA.
The interpreter must be chosen before triton or decafa_fast is imported: tests/conftest.py does that, and so
does the top of this module when run alone. If decafa_fast was nevertheless imported earlier in this process
without it, the tests here skip and `test_in_fresh_process` reruns this module in a subprocess instead.

Tolerances: tests/harness.py's TRITON_KERNELS profile, against the reference run in float32 on the same
inputs: float32 values rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 / atol 1e-5; float16 rtol 2e-3 / atol 2e-3;
bfloat16 rtol 1.6e-2 / atol 1e-2 (atol scaled by the largest reference magnitude for gradients and halves).
"""
import os
import shutil
import sys

_IMPORTED_BEFORE = "decafa_fast" in sys.modules
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from decafa_fast import ops, reference  # noqa: E402
from decafa_fast.contract.layout import FUSION_MODES  # noqa: E402
from harness import TRITON_KERNELS, make_inputs, opcheck_args, outputs_and_grads, reference_copies  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and not CUDA
try:
    from decafa_fast.triton import ops as tops
except Exception as exc:  # pragma: no cover - triton missing
    tops = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
USABLE = tops is not None and (CUDA or tops.INTERPRET) and ops.backends()["triton"].startswith("available")
DEVICE = torch.device("cuda" if CUDA else "cpu")
NS = torch.ops.decafa_triton if tops is not None else None

# the interpreter evaluates exp(-inf - -inf) in masked-out lanes before where() discards it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

def _bf16_problem() -> str | None:
    """Why this interpreter cannot run bfloat16 (older Triton with numpy has no such dtype), or None. Any
    other failure of the probe is raised by decafa_fast.triton.probe, not reported as "no bfloat16"."""
    if not (INTERPRET and USABLE):
        return None
    from decafa_fast.triton.probe import interpreter_bfloat16_problem

    return interpreter_bfloat16_problem()


_BF16_PROBLEM = _bf16_problem()
NO_BF16 = pytest.mark.skipif(_BF16_PROBLEM is not None, reason=str(_BF16_PROBLEM))
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NO_BF16)]
MODES = FUSION_MODES


@pytest.fixture(autouse=True)
def triton_backend(request):
    if request.node.name == "test_in_fresh_process":
        yield
        return
    if not USABLE:
        pytest.skip(f"Triton backend unusable in this process: {ops.backends()['triton']}")
    before = ops.get_backend()
    ops.set_backend("triton")
    yield
    ops.set_backend(before)


@pytest.fixture
def small_tuning():
    """Tiny blocks: maps swept in chunks of 16 pixels (the path of maps larger than map_block_max), runs of 3
    maps, several pixel and channel steps in the fusion kernels, and rows by integer division (the path of
    maps over 2**20 pixels)."""
    saved = dict(vars(tops.TUNING))
    tops.TUNING.map_block_max, tops.TUNING.map_chunk, tops.TUNING.mask_runs = 4, 16, 2
    tops.TUNING.fuse_block_p, tops.TUNING.fuse_block_c = 16, 2
    tops.TUNING.int_div_above = 0
    yield
    vars(tops.TUNING).update(saved)


# (b, l, h, w, ci, c, dtype, seed=0) on the test device, with a signed image
_inputs = functools.partial(make_inputs, device=DEVICE, signed_image=True)


# (B, L, H, W, Ci, C, mode, normalized, dtype): a sub-grid of H, W in {1, 7, 33, 128, 130}, L in
# {1, 5, 68, 98}, B in {0, 1, 3} and F1-F5 that keeps the interpreter under a few minutes.
HEAD_CASES = [
    (1, 1, 1, 1, 1, 3, "F5", False, torch.float32),
    (3, 5, 7, 33, 1, 4, "F1", True, torch.float32),
    (3, 5, 33, 7, 3, 5, "F2", False, torch.float32),
    (1, 68, 7, 7, 1, 4, "F3", True, torch.float32),
    (1, 98, 7, 33, 1, 3, "F5", True, torch.float32),
    (3, 1, 7, 1, 2, 3, "F4", True, torch.float32),
    (1, 1, 130, 130, 1, 2, "F4", False, torch.float32),
    (1, 3, 128, 128, 1, 2, "F5", True, torch.float32),
    (0, 5, 7, 7, 1, 4, "F5", False, torch.float32),
    (3, 5, 7, 33, 1, 4, "F5", True, torch.float16),
    (1, 68, 1, 33, 3, 4, "F3", False, torch.float16),
    (0, 1, 1, 7, 1, 2, "F2", True, torch.float16),
    pytest.param((3, 5, 7, 33, 1, 4, "F4", False, torch.bfloat16), marks=NO_BF16),
]
if CUDA:  # natively the tuned size is cheap
    HEAD_CASES += [
        (3, 98, 128, 128, 1, 64, "F5", False, torch.float32),
        (3, 98, 128, 128, 1, 64, "F5", True, torch.bfloat16),
        (1, 5, 130, 130, 1, 8, "F4", True, torch.bfloat16),
        (3, 68, 33, 7, 3, 4, "F3", False, torch.bfloat16),
    ]


def _case_id(case):
    b, l, h, w, ci, c, mode, norm, dtype = case
    return f"B{b}-L{l}-{h}x{w}-Ci{ci}-C{c}-{mode}-{'norm' if norm else 'pix'}-{str(dtype)[6:]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", HEAD_CASES, ids=[_case_id(c.values[0] if hasattr(c, "values") else c)
                                                  for c in HEAD_CASES])
def test_head_values_and_grads(case):
    b, l, h, w, ci, c, mode, norm, dtype = case
    t, i, e = _inputs(b, l, h, w, ci, c, dtype)
    beta = 0.7
    outs, grads = outputs_and_grads(lambda *x: ops.decafa_head(*x, mode=mode, beta=beta, normalized=norm), (t, i, e))
    ref_outs, ref_grads = outputs_and_grads(lambda *x: reference.decafa_head(*x, mode=mode, beta=beta, normalized=norm),
                                 reference_copies((t, i, e)))
    for name, o, r in zip(("z", "fused"), outs, ref_outs):
        assert o.shape == r.shape and o.dtype == dtype and o.is_contiguous()
        TRITON_KERNELS.assert_close(o, r, dtype, what=name)
    for name, gr, r in zip(("grad logits", "grad image", "grad embedding"), grads, ref_grads):
        assert gr.shape == r.shape and gr.dtype == dtype
        TRITON_KERNELS.assert_close(gr, r, dtype, grad=True, what=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 33), (1, 5, 1, 130), (2, 1, 33, 1)], ids=str)
def test_map_ops_values_and_grads(shape, dtype):
    t = _inputs(*shape, 1, 1, dtype)[0]
    for name, args in (
        ("spatial_softmax", (0.7,)),
        ("soft_argmax", (1.3, True)),
        ("attention_mask", (-0.5,)),
        ("landmark_attention", (1.0, False)),
    ):
        outs, grads = outputs_and_grads(lambda x: getattr(ops, name)(x, *args), (t,))
        ref_outs, ref_grads = outputs_and_grads(lambda x: getattr(reference, name)(x, *args), reference_copies((t,)))
        for o, r in zip(outs, ref_outs):
            assert o.shape == r.shape and o.dtype == dtype
            TRITON_KERNELS.assert_close(o, r, dtype, what=name)
        TRITON_KERNELS.assert_close(grads[0], ref_grads[0], dtype, grad=True, what=f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_fuse_values_and_grads(mode, dtype):
    g = torch.Generator().manual_seed(3)
    i = torch.randn(3, 2, 7, 9, generator=g).to(DEVICE, dtype)
    e = torch.randn(3, 5, 7, 9, generator=g).to(DEVICE, dtype)
    m = torch.rand(3, 1, 7, 9, generator=g).to(DEVICE, dtype)
    outs, grads = outputs_and_grads(lambda *x: ops.fuse(*x, mode=mode), (i, e, m))
    ref_outs, ref_grads = outputs_and_grads(lambda *x: reference.fuse(*x, mode=mode), reference_copies((i, e, m)))
    TRITON_KERNELS.assert_close(outs[0], ref_outs[0], dtype, what="fused")
    for name, gr, r in zip(("grad image", "grad embedding", "grad mask"), grads, ref_grads):
        TRITON_KERNELS.assert_close(gr, r, dtype, grad=True, what=name)


@pytest.mark.parametrize("mode", ["F1", "F5"])
def test_multi_step_loops_and_chunks(mode, small_tuning):
    """Maps larger than a block (online max rescaling), several channel / map steps, one chunk per b."""
    t, i, e = _inputs(3, 5, 5, 9, 3, 5, torch.float32, seed=4)
    assert tops._runs(5, tops.TUNING.mask_runs) == (2, 3)
    t[1, 2] -= 50.0  # one map far below the others: the mask must still normalise it per map
    outs, grads = outputs_and_grads(lambda *x: ops.decafa_head(*x, mode=mode, beta=1.5, normalized=True), (t, i, e))
    ref_outs, ref_grads = outputs_and_grads(
        lambda *x: reference.decafa_head(*x, mode=mode, beta=1.5, normalized=True), (t, i, e))
    for o, r in zip(outs, ref_outs):
        TRITON_KERNELS.assert_close(o, r, torch.float32)
    for gr, r in zip(grads, ref_grads):
        TRITON_KERNELS.assert_close(gr, r, torch.float32, grad=True)
    phi = ops.spatial_softmax(t, 1.5)
    TRITON_KERNELS.assert_close(phi, reference.spatial_softmax(t, 1.5), torch.float32)
    z, m = ops.landmark_attention(t, 0.5, False)
    rz, rm = reference.landmark_attention(t, 0.5, False)
    TRITON_KERNELS.assert_close(z, rz, torch.float32)
    TRITON_KERNELS.assert_close(m, rm, torch.float32)


def test_small_launch_tiles():
    """A launch with few programs shrinks its pixel tiles and grows them in maps / channels (the B = 1 path
    on a GPU): tiles of 32 pixels x 64 maps / channels, with partial last steps."""
    saved = tops.TUNING.fuse_min_programs
    tops.TUNING.fuse_min_programs = 10**6
    try:
        cfg = tops._fuse_cfg(45, 3, 40, 1, torch.device("cpu"), False)
        assert (cfg["BLOCK_P"], cfg["BLOCK_CI"], cfg["BLOCK_C"]) == (32, 4, 64)
        t, i, e = _inputs(1, 68, 5, 9, 3, 40, torch.float32, seed=12)
        outs, grads = outputs_and_grads(lambda *x: ops.decafa_head(*x, mode="F5", normalized=True), (t, i, e))
        ref_outs, ref_grads = outputs_and_grads(
            lambda *x: reference.decafa_head(*x, mode="F5", normalized=True), (t, i, e))
    finally:
        tops.TUNING.fuse_min_programs = saved
    for o, r in zip([*outs, *grads], [*ref_outs, *ref_grads]):
        TRITON_KERNELS.assert_close(o, r, torch.float32, grad=True)


def test_layouts_channels_last_and_strided():
    """channels_last inputs, a non-flat layout (H and W transposed: copied), expanded upstream grads."""
    t, i, e = _inputs(2, 5, 7, 9, 1, 4, torch.float32, seed=5)
    want_z, want_f = reference.decafa_head(t, i, e, "F5", 1.0, False)
    cl = [x.contiguous(memory_format=torch.channels_last) for x in (t, i, e)]
    z, f = ops.decafa_head(*cl, mode="F5")
    TRITON_KERNELS.assert_close(z, want_z, torch.float32)
    TRITON_KERNELS.assert_close(f, want_f, torch.float32)
    tt = t.transpose(2, 3).contiguous().transpose(2, 3)  # same values, H and W strides swapped
    z, f = ops.decafa_head(tt, i, e, mode="F5")
    TRITON_KERNELS.assert_close(z, want_z, torch.float32)
    TRITON_KERNELS.assert_close(f, want_f, torch.float32)
    # grads of a plain sum arrive expanded (all strides 0)
    xs = [x.clone().requires_grad_(True) for x in cl]
    z, f = ops.decafa_head(*xs, mode="F4", normalized=True)
    (z.sum() + f.sum()).backward()
    rs = [x.clone().requires_grad_(True) for x in (t, i, e)]
    rz, rf = reference.decafa_head(*rs, mode="F4", normalized=True)
    (rz.sum() + rf.sum()).backward()
    for x, r in zip(xs, rs):
        TRITON_KERNELS.assert_close(x.grad, r.grad, torch.float32, grad=True)


@pytest.mark.parametrize("mode", ["F1", "F5"])
def test_head_backward_with_missingoutputs_and_grads(mode):
    t, i, e = _inputs(2, 3, 5, 6, 1, 2, torch.float32, seed=6)
    _, _, m, stats = NS.decafa_head(t, i, e, MODES.index(mode) + 1, 1.0, None, False)
    gz = torch.randn(2, 3, 2).to(DEVICE)
    cf = reference.fused_channels(mode, 1, 2)
    gf = torch.randn(2, cf, 5, 6).to(DEVICE)
    for grad_z, grad_f in ((gz, None), (None, gf), (None, None)):
        gt, gi, ge, _ = NS.decafa_head_backward(grad_z, grad_f, t, i, e, m, stats, MODES.index(mode) + 1, 1.0, None,
                                                False)
        rs = [x.clone().requires_grad_(True) for x in (t, i, e)]
        rz, rf = reference.decafa_head(*rs, mode=mode)
        loss = (rz * gz).sum() * (grad_z is not None) + (rf * gf).sum() * (grad_f is not None)
        want = torch.autograd.grad(loss, rs, allow_unused=True) if loss.requires_grad else [None] * 3
        for got, w, x in zip((gt, gi, ge), want, (t, i, e)):
            TRITON_KERNELS.assert_close(got, torch.zeros_like(x) if w is None else w, torch.float32, grad=True)


@pytest.mark.parametrize("normalized", [False, True])
def test_sharp_softmax_gradient_accuracy(normalized):
    """beta*T ~ 40: the recomputed Phi must be renormalised, or lse's fp32 rounding (~|beta T| ulp) shows up
    as 1e-5 relative errors in the logits gradient. Compared with float64: under 5e-6 of the largest value."""
    t = _inputs(2, 5, 9, 12, 1, 1, torch.float32, seed=13)[0]
    g = torch.Generator().manual_seed(14)
    w = torch.randn(2, 5, 2, generator=g).to(DEVICE)
    for name, args in (("soft_argmax", (4.0, normalized)), ("spatial_softmax", (4.0,))):
        x = t.clone().requires_grad_(True)
        x64 = t.double().requires_grad_(True)
        out, want = getattr(ops, name)(x, *args), getattr(reference, name)(x64, *args)
        weight = w if name == "soft_argmax" else torch.randn(out.shape, generator=g).to(DEVICE)
        (out * weight).sum().backward()
        (want * weight.double()).sum().backward()
        err = (x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()
        assert err < 5e-6, f"{name}: max error {err:.2e} of the largest gradient"


def test_nan_stays_in_its_map_and_extremes():
    t, i, e = _inputs(1, 3, 6, 7, 1, 2, torch.float32, seed=7)
    t[0, 1, 2, 3] = float("nan")
    t[0, 2] = -1e30
    t[0, 2, 4, 5] = float("-inf")
    z = ops.soft_argmax(t)
    assert torch.isnan(z[0, 1]).all()
    assert torch.isfinite(z[0, [0, 2]]).all()
    TRITON_KERNELS.assert_close(z[0, [0, 2]], reference.soft_argmax(t)[0, [0, 2]], torch.float32)


def test_bitwise_deterministic():
    t, i, e = _inputs(3, 5, 7, 33, 1, 4, torch.float32, seed=8)
    a = outputs_and_grads(lambda *x: ops.decafa_head(*x, mode="F5"), (t, i, e))
    b = outputs_and_grads(lambda *x: ops.decafa_head(*x, mode="F5"), (t, i, e))
    for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]]):
        assert torch.equal(x, y)


def test_float64_is_rejected():
    t = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="logits must be float16, bfloat16 or float32"):
        NS.soft_argmax(t, 1.0, None, False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_opcheck(name):
    args = opcheck_args(DEVICE, per_map_beta=True)[name]
    needs_grad = name in (
        "spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "fuse", "decafa_head")
    if needs_grad:
        args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    result = torch.library.opcheck(getattr(NS, name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_forward_and_backward():
    """Under the interpreter the ops are opaque custom ops; on CUDA triton_op exposes the kernels to inductor."""
    t, i, e = _inputs(2, 5, 8, 8, 1, 3, torch.float32, seed=11)

    def head(t, i, e):
        z, f = ops.decafa_head(t, i, e, mode="F5", beta=0.5, normalized=True)
        return z.square().sum() + (f * f).mean()

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    xs = [x.clone().requires_grad_(True) for x in (t, i, e)]
    rs = [x.clone().requires_grad_(True) for x in (t, i, e)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(*xs)
        out.backward()
    ops.set_backend("reference")
    ref = head(*rs)
    ref.backward()
    TRITON_KERNELS.assert_close(out.detach(), ref.detach(), torch.float32)
    for x, r in zip(xs, rs):
        TRITON_KERNELS.assert_close(x.grad, r.grad, torch.float32, grad=True)


def _compile_check(*args: str) -> subprocess.CompletedProcess:
    """Runs decafa_fast.triton.compile_check (real sm_90 code generation, no GPU) in a process without the
    interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "decafa_fast.triton.compile_check", *args],
        capture_output=True, text=True, env=env, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter is lenient: compile the real kernels (a representative subset) for sm_90 too, and
    check that none spills registers to local memory beyond its allowance for this Triton."""
    proc = _compile_check("--quick", "--fail-on-spill", "--dtypes", "fp32,bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all variants compiled" in proc.stdout


@pytest.mark.slow
def test_persistent_kernels_prefetch_with_few_barriers():
    """The persistent per-map kernels, compiled for sm_90: every variant copies the next map to shared memory
    (cp.async) and runs at most 6 block barriers per map (Triton 3.6 and 3.9: 3-6), without a stack."""
    import re

    proc = _compile_check("--only", "pmap", "--dtypes", "fp32,bf16", "--fail-on-spill")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 16, proc.stdout
    for line in lines:
        cp_async = int(re.search(r"cp\.async\s+(\d+)", line).group(1))
        barriers = int(re.search(r"barriers/map\s+(\d+)", line).group(1))
        assert cp_async > 0 and 1 <= barriers <= 6, line


def test_no_kernel_has_a_spill_allowance():
    """Every variant compiles without a stack frame on Triton 3.6 and 3.9 (compile_check's comment): the
    allowance table is empty, so any stack fails --fail-on-spill, for a measured Triton or any other."""
    from decafa_fast.triton import compile_check as cc

    assert cc.SPILL_ALLOWANCE == {}
    for name in ("pmap_bwd head", "pmap_fwd head", "map_bwd head", "map_fwd head", "map_bwd head channels_last",
                 "mask_fuse_fwd F5 (partials)"):
        for version in ("3.6.0", "3.9.0", "3.7.0+git1234", "3.10.0"):
            assert cc.spill_allowance(name, version) == cc.DEFAULT_STACK == 0, (name, version)


def test_barriers_per_map_counts_the_exp_loop():
    """compile_check.barriers_per_map counts the barriers of the PTX loop that computes the most exps (the map
    loop), not those before or after it, nor those of a loop without exps or with fewer (an overflow
    fix-up's pixel loop after the map loop)."""
    from decafa_fast.triton import compile_check as cc

    ptx = "\n".join([
        "bar.sync 0;",
        "$L__BB0_1:", "bar.sync 0;", "@%p1 bra $L__BB0_1;",  # a loop without exps
        "$L__BB0_2:", "ex2.approx.f32 %f1, %f2;", "bar.sync 0;", "barrier.sync 0;",
        "$L__BB0_3:", "add.f32 %f3, %f3, %f1;", "@%p2 bra $L__BB0_3;",  # an inner loop, no exps
        "bar.sync 0;", "@%p3 bra $L__BB0_2;",
        "bar.sync 0;",
    ])
    assert cc.barriers_per_map(ptx) == 3
    fix_up = ["$L__BB0_9:", "ex2.approx.f32 %f4, %f5;", "bar.sync 0;", "@%p4 bra $L__BB0_9;"]
    assert cc.barriers_per_map(ptx.replace("ex2.approx.f32 %f1, %f2;", "ex2.approx.f32 %f1, %f2;\n" * 2)
                               + "\n" + "\n".join(fix_up)) == 3
    assert cc.barriers_per_map("bar.sync 0;\nex2.approx.f32 %f1, %f2;") is None


@pytest.mark.slow
def test_spill_beyond_the_allowance_fails():
    """--fail-on-spill fails loudly (exit status 1, a SPILL line with the stack and the allowance) when a kernel
    uses more stack than allowed. No kernel spills any more, so a negative allowance (overridden for
    pmap_bwd head) stands in for a stack above its allowance; the variant beside it passes."""
    proc = _compile_check("--only", "pmap_bwd head", "--dtypes", "bf16", "--fail-on-spill",
                          "--allowance", "pmap_bwd head=-1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    spilled = [line for line in proc.stdout.splitlines() if line.startswith("SPILL")]
    assert len(spilled) == 1 and "pmap_bwd head " in spilled[0] and "stack 0 bytes > allowed -1" in spilled[0], \
        proc.stdout
    assert "1 variant(s) failed" in proc.stdout
    proc = _compile_check("--only", "pmap_bwd head", "--dtypes", "bf16", "--fail-on-spill")
    assert proc.returncode == 0 and "all variants compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_kernels_keep_float32_with_fp64_float_arguments():
    """torch.compile compiles the kernels of a triton_op with its Python float arguments (beta, the
    coordinate scales) typed fp64, where Triton's JIT and the interpreter use fp32. An fp64 scalar promotes
    the arithmetic to float64: on the GPU (Triton 3.6) map_fwd_kernel failed to compile ("loop-carried
    variable acc ... fp32 ... re-assigned to fp64"), and other variants compiled silently in float64. Every
    kernel variant must compile for sm_90 with fp64 float arguments and hold no f64 operation in its Triton
    IR beyond converting those arguments to float32, and, as with fp32 arguments, without a stack."""
    proc = _compile_check("--float-args", "fp64", "--dtypes", "fp32,bf16", "--fail-on-spill")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL", "FP64", "SPILL"))]
    assert lines and all(line.startswith("ok") for line in lines), proc.stdout
    for dt in ("fp32", "bf16"):  # every kernel was compiled, in both dtypes
        for kernel in ("map_fwd", "map_bwd", "mask_fuse_fwd", "fuse_bwd"):
            assert any(line.split()[1:3] == [dt, kernel] for line in lines), (dt, kernel, proc.stdout)


@pytest.mark.skipif(USABLE or not _IMPORTED_BEFORE, reason="the tests above ran in this process")
def test_in_fresh_process():  # pragma: no cover - only when decafa_fast was imported without the interpreter
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
