"""Host time of the Triton op bodies per call, with the kernel launches stubbed out (CPU only).

What a small-batch call costs besides the GPU work is this Python: argument checks, output allocation,
strides, launch configuration and the launch calls themselves. The op bodies look all of it but the
allocations up in a plan cached per argument metadata and TUNING state (ops._planned). Here the launch is
replaced by a counter, so the time measured is everything but Triton's own launcher (which a GPU adds per
launch). Budget: BUDGET_US per op call, whatever its number of launches, as the best of several repeats of
the process's CPU time (the machine may be shared). B = 1, L = 98 and an 8 x 8 map keep the CPU allocations
small, like the GPU caching allocator's.

Margin measured on the development machine (2-core AMD EPYC VM, Python 3.11, torch CPU, otherwise idle):
the slowest op, decafa_head_backward (two launches, five tensors allocated), takes 11.6-11.9 us, about 20 %
under the budget (a fully loaded machine was seen to add about 20 %); decafa_head 10 us; the one-launch ops
5-7 us (bench/triton_notes.md has the table).

`python -m pytest tests/triton/test_host_overhead.py -s` prints the times.
"""
import os
import shutil
import time
import timeit

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

tops = pytest.importorskip("decafa_fast.triton.ops")
if not tops.INTERPRET:
    pytest.skip("host timing with stubbed launches runs on CPU tensors (TRITON_INTERPRET=1)",
                allow_module_level=True)

BUDGET_US = 15.0


def _calls():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 98, 8, 8, generator=g)
    i = torch.randn(1, 1, 8, 8, generator=g)
    e = torch.randn(1, 64, 8, 8, generator=g)
    stats = torch.zeros(1, 98, 2)
    z = torch.zeros(1, 98, 2)
    m = torch.rand(1, 1, 8, 8, generator=g)
    f = torch.zeros(1, 130, 8, 8)
    return {
        "spatial_softmax": lambda: tops.spatial_softmax(t, 1.0, None),
        "spatial_softmax_backward": lambda: tops.spatial_softmax_backward(t, t, stats, 1.0, None),
        "soft_argmax": lambda: tops.soft_argmax(t, 1.0, None, False),
        "attention_mask": lambda: tops.attention_mask(t, 1.0, None),
        "landmark_attention": lambda: tops.landmark_attention(t, 1.0, None, True),
        "landmark_attention_backward": lambda: tops.landmark_attention_backward(z, m, t, stats, 1.0, None, True),
        "fuse": lambda: tops.fuse(i, e, m, 5),
        "fuse_backward": lambda: tops.fuse_backward(f, i, e, m, 5),
        "decafa_head": lambda: tops.decafa_head(t, i, e, 5, 1.0, None, False),
        "decafa_head_backward": lambda: tops.decafa_head_backward(z, f, t, i, e, m, stats, 5, 1.0, None, False),
    }


def test_every_op_is_timed():
    assert set(_calls()) == set(tops.IMPLS)


@pytest.mark.parametrize("name", list(tops.IMPLS))
def test_host_time_per_call(monkeypatch, name):
    launches = []
    monkeypatch.setattr(tops, "_launch", lambda kernel, grid, *args, **meta: launches.append(grid))
    fn = _calls()[name]
    fn()
    n_launches = len(launches)
    assert n_launches >= 1, f"{name} launched no kernel"
    for _ in range(50):  # warm the configuration caches
        fn()
    number = 100
    # CPU time of this process: a call descheduled by other work on a shared machine does not count
    best_us = min(timeit.repeat(fn, number=number, repeat=15, timer=time.process_time)) / number * 1e6
    print(f"{name:30} {best_us:6.1f} us per call, {n_launches} launch(es)")
    assert best_us <= BUDGET_US, (
        f"{name}: {best_us:.1f} us of host time per call ({n_launches} launch(es)), budget {BUDGET_US:.0f} us")


def test_configurations_follow_tuning(monkeypatch):
    """The cached launch configurations are keyed on TUNING's values: a change is seen at once."""
    before = tops._fuse_cfg(4096, 1, 64, 1, torch.device("cpu"), False)
    monkeypatch.setattr(tops.TUNING, "fuse_warps", tops.TUNING.fuse_warps * 2)
    after = tops._fuse_cfg(4096, 1, 64, 1, torch.device("cpu"), False)
    assert after["num_warps"] == 2 * before["num_warps"]
    monkeypatch.setattr(tops.TUNING, "map_stages", 3)
    assert tops._persistent_cfg(128, 128)["STAGES"] == 3
    assert tops._pow2(0) == 0 and tops._pow2(1) == 1 and tops._pow2(5) == 8 and tops._pow2(64) == 64
    assert tops._cdiv(7, 2) == 4 and tops._cdiv(8, 2) == 4 and tops._cdiv(0, 3) == 0


