"""The persistent per-map kernels (decafa_fast/triton/persistent.py) against the per-run ones (stats.py), op by
op, forward and backward, under the interpreter (or natively on a GPU).

The per-run kernels are checked against the reference by test_ops_triton.py (which runs the default,
persistent, for whole contiguous maps); here both kernel families run on the same inputs, with program
counts that cut the B*L maps into ranges crossing batch items (a program with pieces of two or three batch
items, ranges shorter and longer than L), one map per program and one program for everything. The sums
are taken in a different order, so the comparison is to float32 rounding, not bitwise; each family is
bitwise reproducible on its own.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

tops = pytest.importorskip("decafa_fast.triton.ops")
CUDA = torch.cuda.is_available()
if not (CUDA or tops.INTERPRET):
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cuda" if CUDA else "cpu")
NS = torch.ops.decafa_triton
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def tuning():
    saved = dict(vars(tops.TUNING))
    yield tops.TUNING
    vars(tops.TUNING).update(saved)


class Launches:
    """Names of the kernels launched inside the context."""

    def __init__(self, monkeypatch):
        self.names = []
        orig = tops._launch

        def launch(kernel, grid, *args, **meta):
            self.names.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, grid))
            return orig(kernel, grid, *args, **meta)

        monkeypatch.setattr(tops, "_launch", launch)


def _inputs(b, l, h, w, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = (3 * torch.randn(b, l, h, w, generator=g)).to(dtype).to(DEVICE)
    i = torch.randn(b, 1, h, w, generator=g).to(dtype).to(DEVICE)
    e = torch.randn(b, c, h, w, generator=g).to(dtype).to(DEVICE)
    beta_map = (0.5 + torch.rand(b, l, generator=g)).to(DEVICE)
    return t, i, e, beta_map


def _all_outputs(t, i, e, beta_map, normalized):
    """Every per-map op and its backward on the same inputs (grad inputs drawn from a fixed seed)."""
    g = torch.Generator().manual_seed(7)

    def rand_like(x):
        return torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)

    out = {}
    phi, stats = NS.spatial_softmax(t, 1.3, beta_map)
    out["softmax"] = (phi, stats)
    out["softmax_bwd"] = NS.spatial_softmax_backward(rand_like(phi), t, stats, 1.3, beta_map)
    out["soft_argmax"] = NS.soft_argmax(t, 0.7, None, normalized)
    out["attention_mask"] = NS.attention_mask(t, 0.7, beta_map)
    z, m, stats = NS.landmark_attention(t, 0.7, beta_map, normalized)
    out["landmark_attention"] = (z, m, stats)
    gz, gm = rand_like(z), rand_like(m)
    out["landmark_bwd"] = NS.landmark_attention_backward(gz, gm, t, stats, 0.7, beta_map, normalized)
    out["landmark_bwd_z_only"] = NS.landmark_attention_backward(gz, None, t, stats, 0.7, beta_map, normalized)
    out["landmark_bwd_mask_only"] = NS.landmark_attention_backward(None, gm, t, stats, 0.7, beta_map, normalized)
    z, f, m, stats = NS.decafa_head(t, i, e, 5, 1.1, None, normalized)
    out["head"] = (z, f, m, stats)
    out["head_bwd"] = NS.decafa_head_backward(rand_like(z), rand_like(f), t, i, e, m, stats, 5, 1.1, None, normalized)
    return out


def _assert_close(a, b, what):
    for k, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.double(), y.double(), rtol=2e-5, atol=2e-5 * max(1.0, y.abs().max().item()),
                                   msg=lambda m, k=k: f"{what}[{k}]: {m}")


@pytest.mark.parametrize("shape,programs", [
    ((3, 5, 7, 33), 4),   # ranges of 3-4 maps: pieces of two batch items
    ((3, 5, 8, 16), 2),   # ranges of 7-8 maps: up to three batch items; full tiles (no pixel mask)
    ((3, 5, 8, 16), 15),  # one map per program
    ((2, 3, 5, 4), 1),    # one program for every map
    ((1, 7, 1, 9), 3),    # one-row maps
], ids=str)
def test_persistent_matches_runs(tuning, monkeypatch, shape, programs):
    t, i, e, beta_map = _inputs(*shape)
    tuning.map_kernel = "runs"
    runs = _all_outputs(t, i, e, beta_map, normalized=True)
    tuning.map_kernel, tuning.map_programs = "persistent", programs
    launches = Launches(monkeypatch)
    persistent = _all_outputs(t, i, e, beta_map, normalized=True)
    names = {name for name, _ in launches.names}
    assert {"map_fwd_persistent_kernel", "map_bwd_persistent_kernel"} <= names
    assert not names & {"map_fwd_kernel", "map_bwd_kernel"}
    assert all(grid == (programs,) for name, grid in launches.names if "persistent" in name)
    for key in runs:
        _assert_close(persistent[key], runs[key], key)


def test_persistent_is_bitwise_reproducible(tuning):
    tuning.map_programs = 4
    t, i, e, beta_map = _inputs(3, 5, 7, 33)
    first = _all_outputs(t, i, e, beta_map, normalized=False)
    second = _all_outputs(t, i, e, beta_map, normalized=False)
    for key in first:
        for x, y in zip(first[key], second[key]):
            assert torch.equal(x, y), key


def test_default_programs_and_fallbacks(tuning, monkeypatch):
    """Off a GPU the default is B * mask_runs programs (per-batch-item pieces, as the per-run kernel's runs),
    capped at B*L; channels_last T and maps swept in chunks keep the per-run kernels."""
    assert tops._map_programs(3, 5, torch.device("cpu")) == 3 * tuning.mask_runs
    assert tops._map_programs(2, 1, torch.device("cpu")) == 2
    tuning.map_programs = 1000
    assert tops._map_programs(3, 5, torch.device("cpu")) == 15
    t, _, _, _ = _inputs(2, 3, 6, 5)
    launches = Launches(monkeypatch)
    NS.soft_argmax(t.contiguous(memory_format=torch.channels_last), 1.0, None, False)
    tuning.map_block_max = 16  # a 6 x 5 map (8 x 8 tile) is swept in chunks
    NS.soft_argmax(t, 1.0, None, False)
    assert [name for name, _ in launches.names] == ["map_fwd_kernel", "map_fwd_kernel"]


def test_persistent_bf16_matches_runs(tuning):
    """16-bit logits: the same float32 arithmetic, the same outputs to bfloat16 rounding."""
    from decafa_fast.triton.probe import interpreter_bfloat16_problem

    problem = interpreter_bfloat16_problem()
    if problem is not None:
        pytest.skip(problem)
    t, i, e, beta_map = _inputs(3, 5, 7, 33, dtype=torch.bfloat16)
    tuning.map_kernel = "runs"
    runs = _all_outputs(t, i, e, beta_map, normalized=False)
    tuning.map_kernel, tuning.map_programs = "persistent", 4
    persistent = _all_outputs(t, i, e, beta_map, normalized=False)
    for key in runs:
        for k, (x, y) in enumerate(zip(persistent[key], runs[key])):
            torch.testing.assert_close(x.double(), y.double(), rtol=1.6e-2,
                                       atol=1e-2 * max(1.0, y.double().abs().max().item()),
                                       msg=lambda m, k=k, key=key: f"{key}[{k}]: {m}")


def test_falls_back_to_no_prefetch_without_shared_memory(tuning, monkeypatch):
    """A GPU without the shared memory of the prefetched map (Triton raises OutOfResources at launch) gets the
    persistent kernel with STAGES = 1; a kernel that fails at STAGES = 1 too raises."""
    from triton.runtime.errors import OutOfResources

    stages = []
    orig = tops._launch

    def launch(kernel, grid, *args, **meta):
        if "STAGES" in meta:
            stages.append(meta["STAGES"])
            if meta["STAGES"] > 1:
                raise OutOfResources(135000, 101376, "shared memory")
        return orig(kernel, grid, *args, **meta)

    monkeypatch.setattr(tops, "_launch", launch)
    t, _, _, _ = _inputs(1, 2, 4, 4)
    tuning.map_kernel, tuning.map_stages = "runs", 2
    expected = NS.soft_argmax(t, 1.0, None, False)
    tuning.map_kernel = "persistent"
    got = NS.soft_argmax(t, 1.0, None, False)
    assert stages == [2, 1]
    _assert_close(got, expected, "soft_argmax")
    tuning.map_stages = 1
    monkeypatch.setattr(tops, "_launch", lambda *a, **k: (_ for _ in ()).throw(OutOfResources(1, 0, "x")))
    with pytest.raises(OutOfResources):
        NS.soft_argmax(t, 1.0, None, False)


def _landmark_f64(t, beta_map, gz, gm):
    """grad T and grad beta of landmark attention (normalised coordinates) by autograd in float64, and its
    outputs z and M."""
    b, l, h, w = t.shape
    t64 = t.double().cpu().requires_grad_(True)
    beta = beta_map.double().cpu().requires_grad_(True)
    phi = torch.softmax(beta[:, :, None] * t64.reshape(b, l, h * w), dim=-1)
    x = (torch.arange(w, dtype=torch.float64) * (2.0 / (w - 1)) - 1.0).repeat(h)
    y = (torch.arange(h, dtype=torch.float64) * (2.0 / (h - 1)) - 1.0).repeat_interleave(w)
    z = torch.stack(((phi * x).sum(-1), (phi * y).sum(-1)), -1)
    m = phi.sum(1).reshape(gm.shape)
    loss = (z * gz.double().cpu()).sum() + (m * gm.double().cpu()).sum()
    return (*torch.autograd.grad(loss, (t64, beta)), z.detach(), m.detach())


@pytest.mark.parametrize("kernel", ["persistent", "runs", "channels_last", "channels_last_cols_first"])
def test_small_and_zero_beta_maps(tuning, monkeypatch, request, kernel):
    """The whole-map backward loops take T - T_max as (beta T - max) / beta and fix the maps with
    |beta| < 2**-40 (stats._small_beta; 0, where the division gives NaN, included) after the loop: grad T and
    grad beta of every map against float64 autograd, betas of both signs on both sides of the bound. Both
    kernel families, and channels_last T (per-run kernels) in both tile orientations (COLS_FIRST, chosen by
    the Triton version)."""
    b, l, h, w = 2, 6, 7, 9
    t, _, _, _ = _inputs(b, l, h, w, seed=3)
    if kernel.startswith("channels_last"):
        t = t.contiguous(memory_format=torch.channels_last)
        monkeypatch.setattr(tops, "_TRITON", (3, 6) if kernel.endswith("cols_first") else (3, 9))
        tops._map_cfg_cached.cache_clear()
        request.addfinalizer(tops._map_cfg_cached.cache_clear)
        assert tops._map_cfg(h, w, l, l, True)["COLS_FIRST"] == kernel.endswith("cols_first")
        kernel = "runs"
    betas = torch.tensor([0.0, 1e-30, -2.0**-41, 2.0**-39, -1e-9, 0.9] * b).reshape(b, l).to(DEVICE)
    tuning.map_kernel, tuning.map_programs = kernel, 3
    z, m, stats = NS.landmark_attention(t, 0.7, betas, True)
    g = torch.Generator().manual_seed(5)
    gz = torch.randn(z.shape, generator=g).to(DEVICE)
    gm = torch.randn(m.shape, generator=g).to(DEVICE)
    gt, gbeta = NS.landmark_attention_backward(gz, gm, t, stats, 0.7, betas, True)
    ref_t, ref_beta, ref_z, ref_m = _landmark_f64(t, betas, gz, gm)
    torch.testing.assert_close(z.double().cpu(), ref_z, rtol=1e-5, atol=1e-5)  # the forward, same kernels
    torch.testing.assert_close(m.double().cpu(), ref_m, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(gbeta).all(), gbeta
    torch.testing.assert_close(gt.double().cpu(), ref_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gbeta.double().cpu(), ref_beta, rtol=1e-5, atol=1e-5 * ref_beta.abs().max().item())
    # a scalar beta of 0 (every map fixed after the loop) in the head's backward
    z, f, m, stats = NS.decafa_head(t, t[:, :1], t[:, :3], 5, 0.0, None, True)
    gz = torch.randn(z.shape, generator=g).to(DEVICE)
    gf = torch.randn(f.shape, generator=g).to(DEVICE)
    gt, _, _, gbeta = NS.decafa_head_backward(gz, gf, t, t[:, :1], t[:, :3], m, stats, 5, 0.0, None, True)
    assert torch.isfinite(gbeta).all() and (gt == 0).all()
    image, emb = t[:, :1].double().cpu(), t[:, :3].double().cpu()
    gf = gf.double().cpu()  # F5 = I | I*M | E | E*M: grad M from the two masked blocks
    gm = (gf[:, 1:2] * image).sum(1, keepdim=True) + (gf[:, 5:8] * emb).sum(1, keepdim=True)
    _, ref_beta, _, _ = _landmark_f64(t, torch.zeros(b, l), gz, gm)
    assert ref_beta.abs().min() > 0
    torch.testing.assert_close(gbeta.double().cpu(), ref_beta, rtol=1e-5, atol=1e-5 * ref_beta.abs().max().item())
