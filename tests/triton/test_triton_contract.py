"""decafa_triton::* against op contract v2 (/work/notes/OPS_V2.md), called raw: schemas from the single
source, shared fakes (opcheck), values and every gradient (grad_beta included) against a float64 autograd
oracle, beta_map, one-pixel normalised axes, F in E's memory format, channels_last inputs, float32 exact
at |beta*T| up to 1e30, NaN confined to its map, bitwise determinism, argument checks, device guards.

Tolerances: float32 outputs and gradients within 2e-6 of the largest oracle magnitude (float32 sums over
at most a few hundred terms); the 1e30 test requires the contract's relative 1e-6 element by element.
Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it).
"""
import ast
import inspect
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

tops = pytest.importorskip("decafa_fast.triton.ops")
from decafa_fast.contract.fakes import FAKES  # noqa: E402
from decafa_fast.contract.schemas import SCHEMAS  # noqa: E402
from harness import opcheck_args  # noqa: E402

NS = torch.ops.decafa_triton
DEVICE = torch.device("cpu" if tops.INTERPRET else "cuda")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


# ------------------------------------------------------------------------------------------------
# float64 oracle (plain autograd)
# ------------------------------------------------------------------------------------------------
def _axis(n, normalized):
    if not normalized:
        return torch.arange(n, dtype=torch.float64)
    return torch.zeros(1, dtype=torch.float64) if n == 1 else torch.linspace(-1, 1, n, dtype=torch.float64)


def oracle(t, i, e, mode, beta, normalized):
    """(z, F, M, Phi) in float64; beta a float or a (B, L) tensor."""
    b, l, h, w = t.shape
    beta = beta if isinstance(beta, torch.Tensor) else torch.full((b, l), float(beta), dtype=torch.float64)
    phi = torch.softmax(t.reshape(b, l, h * w) * beta[..., None], -1)
    ys, xs = torch.meshgrid(_axis(h, normalized), _axis(w, normalized), indexing="ij")
    z = torch.stack([phi @ xs.reshape(-1), phi @ ys.reshape(-1)], -1)
    m = phi.sum(1).reshape(b, 1, h, w)
    if i is None:
        return z, None, m, phi.reshape(t.shape)
    blocks = {1: [e], 2: [i * m], 3: [i, i * m], 4: [i, i * m, e * m], 5: [i, i * m, e, e * m]}
    f = torch.cat(blocks[mode], 1)
    return z, f, m, phi.reshape(t.shape)


def _inputs(b, l, h, w, ci, c, seed=0, scale=3.0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, l, h, w, generator=g) * scale, torch.randn(b, ci, h, w, generator=g),
          torch.randn(b, c, h, w, generator=g)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [x.to(DEVICE).contiguous(memory_format=fmt) for x in xs]


def _close(got, want, what, rel=2e-6):
    want = torch.zeros_like(got, dtype=torch.float64) if want is None else want.detach()
    scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
    err = (got.detach().double().cpu() - want.cpu()).abs().max().item() if want.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def _beta_args(per_map, b, l, seed=5):
    if not per_map:
        return 0.7, None, 0.7
    bm = (torch.rand(b, l, generator=torch.Generator().manual_seed(seed)) + 0.3).to(DEVICE)
    return 123.0, bm, bm.double().cpu().requires_grad_(True)  # the float is ignored when beta_map is given


def _f64(xs):
    return [x.detach().double().cpu().requires_grad_(True) for x in xs]