def test_tuning_table(tmp_path, monkeypatch):
    """The shipped table parses; an entry applies to the fields still at their defaults (a value set by the
    user wins), a model without an entry gets 'default', and unknown fields or wrong types are refused."""
    import dataclasses

    from decafa_fast.triton import tuning

    shipped = tuning.load_table()
    for entry in [shipped["default"], *shipped["gpus"].values()]:
        tuning.apply(tops.Tuning(), entry)  # raises on a bad entry
    path = tmp_path / "table.json"
    path.write_text('{"default": {"map_stages": 3}, "gpus": {"GPU X": {"map_kernel": "runs", "map_warps": 16}}}')
    table = tuning.load_table(path)
    t = tops.Tuning()
    t.map_warps = 8  # set by the user: kept
    assert tuning.apply(t, tuning.entry_for("GPU X", table)) == {"map_kernel": "runs"}
    assert (t.map_kernel, t.map_warps, t.map_stages) == ("runs", 8, tops.Tuning().map_stages)
    t = tops.Tuning()
    monkeypatch.setenv("DECAFA_TRITON_TUNING", str(path))
    assert tuning.apply_for_device(t, "GPU Y") == {"map_stages": 3}
    monkeypatch.setenv("DECAFA_TRITON_TUNING", "off")
    assert tuning.apply_for_device(tops.Tuning(), "GPU X") == {}
    with pytest.raises(ValueError, match="unknown field 'map_warp'"):
        tuning.apply(tops.Tuning(), {"map_warp": 4})
    with pytest.raises(ValueError, match="map_warps must be int"):
        tuning.apply(tops.Tuning(), {"map_warps": "4"})
    assert dataclasses.asdict(tops.Tuning()) == {f.name: f.default for f in dataclasses.fields(tops.Tuning)}


def test_a_bad_tuning_table_warns_once_naming_it(tmp_path, monkeypatch):
    """DECAFA_TRITON_TUNING naming a missing file or one that is not JSON: the first CUDA call warns in one
    line naming the file and runs on the built-in parameters (no traceback out of the op)."""
    from decafa_fast import settings

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    for bad in (tmp_path / "missing.json", tmp_path / "bad.json"):
        (tmp_path / "bad.json").write_text("{not json")
        monkeypatch.setenv("DECAFA_TRITON_TUNING", str(bad))
        monkeypatch.setattr(tops, "_TABLE_APPLIED", False)
        monkeypatch.setattr(tops, "TUNING", tops.Tuning())
        monkeypatch.setattr(settings, "_warned", set())
        with pytest.warns(settings.SettingWarning, match=str(bad).replace(".", r"\.")):
            tops._apply_tuning_table(torch.device("cuda", 0))
        assert tops._TABLE_APPLIED and tops.TUNING == tops.Tuning()


def test_checks_run_once_per_argument_kind_and_still_refuse_bad_calls():
    """The op bodies remember the argument metadata they checked (shape, dtype, device; other arguments with
    their types): a repeat skips the checks, a bad call raises every time, and a different shape or type is
    checked again."""
    t = torch.randn(1, 3, 4, 5)
    stats = torch.zeros(1, 3, 2)
    tops.spatial_softmax_backward(t, t, stats, 1.0, None)
    n = len(tops._CHECKED)
    tops.spatial_softmax_backward(t.clone(), t.clone(), stats.clone(), 2.0, None)  # same kinds: no new entry
    assert len(tops._CHECKED) == n
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stats must have shape"):
            tops.spatial_softmax_backward(t, t, torch.zeros(1, 4, 2), 1.0, None)
        with pytest.raises(RuntimeError, match="stats must be"):
            tops.spatial_softmax_backward(t, t, stats.double(), 1.0, None)
        with pytest.raises(RuntimeError, match="mode must be"):
            tops.fuse(t[:, :1], t, t[:, :1], True)
    assert len(tops._CHECKED) == n


