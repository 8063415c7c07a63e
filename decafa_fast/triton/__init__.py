"""Triton kernels for the decafa ops (op contract v2), registered as decafa_triton::* (ops.py).

    persistent.py     persistent per-map kernels (the default for whole contiguous maps): a fixed number of
                      programs over balanced ranges of the B*L maps, the next map's loads in flight behind the
                      current map's reductions; statistics, soft-argmax, Phi, partial masks / grad T, grad beta
    stats.py          per-(b, run of maps) kernels, the same outputs: channels_last T, maps larger than
                      TUNING.map_block_max, and TUNING.map_kernel = "runs"
    fusion.py         per-(b, pixel tile) kernels: mask from the partials + F1-F5 fusion (forward); grad I,
                      grad E, grad M (backward)
    ops.py            op bodies (allocation, launch configuration, device guard) and registration; launch
                      parameters in ops.TUNING
    tuning.py         the tuning table (tuning_table.json) keyed by GPU model, applied on the first CUDA call
    checks.py         argument checks of every op (RuntimeError naming the argument)
    probe.py          what the interpreter of this process can run (bfloat16)
    compile_check.py  compiles every kernel for sm_90 without a GPU; reports registers, spills, shared memory,
                      vector accesses, cp.async and block barriers per map

Passes of the fused head (B, L maps of H x W, Ci image and C embedding channels, F5; e = element size)
    forward  1. map_fwd_persistent_kernel: P programs (one per SM on a GPU; TUNING.map_programs), program p
                over maps [p BL / P, (p+1) BL / P) of the flattened (b, l). Each map is loaded once as a whole
                [H, W] tile (up to 128 x 128 on chip: 32 warps, 16 pixels a thread), the next one copied to
                shared memory meanwhile (tl.range num_stages = TUNING.map_stages, cp.async); per map two
                reductions: the max, then sum exp(s - max) and its x / y moments (z) as one tl.reduce of three
                quantities; Phi = exp(s - max) / sum added into the piece's partial mask in registers, written
                when the program's range leaves a batch item.
                Moves: reads T (B L HW e); writes stats and z (B L 16 bytes) and (P + B) partial masks of HW
                float32 at most (one per piece: a program's range within one batch item).
                (map_fwd_kernel, per (b, run of L/4 maps), the same reductions.)
             2. mask_fuse_fwd_kernel, one program per (b, pixel tile): M = b's partials added in program order,
                written once (the backward's saved M); reads I and E once, writes F once, in E's layout.
                Moves: reads partials, I, E (B 4 HW 4 + B (Ci + C) HW e); writes M, F (B (1 + CF) HW e).
    backward 3. fuse_bwd_kernel, per (b, pixel tile): reads grad F, I, E and the saved M once; writes grad I,
                grad E and a float32 grad M (B HW 4): grad M = sum over the masked blocks of grad F * (I or E).
             4. map_bwd_persistent_kernel, the ranges of pass 1: grad M read once per piece and held on chip;
                each map of T read once (whole tile, the next one prefetched) with its stats: Phi (one exp a
                logit), g = grad M + grad z . coordinates (per element), g_s = Phi (g - sum Phi g), grad T =
                beta g_s, grad beta = sum T g_s, with T centred as (beta T - max) / beta (T dead once the
                exp's argument is formed; maps with |beta| < 2**-40 fixed after the loop); the three sums
                in one tl.reduce, one reduction a map. T is never read for M. (map_bwd_kernel: per (b, run
                of maps), the same arithmetic.)
    Counted under the interpreter (tests/triton/test_traffic.py; per batch item at L = 98, 128 x 128, Ci = 1,
    C = 64, F5; 4 runs, or 4 pieces: the interpreter's default of B * mask_runs persistent programs):
    persistent and per-run kernels alike (the same bytes per kernel): forward 1.031x its floor (read T, I, E;
    write z, F) in float32 and 1.058x in bfloat16; forward + backward 1.019x / 1.036x of theirs.
    The overhead is the partial masks (8 bytes per pixel per run or piece, float32 whatever the dtype), M
    and the stats. On a GPU with P = 132 programs a batch item has P / B + 1 pieces at most (3 at B = 64).

Other ops use the same kernels: spatial_softmax and soft_argmax run pass 1 (Phi / z, no partials; with
the per-run kernel, one map per program); attention_mask and landmark_attention run passes 1 and 2
without fusion; fuse runs pass 2 from a mask tensor; the backward ops run passes 3 and / or 4.

Layouts: every tensor is addressed through its batch, channel and pixel strides (pixel p = row W + col with
one stride: contiguous, channels_last and broadcast tensors are used in place; other layouts are copied).
channels_last logits interleave the maps pixel by pixel, so pass 1 / 4 read rows of up to 32 consecutive maps
(no strided over-fetch) in pixel chunks and sweep a run's maps twice (statistics, then Phi / gradients); a map
larger than 128 x 128 does the same. F is written in E's memory format; gradients are contiguous.

Determinism: no atomics anywhere. Every reduction runs inside one program in a fixed order (tl.max / tl.sum
/ tl.reduce over a tile, loops in index order), and the only cross-program sum (the partial masks) is added
by pass 2 in run / program order; partition sizes depend on the shape, ops.TUNING and the GPU's SM count
only. Results are bitwise reproducible on one GPU model (the program count follows the SM count).

Host side (small batches): an op call looks up one plan keyed by its arguments' metadata (shapes, strides,
dtypes, devices, flags) and the TUNING state (ops._planned): the argument checks ran when the plan was made,
and it holds the launch specs (kernels, grids, integer arguments, constexprs), output shapes and memory
formats, so a call only allocates its outputs (torch.empty with unpacked sizes, the cheapest form) and
launches. Combinations no plan covers (B = 0, tensors that must be copied, absent gradients) and keys that
cannot be hashed (symbolic sizes while tracing) take the general path, which checks (once per kind of
arguments: ops._checked) and computes everything per call; tests/triton/test_host_overhead.py checks that
both paths launch the same and return the same bits. Triton's constexpr-function wrappers (triton.cdiv)
are avoided and, in eager mode, the kernel is called without the wrap_triton tracing wrapper. The test
times each op body with the launches stubbed (budget 15 us per op call on the 2-core CPU machine, where
the slowest, decafa_head_backward, takes about 12 us; it prints the times with -s).

Compile check (sm_90, no GPU): registers / stack bytes (spills) / block barriers per map of the per-map
kernels at the tuned size (pmap_*: persistent, B = 64 over 132 programs; map_*: per run), from
    python -m decafa_fast.triton.compile_check --fail-on-spill                     # Triton 3.9
    pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python -m decafa_fast.triton.compile_check --fail-on-spill   # Triton 3.6
    regs / stack / barriers       3.6 fp32   3.6 bf16   3.9 fp32   3.9 bf16
    pmap_fwd head                    64/0/6     64/0/6     64/0/6     63/0/6
    pmap_fwd attention_mask          58/0/6     64/0/6     57/0/4     64/0/4
    pmap_fwd softmax                 54/0/6     52/0/6     52/0/4     52/0/4
    pmap_fwd soft_argmax             32/0/6     44/0/6     54/0/6     63/0/6
    pmap_bwd head                    62/0/3     63/0/3     59/0/4     64/0/4
    pmap_bwd attention_mask          53/0/3     53/0/3     52/0/4     53/0/4
    pmap_bwd softmax                 52/0/3     53/0/3     61/0/4     57/0/4
    pmap_bwd soft_argmax             48/0/3     50/0/3     44/0/4     46/0/4
    map_fwd head                     64/0/6     58/0/6     58/0/6     60/0/6
    map_fwd softmax                  51/0/6     50/0/6     51/0/4     50/0/4
    map_fwd soft_argmax              58/0/6     63/0/6     42/0/6     48/0/6
    map_bwd head                     61/0/3     62/0/3     62/0/4     62/0/4
    map_bwd softmax                  52/0/3     51/0/3     62/0/4     58/0/4
    map_fwd head channels_last       59/0/6     63/0/6     59/0/6     58/0/6
    map_bwd head channels_last       63/0/3     64/0/3     61/0/4     64/0/4
The persistent kernels keep the next map in shared memory (64 KiB fp32 / 32 KiB bf16 a stage; 128 KiB for
the softmax backward, which prefetches T and grad Phi); their loads are cp.async (16 bytes). No variant has
a stack (spills), float16 included, and no pixel-tile kernel either: compile_check.SPILL_ALLOWANCE is empty,
so --fail-on-spill fails on any. What keeps them there (compile_check's comment has the measurements): the
backward centres T for grad beta as (beta T - max) / beta, so T is dead once the exp's argument is formed
(maps with |beta| < 2**-40 get grad beta from a sweep after the map loop), and forms g = G + grad z .
coordinates per element in its three sums, not as a live tile or seven sums; the per-run kernels take the
persistent ones' reductions; a map that fills its tile takes constant pixel offsets, no tile of offsets in
registers; interleaved (channels_last) T takes a [W, H] tile on Triton < 3.9 (stats.py, COLS_FIRST), whose
strided loads then share the layout of the contiguous stores (no layout conversion per map).

Overflow: a map whose beta T overflows float32 (a max of +-inf) gets the exact limit of softmax(beta T),
P = [T == c] / k (c = max T for beta > 0, min T for beta < 0; NaN when c is not finite or the map holds a
NaN), saved stats (+-inf, k), and in the backward grad T = beta P (g - sum P g), grad beta = 0. The per-map
kernels fix such maps in a loop after their map loop (a scalar test of each map's stored max), so the map
loop is what it was; tests/triton/test_overflow.py checks every kernel family against the rule.

Accuracy: s = beta T in float32; Phi = exp(s - max) / sum, normalised by the sum of the shifted exponentials
(never exp(s - log-sum-exp)), so float32 stays within 1e-6 relative of float64 for |beta T| up to 1e30.

GPU hygiene: a device guard around every launch (Triton launches on the current device); 64-bit offsets
(int32 only for a pixel index inside one map while (HW - 1) * pixel stride < 2**31); 16-byte vector accesses
where strides allow (compile_check counts ld/st.global.v4); eviction_policy="evict_first" on data touched
once (T in the whole-map passes, E, F, I, grad F, Phi, grad T).
"""