# ------------------------------------------------------------------------------------------------
# Registration: one schema source, shared fakes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_the_single_source(name):
    """Interpreter: registered from the SCHEMAS string. GPU: triton_op infers the schema from the body's type
    hints, so the inference must give SCHEMAS (torch infers a Python int as SymInt, the only difference)."""
    want = torch._C.parse_schema(f"decafa_triton::{name}{SCHEMAS[name]}")
    inferred = torch._C.parse_schema(
        f"decafa_triton::{name}" + torch._library.infer_schema.infer_schema(tops.IMPLS[name], mutates_args=()))
    for got in (getattr(NS, name).default._schema, inferred):
        assert [a.name for a in got.arguments] == [a.name for a in want.arguments]
        assert [str(a.type).replace("SymInt", "int") for a in got.arguments] == [str(a.type) for a in want.arguments]
        assert [str(r.type) for r in got.returns] == [str(r.type) for r in want.returns]
    if tops.INTERPRET:
        assert str(getattr(NS, name).default._schema) == str(want)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_opcheck_with_the_shared_fakes(name):
    """The registered fake is the shared one of decafa_fast.contract.fakes, and opcheck finds the kernels agree
    with it (shapes, dtypes, strides: F channels_last from a channels_last E)."""
    from torch._library.custom_ops import OPDEFS

    assert OPDEFS[f"decafa_triton::{name}"]._abstract_fn is FAKES[name]
    args = opcheck_args(DEVICE, per_map_beta=True, channels_last=True)[name]
    result = torch.library.opcheck(getattr(NS, name), args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------
HEAD_CASES = [  # (B, L, H, W, Ci, C, mode, normalized, per-map beta, channels_last)
    (2, 5, 7, 9, 1, 4, 5, True, False, False),
    (2, 5, 7, 9, 2, 3, 4, False, True, False),
    (1, 3, 1, 9, 1, 2, 3, True, False, False),  # one-pixel y axis
    (2, 4, 6, 1, 1, 2, 2, True, True, False),  # one-pixel x axis
    (2, 5, 7, 9, 1, 4, 5, True, True, True),
    (2, 6, 5, 6, 1, 3, 1, False, True, True),
    (0, 3, 4, 4, 1, 2, 5, False, True, False),
]


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "B{}-L{}-{}x{}-Ci{}-C{}-F{}-{}-{}-{}".format(
    *c[:7], "norm" if c[7] else "pix", "betamap" if c[8] else "beta", "cl" if c[9] else "nchw"))
