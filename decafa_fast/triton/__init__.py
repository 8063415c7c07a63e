"""Triton kernels for the decafa ops (op contract v2), registered as decafa_triton::* (ops.py).

    stats.py          per-(b, run of maps) kernels: statistics, soft-argmax, Phi and partial masks (forward);
                      grad T and grad beta (backward)
    fusion.py         per-(b, pixel tile) kernels: mask from the partials + F1-F5 fusion (forward); grad I,
                      grad E, grad M (backward)
    ops.py            op bodies (allocation, launch configuration, device guard) and registration; launch
                      parameters in ops.TUNING
    checks.py         argument checks of every op (RuntimeError naming the argument)
    probe.py          what the interpreter of this process can run (bfloat16)
    compile_check.py  compiles every kernel for sm_90 without a GPU; reports registers, spills, vector accesses

Passes of the fused head (B, L maps of H x W, Ci image and C embedding channels, F5; e = element size)
    forward  1. map_fwd_kernel, one program per (b, run of L/4 consecutive maps). Each map of the run is loaded
                once as a whole [H, W] tile (up to 128 x 128 on chip: 32 warps, 16 pixels a thread) and gives
                max and sum of exp(s - max) (the stats), z from the row / column marginals of exp(s - max),
                and Phi = exp(s - max) / sum, added into the run's partial mask in registers.
                Moves: reads T (B L HW e); writes stats and z (B L 16 bytes) and 4 partial masks (B 4 HW 4).
             2. mask_fuse_fwd_kernel, one program per (b, pixel tile): M = the 4 partials added in run order,
                written once (the backward's saved M); reads I and E once, writes F once, in E's layout.
                Moves: reads partials, I, E (B 4 HW 4 + B (Ci + C) HW e); writes M, F (B (1 + CF) HW e).
    backward 3. fuse_bwd_kernel, per (b, pixel tile): reads grad F, I, E and the saved M once; writes grad I,
                grad E and a float32 grad M (B HW 4): grad M = sum over the masked blocks of grad F * (I or E).
             4. map_bwd_kernel, per (b, run of maps): grad M read once per run and held on chip; each map of
                T read once (whole tile) with its stats: Phi, g = grad M + grad z . coordinates,
                g_s = Phi (g - sum Phi g), grad T = beta g_s, grad beta = sum T g_s. T is never read for M.
    Counted under the interpreter (tests/triton/test_traffic.py; per batch item at L = 98, 128 x 128, Ci = 1,
    C = 64, F5): forward 1.031x its floor (read T, I, E; write z, F) in float32 and 1.058x in bfloat16;
    forward + backward 1.019x / 1.036x of theirs. The overhead is the partial masks (8 bytes per pixel per
    run, float32 whatever the dtype), M and the stats. Per-kernel bytes: bench/RESULTS.md.

Other ops use the same kernels: spatial_softmax and soft_argmax run pass 1 with one map per program (Phi /
z, no partials); attention_mask and landmark_attention run passes 1 and 2 without fusion; fuse runs pass 2
from a mask tensor; the backward ops run passes 3 and / or 4.

Layouts: every tensor is addressed through its batch, channel and pixel strides (pixel p = row W + col with
one stride: contiguous, channels_last and broadcast tensors are used in place; other layouts are copied).
channels_last logits interleave the maps pixel by pixel, so pass 1 / 4 read rows of up to 32 consecutive maps
(no strided over-fetch) in pixel chunks and sweep a run's maps twice (statistics, then Phi / gradients); a map
larger than 128 x 128 does the same. F is written in E's memory format; gradients are contiguous.

Determinism: no atomics anywhere. Every reduction runs inside one program in a fixed order (tl.max / tl.sum
over a tile, loops in index order), and the only cross-program sum (the partial masks) is added by pass 2 in
run order; partition sizes depend on the shape and ops.TUNING only. Results are bitwise reproducible.

Accuracy: s = beta T in float32; Phi = exp(s - max) / sum, normalised by the sum of the shifted exponentials
(never exp(s - log-sum-exp)), so float32 stays within 1e-6 relative of float64 for |beta T| up to 1e30.

GPU hygiene: a device guard around every launch (Triton launches on the current device); 64-bit offsets
(int32 only for a pixel index inside one map while (HW - 1) * pixel stride < 2**31); 16-byte vector accesses
where strides allow (compile_check counts ld/st.global.v4); eviction_policy="evict_first" on data touched
once (T in the whole-map passes, E, F, I, grad F, Phi, grad T).
"""