def _equivalence_calls():
    """Calls that the planned op bodies take (beta_map, normalized, channels_last T or E, several modes,
    absent grad_z)."""
    g = torch.Generator().manual_seed(1)
    b, l, h, w, ci, c = 2, 3, 4, 5, 2, 3

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t, i, e, bm = r(b, l, h, w), r(b, ci, h, w), r(b, c, h, w), r(b, l).abs() + 0.5
    e_cl = e.to(memory_format=torch.channels_last)
    m = torch.rand(b, 1, h, w, generator=g)
    stats = tops.spatial_softmax(t, 1.0, None)[1]
    gz = r(b, l, 2)
    for mode in (1, 2, 5):
        f = r(b, tops._layout(mode, ci, c).channels, h, w)
        yield f"fuse-{mode}", lambda mode=mode: tops.fuse(i, e, m, mode)
        yield f"fuse_backward-{mode}", lambda mode=mode, f=f: tops.fuse_backward(f, i, e, m, mode)
        yield f"decafa_head-{mode}", lambda mode=mode: tops.decafa_head(t, i, e_cl, mode, 0.7, bm, True)
        yield f"decafa_head_backward-{mode}", \
            lambda mode=mode, f=f: tops.decafa_head_backward(gz, f, t, i, e, m, stats, mode, 0.7, bm, True)
    f5 = r(b, tops._layout(5, ci, c).channels, h, w)
    yield "decafa_head_backward-no-gz", lambda: tops.decafa_head_backward(None, f5, t, i, e, m, stats, 5, 1.0, None,
                                                                          False)
    yield "fuse-cl", lambda: tops.fuse(i, e_cl, m, 5)
    t_cl = t.to(memory_format=torch.channels_last)  # the per-run kernels, interleaved maps
    yield "soft_argmax-cl", lambda: tops.soft_argmax(t_cl, 1.0, bm, True)
    yield "landmark_attention-cl", lambda: tops.landmark_attention(t_cl, 1.0, None, False)
    yield "decafa_head_backward-cl", lambda: tops.decafa_head_backward(gz, f5, t_cl, i, e, m, stats, 5, 1.0, None,
                                                                       False)
    yield "spatial_softmax", lambda: tops.spatial_softmax(t, 1.3, bm)
    gphi = r(b, l, h, w)
    yield "spatial_softmax_backward", lambda: tops.spatial_softmax_backward(gphi, t, stats, 1.3, bm)
    yield "soft_argmax", lambda: tops.soft_argmax(t, 1.0, None, True)
    yield "attention_mask", lambda: tops.attention_mask(t, 0.5, bm)
    yield "landmark_attention", lambda: tops.landmark_attention(t, 1.0, None, False)
    yield "landmark_attention_backward", lambda: tops.landmark_attention_backward(gz, m, t, stats, 1.0, bm, True)
    yield "landmark_attention_backward-no-gz", \
        lambda: tops.landmark_attention_backward(None, m, t, stats, 1.0, None, False)


def test_planned_bodies_launch_what_the_general_path_launches(monkeypatch):
    """The cached plans change nothing: each call launches the same kernels with the same grids, scalars,
    constexprs and tensor layouts, and returns the same bits (and output layouts), as the general path that
    checks and computes everything per call (the path of the combinations no plan covers)."""
    real_launch = tops._launch

    def run(fn):
        launches = []

        def record(kernel, grid, *args, **meta):
            launches.append((kernel, grid, meta, [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                                  else a for a in args]))
            real_launch(kernel, grid, *args, **meta)

        monkeypatch.setattr(tops, "_launch", record)
        out = fn()
        return launches, out

    for name, fn in _equivalence_calls():
        tops._PLANS.clear()
        planned = run(fn)
        assert tops._PLANS and None not in tops._PLANS.values(), f"{name}: no plan taken"
        planned_again = run(fn)  # from the cache
        with monkeypatch.context() as m:
            m.setattr(tops, "_planned", lambda key, builder, *args: None)
            general = run(fn)
        for other in (planned_again, general):
            assert other[0] == planned[0], name
            for x, y in zip(other[1], planned[1]):
                assert (x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype), name
                assert torch.equal(x, y), name


def test_plans_follow_tuning(monkeypatch):
    """A plan is made per TUNING state: an assignment is seen by the next call, and restoring the saved state
    (as the tests' fixtures do, vars(TUNING).update(saved)) serves that state's plans again."""
    grids = []
    monkeypatch.setattr(tops, "_launch", lambda kernel, grid, *args, **meta: grids.append(grid))
    t = torch.randn(2, 5, 4, 4)
    saved = dict(vars(tops.TUNING))
    try:
        tops.TUNING.map_kernel, tops.TUNING.map_programs = "persistent", 3
        tops.soft_argmax(t, 1.0, None, False)
        tops.TUNING.map_programs = 7
        tops.soft_argmax(t, 1.0, None, False)
        state = dict(vars(tops.TUNING))
        tops.TUNING.map_programs = 3
        vars(tops.TUNING).update(state)
        tops.soft_argmax(t, 1.0, None, False)
    finally:
        vars(tops.TUNING).update(saved)
    tops.soft_argmax(t, 1.0, None, False)
    assert grids[:3] == [(3,), (7,), (7,)]
    assert grids[3] == tops._map_fwd_spec(t.shape, t.stride()[0:2] + (1,), t.device, False, True, False, False,
                                          False)[2]
