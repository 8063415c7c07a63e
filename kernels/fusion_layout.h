// The channel layout of the fused output F (mode 1..5 = F1..F5), shared by the CPU kernels (csrc/cpu/) and
// the CUDA kernels (kernels/). Torch-free, host and device, C++17 or later. Its Python twin is
// decafa_fast/ops/layout.py; the two must agree.
//   F1 = E;  F2 = I*M;  F3 = I | I*M;  F4 = I | I*M | E*M;  F5 = I | I*M | E | E*M.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DECAFA_HD __host__ __device__
#else
#define DECAFA_HD
#endif

namespace decafa {

// First channel of each block in F, -1 when the mode has no such block; `channels` is F's channel count.
// Mode 0 (no fusion) gives no block and 0 channels; an unknown mode gives channels = -1.
struct FusionLayout {
  int image, image_mask, embedding, embedding_mask, channels;
};

// Layout of F for image channels `ci` and embedding channels `c`.
DECAFA_HD constexpr FusionLayout fusion_layout(int mode, int ci, int c) {
  switch (mode) {
    case 0: return {-1, -1, -1, -1, 0};
    case 1: return {-1, -1, 0, -1, c};
    case 2: return {-1, 0, -1, -1, ci};
    case 3: return {0, ci, -1, -1, 2 * ci};
    case 4: return {0, ci, -1, 2 * ci, 2 * ci + c};
    case 5: return {0, ci, 2 * ci, 2 * ci + c, 2 * ci + 2 * c};
    default: return {-1, -1, -1, -1, -1};
  }
}

}  // namespace decafa
