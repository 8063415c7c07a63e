// Torch-free check of every decafa launcher against a CPU double-precision computation, in float32,
// float16 and bfloat16, over shapes that take the scalar path, the vector path, the batch-chunk loop and
// the unstaged (map larger than the shared-memory limit) path, for every fusion mode.
//
// Runs on a GPU (built by CMakeLists.txt), or on the CPU through kernels/smoke/cpu_emulation.h (built by
// tests/test_kernels_build.py), which checks the kernels' logic on machines without a GPU.
// Exit code: 0 = passed, or no GPU visible (says so); 1 = a mismatch or a CUDA error.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "decafa_kernels.cuh"

namespace dk = decafa_kernels;
using Vec = std::vector<double>;

#define CHECK_CUDA(expr)                                                                              \
  do {                                                                                                \
    cudaError_t err_ = (expr);                                                                        \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

// ------------------------------------------------------------------------------------------------
// Host <-> device in any of the three element types
// ------------------------------------------------------------------------------------------------
const char* dtype_name(dk::DType dt) {
  return dt == dk::DType::kFloat32 ? "float32" : dt == dk::DType::kFloat16 ? "float16" : "bfloat16";
}

float round_to(dk::DType dt, float v) {
  if (dt == dk::DType::kFloat16) return __half2float(__float2half_rn(v));
  if (dt == dk::DType::kBFloat16) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

struct Device {
  std::vector<void*> owned;
  ~Device() {
    for (void* p : owned) cudaFree(p);
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    owned.push_back(p);
    return p;
  }
  // Values in `dt` (the host copy `v` is rounded to what the device holds).
  void* upload(dk::DType dt, Vec& v) {
    const size_t es = dk::dtype_size(dt);
    std::vector<unsigned char> bytes(v.size() * es);
    for (size_t i = 0; i < v.size(); ++i) {
      const float f = static_cast<float>(v[i]);
      if (dt == dk::DType::kFloat32) std::memcpy(&bytes[i * es], &f, es);
      if (dt == dk::DType::kFloat16) {
        const __half h = __float2half_rn(f);
        std::memcpy(&bytes[i * es], &h, es);
      }
      if (dt == dk::DType::kBFloat16) {
        const __nv_bfloat16 h = __float2bfloat16_rn(f);
        std::memcpy(&bytes[i * es], &h, es);
      }
      v[i] = round_to(dt, f);
    }
    void* d = alloc(bytes.size());
    CHECK_CUDA(cudaMemcpy(d, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
    return d;
  }
  void* upload_f32(Vec& v) { return upload(dk::DType::kFloat32, v); }
  // An output buffer filled with NaN, so that unwritten elements fail the comparison.
  void* poisoned(dk::DType dt, size_t n) {
    Vec nan(n, NAN);
    return upload(dt, nan);
  }
};

Vec download(dk::DType dt, const void* d, size_t n) {
  const size_t es = dk::dtype_size(dt);
  std::vector<unsigned char> bytes(n * es);
  CHECK_CUDA(cudaMemcpy(bytes.data(), d, bytes.size(), cudaMemcpyDeviceToHost));
  Vec v(n);
  for (size_t i = 0; i < n; ++i) {
    if (dt == dk::DType::kFloat32) {
      float f;
      std::memcpy(&f, &bytes[i * es], es);
      v[i] = f;
    } else if (dt == dk::DType::kFloat16) {
      __half h;
      std::memcpy(&h, &bytes[i * es], es);
      v[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      std::memcpy(&h, &bytes[i * es], es);
      v[i] = __bfloat162float(h);
    }
  }
  return v;
}

// ------------------------------------------------------------------------------------------------
// CPU reference (double)
// ------------------------------------------------------------------------------------------------
struct Case {
  int b, l, h, w, ci, c, mode;
  float beta;
  bool normalized;
  const char* chunk;  // DECAFA_CUDA_BATCH_CHUNK, or nullptr for auto
  bool all_dtypes;    // also float16 / bfloat16 (else float32 only)
};

struct Stats {
  Vec lse, z, phi, mask;
};

Stats reference_stats(const Case& k, const Vec& t) {
  const int hw = k.h * k.w;
  Stats s{Vec(size_t(k.b) * k.l), Vec(size_t(k.b) * k.l * 2), Vec(t.size()), Vec(size_t(k.b) * hw, 0.0)};
  const double kx = k.normalized ? (k.w > 1 ? 2.0 / (k.w - 1) : 0.0) : 1.0, o = k.normalized ? -1.0 : 0.0;
  const double ky = k.normalized ? (k.h > 1 ? 2.0 / (k.h - 1) : 0.0) : 1.0;
  for (int m = 0; m < k.b * k.l; ++m) {
    const double* a = &t[size_t(m) * hw];
    double mx = -INFINITY, sum = 0, sx = 0, sy = 0;
    for (int p = 0; p < hw; ++p) mx = std::max(mx, k.beta * a[p]);
    for (int p = 0; p < hw; ++p) sum += std::exp(k.beta * a[p] - mx);
    s.lse[m] = mx + std::log(sum);
    for (int p = 0; p < hw; ++p) {
      const double ph = std::exp(k.beta * a[p] - s.lse[m]);
      s.phi[size_t(m) * hw + p] = ph;
      sx += ph * (p % k.w);
      sy += ph * (p / k.w);
      s.mask[size_t(m / k.l) * hw + p] += ph;
    }
    s.z[2 * m] = o + kx * sx;
    s.z[2 * m + 1] = o + ky * sy;
  }
  return s;
}

struct Fusion {
  Vec fused, gi, ge, gm;
};

// Fusion of (img, emb) with `mask` (B, HW), and its backward for the upstream gradient gf.
Fusion reference_fusion(const Case& k, const Vec& img, const Vec& emb, const Vec& mask, const Vec& gf) {
  const int hw = k.h * k.w;
  const dk::FusionLayout lay = dk::fusion_layout(k.mode, k.ci, k.c);
  Fusion f{Vec(size_t(k.b) * lay.channels * hw), Vec(img.size(), 0.0), Vec(emb.size(), 0.0),
           Vec(size_t(k.b) * hw, 0.0)};
  for (int b = 0; b < k.b; ++b)
    for (int p = 0; p < hw; ++p) {
      const double mv = mask[size_t(b) * hw + p];
      auto seg = [&](const Vec& src, int channels, int plain, int masked, Vec& g) {
        for (int c = 0; c < channels; ++c) {
          const size_t in = (size_t(b) * channels + c) * hw + p, out = size_t(b) * lay.channels * hw + p;
          if (plain >= 0) {
            f.fused[out + size_t(plain + c) * hw] = src[in];
            g[in] += gf[out + size_t(plain + c) * hw];
          }
          if (masked >= 0) {
            const double gv = gf[out + size_t(masked + c) * hw];
            f.fused[out + size_t(masked + c) * hw] = src[in] * mv;
            g[in] += gv * mv;
            f.gm[size_t(b) * hw + p] += gv * src[in];
          }
        }
      };
      seg(img, k.ci, lay.image_plain, lay.image_masked, f.gi);
      seg(emb, k.c, lay.embed_plain, lay.embed_masked, f.ge);
    }
  return f;
}

// beta Phi [(g - sum g Phi) + gx kx (col - zx) + gy ky (row - zy)]; g per map or per batch element (or empty).
Vec reference_map_backward(const Case& k, const Vec& phi, const Vec& g, bool per_map, const Vec& gz) {
  const int hw = k.h * k.w;
  const double kx = k.normalized ? (k.w > 1 ? 2.0 / (k.w - 1) : 0.0) : 1.0;
  const double ky = k.normalized ? (k.h > 1 ? 2.0 / (k.h - 1) : 0.0) : 1.0;
  Vec gt(phi.size());
  for (int m = 0; m < k.b * k.l; ++m) {
    const double* ph = &phi[size_t(m) * hw];
    const double* gm = g.empty() ? nullptr : &g[size_t(per_map ? m : m / k.l) * hw];
    double s = 0, zx = 0, zy = 0;
    for (int p = 0; p < hw; ++p) {
      if (gm) s += gm[p] * ph[p];
      zx += ph[p] * (p % k.w);
      zy += ph[p] * (p / k.w);
    }
    const double gx = gz.empty() ? 0.0 : gz[2 * m] * kx, gy = gz.empty() ? 0.0 : gz[2 * m + 1] * ky;
    for (int p = 0; p < hw; ++p)
      gt[size_t(m) * hw + p] =
          k.beta * ph[p] * ((gm ? gm[p] : 0.0) - s + gx * ((p % k.w) - zx) + gy * ((p / k.w) - zy));
  }
  return gt;
}

// ------------------------------------------------------------------------------------------------
// Comparison
// ------------------------------------------------------------------------------------------------
int failures = 0;

void expect_close(const char* what, const Case& k, dk::DType dt, const Vec& got, const Vec& want) {
  const double tol = dt == dk::DType::kFloat32 ? 2e-4 : dt == dk::DType::kFloat16 ? 4e-3 : 2e-2;
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(got[i] - want[i]);
    err = (d == d) ? std::max(err, d) : INFINITY;  // NaN (e.g. an unwritten element) fails
    ref = std::max(ref, std::fabs(want[i]));
  }
  const double rel = err / (ref + 1e-12);
  if (!(rel <= tol)) {
    ++failures;
    std::printf("FAIL %-22s %-8s B=%d L=%d H=%d W=%d Ci=%d C=%d mode=%d: max error / max |ref| = %.3g\n", what,
                dtype_name(dt), k.b, k.l, k.h, k.w, k.ci, k.c, k.mode, rel);
  }
}

Vec random_vec(size_t n, std::mt19937& rng, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

void run_case(const Case& k, dk::DType dt, std::mt19937& rng) {
  if (k.chunk) {
    setenv("DECAFA_CUDA_BATCH_CHUNK", k.chunk, 1);
  } else {
    unsetenv("DECAFA_CUDA_BATCH_CHUNK");
  }
  const int hw = k.h * k.w;
  const dk::FusionLayout lay = dk::fusion_layout(k.mode, k.ci, k.c);
  const size_t n_t = size_t(k.b) * k.l * hw, n_i = size_t(k.b) * k.ci * hw, n_e = size_t(k.b) * k.c * hw;
  const size_t n_f = size_t(k.b) * lay.channels * hw, n_z = size_t(k.b) * k.l * 2, n_m = size_t(k.b) * hw;
  const dk::MapShape shape{k.b, k.l, k.h, k.w};
  const dk::MapShape pixels{k.b, 0, k.h, k.w};
  const dk::DType f32 = dk::DType::kFloat32;
  Device dev;

  Vec t = random_vec(n_t, rng, 2.0), img = random_vec(n_i, rng, 1.0), emb = random_vec(n_e, rng, 1.0);
  Vec gz = random_vec(n_z, rng, 1.0), gf = random_vec(n_f, rng, 1.0), gphi = random_vec(n_t, rng, 1.0);
  Vec ext_mask = random_vec(n_m, rng, 1.0), gmask = random_vec(n_m, rng, 1.0);
  void *d_t = dev.upload(dt, t), *d_i = dev.upload(dt, img), *d_e = dev.upload(dt, emb);
  void *d_gz = dev.upload(dt, gz), *d_gf = dev.upload(dt, gf), *d_gphi = dev.upload(dt, gphi);
  void *d_xm = dev.upload(dt, ext_mask), *d_gmask = dev.upload(dt, gmask);

  // The reference sees the inputs as rounded to dt; the fused head's backward sees lse from the forward.
  const Stats st = reference_stats(k, t);
  const Fusion head = reference_fusion(k, img, emb, st.mask, gf);
  const Fusion ext = reference_fusion(k, img, emb, ext_mask, gf);

  // head_forward (fusion) and head_backward
  auto* lse = static_cast<float*>(dev.poisoned(f32, st.lse.size()));
  void *d_z = dev.poisoned(dt, n_z), *d_f = dev.poisoned(dt, n_f);
  CHECK_CUDA(dk::head_forward(dt, shape, d_t, d_i, k.ci, d_e, k.c, k.mode, k.beta, k.normalized, lse, d_z, nullptr,
                              d_f, nullptr));
  void *d_gt = dev.poisoned(dt, n_t), *d_gi = dev.poisoned(dt, n_i), *d_ge = dev.poisoned(dt, n_e);
  auto* ws = static_cast<float*>(dev.poisoned(f32, dk::head_backward_workspace_floats(shape)));
  CHECK_CUDA(dk::head_backward(dt, shape, d_gz, d_gf, d_t, d_i, k.ci, d_e, k.c, lse, k.mode, k.beta, k.normalized,
                               d_gt, d_gi, d_ge, ws, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_close("head lse", k, f32, download(f32, lse, st.lse.size()), st.lse);
  expect_close("head z", k, dt, download(dt, d_z, n_z), st.z);
  expect_close("head fused", k, dt, download(dt, d_f, n_f), head.fused);
  expect_close("head grad_logits", k, dt, download(dt, d_gt, n_t), reference_map_backward(k, st.phi, head.gm, false, gz));
  expect_close("head grad_image", k, dt, download(dt, d_gi, n_i), head.gi);
  expect_close("head grad_embed", k, dt, download(dt, d_ge, n_e), head.ge);

  // head_backward with grad_fused = null (loss on z only): grad_image = grad_embed = 0
  CHECK_CUDA(dk::head_backward(dt, shape, d_gz, nullptr, d_t, d_i, k.ci, d_e, k.c, lse, k.mode, k.beta,
                               k.normalized, d_gt, d_gi, d_ge, nullptr, nullptr));
  expect_close("z-only grad_logits", k, dt, download(dt, d_gt, n_t), reference_map_backward(k, st.phi, {}, false, gz));
  expect_close("z-only grad_embed", k, dt, download(dt, d_ge, n_e), Vec(n_e, 0.0));

  if (!k.all_dtypes && dt != f32) return;
  // head_forward without fusion: z and the mask (soft_argmax / attention_mask / landmark_attention)
  void* d_m = dev.poisoned(dt, n_m);
  CHECK_CUDA(dk::head_forward(dt, shape, d_t, nullptr, 0, nullptr, 0, 0, k.beta, k.normalized, lse, d_z, d_m,
                              nullptr, nullptr));
  expect_close("attention mask", k, dt, download(dt, d_m, n_m), st.mask);
  expect_close("attention z", k, dt, download(dt, d_z, n_z), st.z);

  // spatial_softmax and its backward (grad per map)
  void* d_phi = dev.poisoned(dt, n_t);
  CHECK_CUDA(dk::map_forward(dt, shape, d_t, k.beta, k.normalized, lse, nullptr, d_phi, nullptr));
  expect_close("softmax phi", k, dt, download(dt, d_phi, n_t), st.phi);
  CHECK_CUDA(dk::map_backward(dt, shape, d_gphi, true, false, nullptr, d_t, lse, k.beta, k.normalized, d_gt, nullptr));
  expect_close("softmax grad", k, dt, download(dt, d_gt, n_t), reference_map_backward(k, st.phi, gphi, true, {}));

  // landmark_attention backward: grad_mask in dt (per batch element) and grad_z
  CHECK_CUDA(dk::map_backward(dt, shape, d_gmask, false, false, d_gz, d_t, lse, k.beta, k.normalized, d_gt, nullptr));
  expect_close("attention grad", k, dt, download(dt, d_gt, n_t), reference_map_backward(k, st.phi, gmask, false, gz));

  // fuse / fuse_backward with an explicit mask
  CHECK_CUDA(dk::pixel_forward(dt, pixels, nullptr, nullptr, 1.f, d_xm, nullptr, d_i, k.ci, d_e, k.c, k.mode, d_f,
                               nullptr));
  expect_close("fuse", k, dt, download(dt, d_f, n_f), ext.fused);
  void* d_gm = dev.poisoned(dt, n_m);
  CHECK_CUDA(dk::pixel_backward(dt, pixels, d_gf, nullptr, nullptr, 1.f, d_xm, d_i, k.ci, d_e, k.c, k.mode, d_gi,
                                d_ge, d_gm, false, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_close("fuse grad_image", k, dt, download(dt, d_gi, n_i), ext.gi);
  expect_close("fuse grad_embed", k, dt, download(dt, d_ge, n_e), ext.ge);
  expect_close("fuse grad_mask", k, dt, download(dt, d_gm, n_m), ext.gm);
}

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("decafa_kernels_smoke: no CUDA device visible, nothing run\n");
    return 0;
  }
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // skip the large map
  std::mt19937 rng(1234);
  const Case cases[] = {
      {2, 3, 5, 7, 1, 3, 5, 1.0f, false, nullptr, true},      // scalar path (H*W odd)
      {2, 3, 1, 1, 2, 2, 4, 1.0f, true, nullptr, true},       // one pixel
      {3, 5, 16, 16, 1, 5, 5, 0.7f, true, nullptr, true},     // vector path, L not a multiple of 4
      {3, 4, 16, 16, 3, 2, 1, 1.0f, false, "1", false},       // F1, one batch element per chunk
      {3, 4, 16, 16, 3, 2, 2, 1.0f, false, "2", false},       // F2, uneven chunks
      {2, 5, 12, 20, 1, 4, 3, 2.0f, false, nullptr, false},   // F3
      {2, 9, 24, 24, 2, 7, 4, -1.5f, true, nullptr, true},    // F4, negative beta
      {1, 2, 190, 190, 1, 2, 5, 1.0f, false, nullptr, false}, // map over the shared-memory staging limit
  };
  const dk::DType dtypes[] = {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16};
  for (const Case& k : cases) {
    if (quick && k.h * k.w > 10000) continue;
    for (dk::DType dt : dtypes)
      if (dt == dk::DType::kFloat32 || k.all_dtypes) run_case(k, dt, rng);
  }
  std::printf("decafa_kernels_smoke: %s\n", failures == 0 ? "all cases passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