@pytest.mark.parametrize("small_maps", [False, True], ids=["whole-map", "chunked"])
def test_head_forward_backward(case, small_maps, monkeypatch):
    """decafa_head returns (z, F, M, stats); decafa_head_backward consumes M and returns grad_beta. The
    chunked variant forces the two-sweep path of the per-map kernels (maps larger than a tile)."""
    b, l, h, w, ci, c, mode, norm, per_map, cl = case
    if small_maps:
        monkeypatch.setattr(tops.TUNING, "map_block_max", 4)
        monkeypatch.setattr(tops.TUNING, "map_chunk", 8)
    t, i, e = _inputs(b, l, h, w, ci, c, seed=1, channels_last=cl)
    beta, beta_map, beta64 = _beta_args(per_map, b, l)
    z, f, m, stats = NS.decafa_head(t, i, e, mode, beta, beta_map, norm)
    x64 = _f64((t, i, e))
    rz, rf, rm, rphi = oracle(*x64, mode, beta64, norm)
    assert z.dtype == f.dtype == m.dtype == t.dtype and stats.dtype == torch.float32
    assert stats.shape == (b, l, 2) and m.shape == (b, 1, h, w) and m.is_contiguous()
    want_cl = cl and not e.is_contiguous()
    assert f.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    _close(z, rz, "z")
    _close(f, rf, "F")
    _close(m, rm, "M")
    if b:  # stats: max of s and sum of exp(s - max)
        s = x64[0].detach().flatten(2) * (beta64.detach()[..., None] if per_map else beta64)
        _close(stats[..., 0], s.amax(-1), "stats max")
        _close(stats[..., 1], (s - s.amax(-1, keepdim=True)).exp().sum(-1), "stats sum")

    g = torch.Generator().manual_seed(2)
    gz, gf = torch.randn(z.shape, generator=g), torch.randn(f.shape, generator=g)
    gt, gi, ge, gbeta = NS.decafa_head_backward(gz.to(DEVICE), gf.to(DEVICE), t, i, e, m, stats, mode, beta,
                                                beta_map, norm)
    wrt = x64 + [beta64] if per_map else x64
    loss = (rz * gz.double()).sum() + (rf * gf.double()).sum()
    want = torch.autograd.grad(loss, wrt, allow_unused=True) if b else [None] * len(wrt)
    for name, got, ref in zip(("grad T", "grad I", "grad E"), (gt, gi, ge), want):
        assert got.is_contiguous() and got.dtype == t.dtype
        _close(got, ref, name)
    assert gbeta.shape == (b, l) and gbeta.dtype == torch.float32
    if per_map:
        _close(gbeta, want[3], "grad beta", rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("per_map", [False, True])
@pytest.mark.parametrize("small_maps", [False, True], ids=["whole-map", "chunked"])
def test_map_ops_forward_backward(per_map, small_maps, monkeypatch):
    if small_maps:
        monkeypatch.setattr(tops.TUNING, "map_block_max", 4)
        monkeypatch.setattr(tops.TUNING, "map_chunk", 8)
    t = _inputs(2, 5, 6, 7, 1, 1, seed=3)[0]
    beta, beta_map, beta64 = _beta_args(per_map, 2, 5)
    (t64,) = _f64((t,))
    rz, _, rm, rphi = oracle(t64, None, None, 0, beta64, True)
    phi, st1 = NS.spatial_softmax(t, beta, beta_map)
    z, st2 = NS.soft_argmax(t, beta, beta_map, True)
    m, st3 = NS.attention_mask(t, beta, beta_map)
    z4, m4, st4 = NS.landmark_attention(t, beta, beta_map, True)
    for got, want, name in ((phi, rphi, "phi"), (z, rz, "z"), (m, rm, "M"), (z4, rz, "z"), (m4, rm, "M")):
        _close(got, want, name)
    assert torch.equal(st1, st2) and torch.equal(st1, st3) and torch.equal(st1, st4)

    g = torch.Generator().manual_seed(4)
    gphi, gz, gm = (torch.randn(x.shape, generator=g) for x in (phi, z, m))
    wrt = [t64, beta64] if per_map else [t64]
    gt, gb = NS.spatial_softmax_backward(gphi.to(DEVICE), t, st1, beta, beta_map)
    want = torch.autograd.grad((rphi * gphi.double()).sum(), wrt, retain_graph=True)
    _close(gt, want[0], "softmax grad T")
    if per_map:
        _close(gb, want[1], "softmax grad beta", rel=1e-5)
    # a grad_mask with a zero stride (broadcast over rows): not pixel-flat, so the op copies it
    gm_expanded = torch.randn(1, 1, 1, m.shape[3], generator=g).expand(m.shape)
    for grad_z, grad_m in ((gz, None), (None, gm), (gz, gm), (None, gm_expanded)):
        loss = sum(((r * gg.double()).sum() for r, gg in ((rz, grad_z), (rm, grad_m)) if gg is not None))
        want = torch.autograd.grad(loss, wrt, retain_graph=True)
        gt, gb = NS.landmark_attention_backward(None if grad_z is None else grad_z.to(DEVICE),
                                                None if grad_m is None else grad_m.to(DEVICE), t, st1, beta,
                                                beta_map, True)
        _close(gt, want[0], "attention grad T")
        if per_map:
            _close(gb, want[1], "attention grad beta", rel=1e-5)


@pytest.mark.parametrize("mode", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_fuse_forward_backward(mode, cl):
    g = torch.Generator().manual_seed(6)
    fmt = torch.channels_last if cl else torch.contiguous_format
    i, e, m = (torch.randn(s, generator=g).to(DEVICE).contiguous(memory_format=fmt)
               for s in ((2, 2, 5, 6), (2, 3, 5, 6), (2, 1, 5, 6)))
    f = NS.fuse(i, e, m, mode)
    assert f.is_contiguous(memory_format=fmt)
    i64, e64, m64 = _f64((i, e, m))
    blocks = {1: [e64], 2: [i64 * m64], 3: [i64, i64 * m64], 4: [i64, i64 * m64, e64 * m64],
              5: [i64, i64 * m64, e64, e64 * m64]}
    rf = torch.cat(blocks[mode], 1)
    _close(f, rf, "F")
    gf = torch.randn(f.shape, generator=g)
    gi, ge, gm = NS.fuse_backward(gf.to(DEVICE).contiguous(memory_format=fmt), i, e, m, mode)
    want = torch.autograd.grad((rf * gf.double()).sum(), (i64, e64, m64), allow_unused=True)
    for name, got, ref in zip(("grad I", "grad E", "grad M"), (gi, ge, gm), want):
        assert got.is_contiguous()
        _close(got, ref, name)


@pytest.mark.parametrize("magnitude", [1e4, 1e10, 1e30])
def test_float32_exact_at_huge_magnitudes(magnitude):
    """|beta*T| up to 1e30: Phi, M and the fusion channels within 1e-6 relative of float64, element by
    element where the float64 value is not negligible (> 1e-30 of its largest)."""
    g = torch.Generator().manual_seed(7)
    t = (torch.rand(2, 4, 5, 6, generator=g) * 2 - 1) * magnitude
    t[:, :, 2, 3] = magnitude * (1 + 1e-6 * torch.arange(4))  # near-ties at the top: Phi is not one-hot
    t[:, :, 1, 1] = magnitude
    t, i, e = t.to(DEVICE), *_inputs(2, 4, 5, 6, 1, 3, seed=8)[1:]
    z, f, m, _ = NS.decafa_head(t, i, e, 5, 1.0, None, False)
    phi, _ = NS.spatial_softmax(t, 1.0, None)
    rz, rf, rm, rphi = oracle(*[x.double().cpu() for x in (t, i, e)], 5, 1.0, False)
    for got, want, name in ((phi, rphi, "phi"), (m, rm, "M"), (f, rf, "F")):
        big = want.abs() > 1e-30 * want.abs().max()
        rel = ((got.double().cpu() - want).abs() / want.abs())[big]
        assert rel.max() <= 1e-6, f"{name}: relative error {rel.max():.3g} at |T| ~ {magnitude:g}"


def test_nan_stays_in_its_map():
    t, i, e = _inputs(1, 3, 6, 7, 1, 2, seed=9)
    t[0, 1, 2, 3] = float("nan")
    z, f, m, stats = NS.decafa_head(t, i, e, 5, 1.0, None, False)
    assert torch.isnan(z[0, 1]).all() and torch.isfinite(z[0, [0, 2]]).all()
    phi, _ = NS.spatial_softmax(t, 1.0, None)
    assert torch.isnan(phi[0, 1]).all() and torch.isfinite(phi[0, [0, 2]]).all()


def test_bitwise_deterministic():
    t, i, e = _inputs(3, 7, 9, 11, 1, 4, seed=10)
    bm = torch.rand(3, 7).to(DEVICE) + 0.5
    gz, gf = torch.randn(3, 7, 2).to(DEVICE), torch.randn(3, 10, 9, 11).to(DEVICE)

    def once():
        z, f, m, st = NS.decafa_head(t, i, e, 5, 1.0, bm, True)
        return (z, f, m, st, *NS.decafa_head_backward(gz, gf, t, i, e, m, st, 5, 1.0, bm, True))

    for x, y in zip(once(), once()):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# Argument checks: RuntimeError naming the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------
def _bad_calls():
    t, i, e = _inputs(2, 3, 4, 5, 1, 2, seed=11)
    z, f, m, st = NS.decafa_head(t, i, e, 5, 1.0, None, False)
    gz = torch.zeros(2, 3, 2).to(DEVICE)
    bm = torch.ones(2, 3).to(DEVICE)
    yield "logits", NS.soft_argmax, (t[0], 1.0, None, False)
    yield "logits", NS.spatial_softmax, (t.double(), 1.0, None)
    yield "logits", NS.attention_mask, (t[:, :0], 1.0, None)
    yield "beta_map", NS.soft_argmax, (t, 1.0, bm[:, :2], False)
    yield "beta_map", NS.landmark_attention, (t, 1.0, bm.double(), False)
    yield "stats", NS.spatial_softmax_backward, (t, t, st[:1], 1.0, None)
    yield "stats", NS.landmark_attention_backward, (gz, None, t, st.half(), 1.0, None, False)
    yield "grad_phi", NS.spatial_softmax_backward, (t[:, :2], t, st, 1.0, None)
    yield "grad_z", NS.landmark_attention_backward, (gz[:, :2], None, t, st, 1.0, None, False)
    yield "grad_mask", NS.landmark_attention_backward, (None, m[..., :3], t, st, 1.0, None, False)
    yield "image", NS.decafa_head, (t, i[:1], e, 5, 1.0, None, False)
    yield "embedding", NS.decafa_head, (t, i, e[..., :3, :], 5, 1.0, None, False)
    yield "embedding", NS.decafa_head, (t, i, e.half(), 5, 1.0, None, False)
    yield "mode", NS.decafa_head, (t, i, e, 6, 1.0, None, False)
    yield "mode", NS.fuse, (i, e, m, 0)
    yield "mask", NS.fuse, (i, e, torch.cat([m, m], 1), 5)
    yield "mask", NS.decafa_head_backward, (gz, f, t, i, e, m[:1], st, 5, 1.0, None, False)
    yield "grad_fused", NS.fuse_backward, (f[:, :5], i, e, m, 5)
    yield "grad_fused", NS.decafa_head_backward, (gz, f[..., :2], t, i, e, m, st, 5, 1.0, None, False)
    yield "stats", NS.decafa_head_backward, (gz, f, t, i, e, m, st[:, :2], 5, 1.0, None, False)
    yield "image", NS.fuse_backward, (f, i.float()[None], e, m, 5)


@pytest.mark.parametrize("arg, op, args", list(_bad_calls()),
                         ids=[f"{a}-{o._qualified_op_name.split('::')[1]}-{n}" for n, (a, o, _) in
                              enumerate(_bad_calls())])
def test_bad_arguments_raise_runtime_error(arg, op, args):
    with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
        op(*args)


def test_wrong_device_raises_runtime_error():
    """Only CUDA tensors (CPU tensors under the interpreter) reach a kernel; the check names the argument."""
    from decafa_fast.triton import checks

    with pytest.raises(RuntimeError, match=r"\blogits\b.*meta"):
        checks.device("logits", torch.empty(0, device="meta"))


# ------------------------------------------------------------------------------------------------
# Device guard (structure: a second GPU is needed to run it for real; 64-bit offsets: test_traffic.py)
# ------------------------------------------------------------------------------------------------
def test_every_launch_is_under_a_device_guard():
    """Triton launches on the current device: each op body enters `_device_guard(<tensor>)` around every
    helper that launches a kernel (the helpers call `_launch`, nothing else does)."""
    tree = ast.parse(inspect.getsource(tops))
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    launchers: set = set()  # the _run_* / _launch_* helpers that reach _launch, directly or through another
    while True:
        more = {n.name for n in functions if n.name.startswith(("_run_", "_launch_"))
                and any(isinstance(c, ast.Call) and getattr(c.func, "id", "") in launchers | {"_launch"}
                        for c in ast.walk(n))}
        if more <= launchers:
            break
        launchers |= more
    assert launchers == {"_launch_map", "_run_mask_fuse", "_run_fuse_bwd"}
    for fn in (n for n in functions if n.name not in launchers):
        guarded = set()
        for w in (n for n in ast.walk(fn) if isinstance(n, ast.With)):
            if any(getattr(item.context_expr.func, "id", "") == "_device_guard" for item in w.items):
                guarded |= {id(c) for c in ast.walk(w)}
        for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call)):
            if getattr(call.func, "id", "") in launchers | {"_launch"}:
                assert id(call) in guarded, f"{fn.name} launches {call.func.id} outside _device_guard"
    guard = tops._device_guard(torch.empty(0, device="meta"))
    assert not isinstance(guard, torch.cuda.device)


