"""Maps whose beta * T overflows float32: every Triton per-map kernel gives the exact limit of softmax(beta T).

The rule, shared by every backend: where the max of beta * T is +-inf, c = max T (beta > 0) or min T
(beta < 0); if c is finite and the map holds no NaN, P = [T == c] / k with k the number of pixels equal to c,
and the saved stats are (+-inf, k); otherwise the map is NaN, as before. The backward of such a map is the
usual formula with that P: grad T = beta P (g - sum P g), grad beta = sum T P (g - sum P g), whose exact value
is 0 (T = c wherever P > 0, and sum P = 1): both exactly 0 for a single peak, and grad T finite with ties.

Each kernel family runs on the same logits: the persistent kernels (default), the per-run kernels holding
whole maps, the per-run kernels sweeping maps in chunks, and channels_last logits (per-run, interleaved).
The expected values are computed here from the rule, not from another backend; maps that do not overflow
must give bit for bit what they give in a batch without overflow maps.
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
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

FLT_MAX = torch.finfo(torch.float32).max
B, L, H, W = 2, 4, 5, 6
# the magnitude of the overflowing logits, and a beta that makes them overflow float32 (and not the small ones)
BIG = {torch.float32: 1e37, torch.bfloat16: 1e38, torch.float16: 1e4}
BETA = {torch.float32: 100.0, torch.bfloat16: 100.0, torch.float16: 1e36}
TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(params=["persistent", "runs", "chunked", "channels_last"])
def family(request):
    saved = dict(vars(tops.TUNING))
    tops.TUNING.map_kernel = "persistent" if request.param == "persistent" else "runs"
    if request.param == "chunked":  # maps swept in chunks of 16 pixels, 2 maps a row (interleaved_whole_maps off)
        tops.TUNING.map_block_max, tops.TUNING.map_chunk = 4, 16
    yield request.param
    vars(tops.TUNING).update(saved)


def _logits(dtype, seed=0):
    """(T, kinds): maps of small logits ('n'), of overflowing ones without ties ('big'), with two tied maxima
    and two tied minima ('ties'), all far below zero ('neg'), and special maps: a NaN pixel among big logits
    ('nan'), a +inf or a -inf pixel among small ones ('+inf', '-inf')."""
    g = torch.Generator().manual_seed(seed)
    big = BIG[dtype]

    def rnd(scale):
        return (torch.randn(H, W, generator=g).clamp(-3.3, 3.3) * scale)

    kinds = [["n", "big", "ties", "n"], ["nan", "+inf", "neg", "-inf"]]
    t = torch.empty(B, L, H, W)
    for b in range(B):
        for l in range(L):
            k = kinds[b][l]
            x = rnd(1e-3) if k in ("n", "+inf", "-inf") else rnd(big)
            if k == "ties":
                x[0, 0] = x[2, 3] = x.max()
                x[1, 1] = x[4, 5] = x.min()
            elif k == "neg":
                x = -(x.abs() / 2 + big)
            elif k == "nan":
                x[3, 2] = float("nan")
            elif k in ("+inf", "-inf"):
                x[1, 4] = float(k)
            t[b, l] = x
    return t.to(dtype), kinds


def _clean(t, kinds, dtype):
    """T with every map but the small ones replaced by small logits: what those maps give without overflow."""
    c = t.clone()
    g = torch.Generator().manual_seed(99)
    for b in range(B):
        for l in range(L):
            if kinds[b][l] != "n":
                c[b, l] = (torch.randn(H, W, generator=g) * 1e-3).to(dtype)
    return c


def _beta_cases(dtype):
    m = BETA[dtype]
    per_map = torch.tensor([[m, -m, m, -FLT_MAX], [-m, m, FLT_MAX, -m]])
    return [m, -m, FLT_MAX, per_map]


def _expected(t, beta):
    """(P float64, stats, limit) by the rule: limit[b, l] marks the overflow maps whose P is the limit."""
    t32 = t.float()
    betas = beta if isinstance(beta, torch.Tensor) else torch.full((B, L), beta)
    p = torch.empty(B, L, H, W, dtype=torch.float64)
    stats = torch.empty(B, L, 2)
    limit = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for l in range(L):
            x, bl = t32[b, l], betas[b, l].float()
            s_max = (x * bl).max()  # float32, as the kernels
            if torch.isnan(x).any():
                p[b, l] = float("nan")
            elif torch.isfinite(s_max):
                p[b, l] = torch.softmax(x.double().flatten() * bl.double(), 0).view(H, W)
            else:
                c = x.max() if bl > 0 else x.min()
                if not torch.isfinite(c):
                    p[b, l] = float("nan")
                    continue
                hit = x == c
                k = hit.sum().item()
                p[b, l] = hit.double() / k
                stats[b, l] = torch.tensor([s_max.item(), float(k)])
                limit[b, l] = True
    return p, stats, limit


def _coords():
    """Pixel coordinates (x, y), normalized to [-1, 1]."""
    x = torch.linspace(-1, 1, W, dtype=torch.float64).expand(H, W)
    y = torch.linspace(-1, 1, H, dtype=torch.float64)[:, None].expand(H, W)
    return x, y


def _run(t, beta, family):
    """Every per-map op and the backward ops, on T as the family lays it out."""
    if family == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    bf, bm = (0.0, beta.to(DEVICE)) if isinstance(beta, torch.Tensor) else (beta, None)
    t = t.to(DEVICE)
    g = torch.Generator().manual_seed(5)
    out = {}
    out["phi"], out["stats"] = NS.spatial_softmax(t, bf, bm)
    out["z"], _ = NS.soft_argmax(t, bf, bm, True)
    _, out["m"], _ = NS.landmark_attention(t, bf, bm, True)
    out["g_phi"] = torch.randn(B, L, H, W, generator=g).to(t.dtype)
    out["gz"] = torch.randn(B, L, 2, generator=g).to(t.dtype)
    out["gm"] = torch.randn(B, 1, H, W, generator=g).to(t.dtype)
    out["gt_softmax"], out["gb_softmax"] = NS.spatial_softmax_backward(out["g_phi"].to(DEVICE), t, out["stats"], bf, bm)
    out["gt_landmark"], out["gb_landmark"] = NS.landmark_attention_backward(
        out["gz"].to(DEVICE), out["gm"].to(DEVICE), t, out["stats"], bf, bm, True)
    return {k: v.cpu() for k, v in out.items()}


CASES = [(torch.float32, i) for i in range(4)] + [(d, i) for d in (torch.float16, torch.bfloat16) for i in (0, 3)]


@pytest.mark.parametrize("dtype,beta_index", CASES,
                         ids=[f"{str(d)[6:]}-{['pos', 'neg', 'fltmax', 'per_map'][i]}" for d, i in CASES])
def test_limit_maps_forward_and_backward(family, dtype, beta_index):
    if dtype != torch.float32 and family in ("runs", "channels_last"):
        pytest.skip("16-bit logits: the persistent and chunked kernels (the whole-map per-run kernels: float32)")
    beta = _beta_cases(dtype)[beta_index]
    t, kinds = _logits(dtype)
    p, stats, limit = _expected(t, beta)
    assert limit.any() and (~limit).any()
    out = _run(t, beta, family)
    clean = _run(_clean(t, kinds, dtype), beta, family)
    betas = (beta if isinstance(beta, torch.Tensor) else torch.full((B, L), beta)).double()
    x, y = _coords()
    tol = TOL[dtype]
    for b in range(B):
        for l in range(L):
            where = f"map ({b}, {l}) {kinds[b][l]}, beta {betas[b, l].item():.3g}"
            pb = p[b, l]
            if torch.isnan(pb).all():  # NaN stays NaN
                assert torch.isnan(out["phi"][b, l]).all(), where
                assert torch.isnan(out["z"][b, l]).all(), where
                continue
            if kinds[b][l] == "n":  # not overflowing: bit for bit what it gives without overflow maps
                for key in ("phi", "stats", "z", "gt_softmax", "gb_softmax", "gt_landmark", "gb_landmark"):
                    assert torch.equal(out[key][b, l], clean[key][b, l]), f"{key}, {where}"
            if not limit[b, l]:
                torch.testing.assert_close(out["phi"][b, l].double(), pb, rtol=tol, atol=tol, msg=where)
                continue
            # the limit: P, stats and z exactly as the rule says
            assert torch.equal(out["phi"][b, l], pb.float().to(dtype)), where
            assert torch.equal(out["stats"][b, l], stats[b, l]), where
            z = torch.stack([(pb * x).sum(), (pb * y).sum()])
            torch.testing.assert_close(out["z"][b, l].double(), z, rtol=tol, atol=tol, msg=where)
            # the backward: grad beta exactly 0; grad T exactly 0 for a single peak, the formula with ties
            ties = (pb > 0).sum() > 1
            for name, gphi in (("softmax", out["g_phi"][b, l].double()),
                               ("landmark", out["gm"][b, 0].double() + out["gz"][b, l, 0].double() * x
                                + out["gz"][b, l, 1].double() * y)):
                gt, gb = out[f"gt_{name}"][b, l], out[f"gb_{name}"][b, l]
                assert gb.item() == 0.0, f"grad beta ({name}), {where}: {gb.item()}"
                if not ties:
                    assert torch.equal(gt, torch.zeros_like(gt)), f"grad T ({name}), {where}"
                else:
                    want = betas[b, l] * pb * (gphi - (pb * gphi).sum())
                    want = want.float().to(dtype).double()  # as the kernel stores it (inf past the range)
                    assert torch.isfinite(gt).any(), where
                    torch.testing.assert_close(gt.double(), want, rtol=4 * tol, atol=tol * want.abs().max().item(),
                                               msg=f"grad T ({name}), {where}")
    # the mask: sum of the maps' P (batch item 1 holds a NaN map: NaN everywhere)
    assert torch.isnan(out["m"][1]).all()
    torch.testing.assert_close(out["m"][0, 0].double(), p[0].sum(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("config", ["persistent-3-programs", "runs-1-run", "chunked-1-run"])
def test_limit_maps_inside_partial_masks(config):
    """A partial mask summed over several maps, one of which overflows (and, in batch item 1, one of which is
    NaN): the persistent kernel with ranges that cross batch items, the per-run kernels with one run of all
    maps, whole and in chunks."""
    saved = dict(vars(tops.TUNING))
    try:
        if config.startswith("persistent"):
            tops.TUNING.map_kernel, tops.TUNING.map_programs = "persistent", 3
        else:
            tops.TUNING.map_kernel, tops.TUNING.mask_runs = "runs", 1
            if config.startswith("chunked"):
                tops.TUNING.map_block_max, tops.TUNING.map_chunk = 4, 16
        t, kinds = _logits(torch.float32)
        beta = _beta_cases(torch.float32)[3]
        p, stats, limit = _expected(t, beta)
        z, m, st = NS.landmark_attention(t.to(DEVICE), 0.0, beta.to(DEVICE), True)
        m, st = m.cpu(), st.cpu()
    finally:
        vars(tops.TUNING).update(saved)
    assert torch.equal(st[limit], stats[limit])
    torch.testing.assert_close(m[0, 0].double(), p[0].sum(0), rtol=1e-6, atol=1e-6)
    assert torch.isnan(m[1]).all()