def test_channels_last_inputs_are_used_in_place():
    """channels_last T, I, E, grad F (and broadcast grads) reach the kernels without a copy: the strides
    handed to the kernel are the tensor's own."""
    t, i, e = _inputs(2, 5, 6, 7, 1, 3, seed=12, channels_last=True)
    for x in (t, i, e, torch.ones(2, 1, 1, 1).expand(2, 1, 6, 7)):
        flat, s_b, s_c, s_p = tops._flat(x, x)
        assert flat.data_ptr() == x.data_ptr() and (s_b, s_c) == (x.stride(0), x.stride(1)), x.stride()
    assert tops._interleaved(tops._flat(t, t)) and not tops._interleaved(tops._flat(t.contiguous(), t))


def test_bfloat16_probe_blames_bfloat16_only_for_a_missing_dtype(monkeypatch):
    """Issue 13 item 8: an interpreter that cannot run the ops at all (torch 2.11's wrap_triton rejecting the
    interpreter's function, numpy >= 2.4 breaking triton 3.6) must fail loudly, not skip as "no bfloat16"."""
    from decafa_fast.triton import probe

    assert probe._is_missing_bfloat16(TypeError("data type 'bfloat16' not understood"))
    assert probe._is_missing_bfloat16(KeyError("triton.language.bfloat16"))
    assert not probe._is_missing_bfloat16(TypeError("wrap_triton only works on functions annotated with triton.jit"))
    assert not probe._is_missing_bfloat16(RuntimeError("CUDA error while launching a bfloat16 kernel"))
    if not tops.INTERPRET:
        return

    def broken(*args):
        raise TypeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")

    monkeypatch.setattr(torch.ops.decafa_triton, "soft_argmax", broken)
    with pytest.raises(TypeError, match="wrap_triton"):
        probe.interpreter_bfloat16_problem.__wrapped__()


def test_small_batches_split_runs_further(monkeypatch):
    """A per-map launch with fewer programs than map_min_programs (one per SM on a GPU) splits the maps into
    more runs, down to one map each; values and gradients do not depend on the split."""
    monkeypatch.setattr(tops.TUNING, "map_min_programs", 132)
    assert tops._mask_runs(64, 98, DEVICE) == (4, 25)
    assert tops._mask_runs(1, 98, DEVICE) == (98, 1)
    assert tops._mask_runs(8, 98, DEVICE) == (17, 6)
    monkeypatch.setattr(tops.TUNING, "map_min_programs", 0)
    assert tops._mask_runs(1, 98, DEVICE) == (4, 25)

    t, i, e = _inputs(1, 7, 5, 6, 1, 2, seed=13)
    gz, gf = torch.randn(1, 7, 2).to(DEVICE), torch.randn(1, 6, 5, 6).to(DEVICE)
    results = []
    for programs in (0, 1000):
        monkeypatch.setattr(tops.TUNING, "map_min_programs", programs)
        z, f, m, st = NS.decafa_head(t, i, e, 5, 1.0, None, True)
        results.append((z, f, m, st, *NS.decafa_head_backward(gz, gf, t, i, e, m, st, 5, 1.0, None, True)))
    for a, b in zip(*results):
        _close(a, b.double(), "runs of 2 maps vs one map a run")
