// Torch-free check of every decafa launcher against a CPU double-precision computation, in float32,
// float16 and bfloat16, over shapes that take the scalar path, the vector path, the batch-chunk loop and
// the unstaged (map larger than the shared-memory limit) path, for every fusion mode; with
// DECAFA_CUDA_MAPS=ring the whole-tile NCHW shapes take the ring kernels (ring.cu), the others the run kernels.
//
// Runs on a GPU (built by CMakeLists.txt), or on the CPU through kernels/smoke/cpu_emulation.h (built by
// tests/cuda/test_kernels_build.py), which checks the kernels' logic on machines without a GPU.
// Exit code: 0 = passed, or no GPU visible (says so); 1 = a mismatch or a CUDA error.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
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
// Layouts: host vectors are NCHW; the device copy is NCHW or channels_last.
// ------------------------------------------------------------------------------------------------
Vec to_layout(const Vec& v, int n, int c, int hw, bool cl) {
  if (!cl) return v;
  Vec out(v.size());
  for (int b = 0; b < n; ++b)
    for (int ch = 0; ch < c; ++ch)
      for (int p = 0; p < hw; ++p) out[(size_t(b) * hw + p) * c + ch] = v[(size_t(b) * c + ch) * hw + p];
  return out;
}

Vec from_layout(const Vec& v, int n, int c, int hw, bool cl) {
  if (!cl) return v;
  Vec out(v.size());
  for (int b = 0; b < n; ++b)
    for (int ch = 0; ch < c; ++ch)
      for (int p = 0; p < hw; ++p) out[(size_t(b) * c + ch) * hw + p] = v[(size_t(b) * hw + p) * c + ch];
  return out;
}

dk::Strides strides(int c, int hw, bool cl) { return cl ? dk::nhwc_strides(c, hw) : dk::nchw_strides(c, hw); }

// Rounds `v` to dt in place and uploads it in the layout.
void* upload_as(Device& dev, dk::DType dt, Vec& v, int n, int c, int hw, bool cl) {
  for (auto& x : v) x = round_to(dt, static_cast<float>(x));
  Vec laid = to_layout(v, n, c, hw, cl);
  return dev.upload(dt, laid);
}

Vec download_as(dk::DType dt, const void* d, int n, int c, int hw, bool cl) {
  return from_layout(download(dt, d, size_t(n) * c * hw), n, c, hw, cl);
}

// ------------------------------------------------------------------------------------------------
// CPU reference (double), op contract v2
// ------------------------------------------------------------------------------------------------
struct Case {
  int b, l, h, w, ci, c, mode;
  float beta;
  bool beta_map, normalized, logits_cl, embed_cl;
  bool all_dtypes;  // also float16 / bfloat16 (else float32 only)
};

struct Forward {
  Vec beta, stats, z, phi, mask;  // beta: the effective beta of each map
};

Forward reference_forward(const Case& k, const Vec& t, const Vec& beta_map) {
  const int hw = k.h * k.w;
  const size_t maps = size_t(k.b) * k.l;
  Forward f{Vec(maps), Vec(2 * maps), Vec(2 * maps), Vec(t.size()), Vec(size_t(k.b) * hw, 0.0)};
  const double kx = k.normalized ? (k.w > 1 ? 2.0 / (k.w - 1) : 0.0) : 1.0;
  const double ky = k.normalized ? (k.h > 1 ? 2.0 / (k.h - 1) : 0.0) : 1.0;
  const double ox = k.normalized && k.w > 1 ? -1.0 : 0.0, oy = k.normalized && k.h > 1 ? -1.0 : 0.0;
  for (size_t m = 0; m < maps; ++m) {
    const double beta = k.beta_map ? beta_map[m] : k.beta;
    f.beta[m] = beta;
    const double* a = &t[m * hw];
    double mx = -INFINITY, sum = 0, sx = 0, sy = 0;
    for (int p = 0; p < hw; ++p) mx = std::max(mx, beta * a[p]);
    for (int p = 0; p < hw; ++p) sum += std::exp(beta * a[p] - mx);
    f.stats[2 * m] = mx;
    f.stats[2 * m + 1] = sum;
    for (int p = 0; p < hw; ++p) {
      const double ph = std::exp(beta * a[p] - mx) / sum;
      f.phi[m * hw + p] = ph;
      sx += ph * (p % k.w);
      sy += ph * (p / k.w);
      f.mask[(m / k.l) * hw + p] += ph;
    }
    f.z[2 * m] = ox + kx * sx;
    f.z[2 * m + 1] = oy + ky * sy;
  }
  return f;
}

struct Fusion {
  Vec fused, gi, ge, gm;
};

// Fusion of (img, emb) with `mask` (B, HW), and its backward for the upstream gradient gf (all NCHW).
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
      seg(img, k.ci, lay.image, lay.image_mask, f.gi);
      seg(emb, k.c, lay.embedding, lay.embedding_mask, f.ge);
    }
  return f;
}

// g_phi = g + grad_z . coord; g_s = Phi (g_phi - sum Phi g_phi); grad_T = beta g_s; grad_beta = sum T g_s.
// g per map or per batch element (or empty), gz empty = 0.
struct MapGrads {
  Vec gt, gbeta;
};

MapGrads reference_map_backward(const Case& k, const Forward& f, const Vec& t, const Vec& g, bool per_map,
                                const Vec& gz) {
  const int hw = k.h * k.w;
  const double kx = k.normalized ? (k.w > 1 ? 2.0 / (k.w - 1) : 0.0) : 1.0;
  const double ky = k.normalized ? (k.h > 1 ? 2.0 / (k.h - 1) : 0.0) : 1.0;
  const double ox = k.normalized && k.w > 1 ? -1.0 : 0.0, oy = k.normalized && k.h > 1 ? -1.0 : 0.0;
  MapGrads out{Vec(t.size()), Vec(size_t(k.b) * k.l)};
  for (size_t m = 0; m < size_t(k.b) * k.l; ++m) {
    const double* ph = &f.phi[m * hw];
    const double* gm = g.empty() ? nullptr : &g[(per_map ? m : m / k.l) * hw];
    const double gx = gz.empty() ? 0.0 : gz[2 * m], gy = gz.empty() ? 0.0 : gz[2 * m + 1];
    auto gphi = [&](int p) { return (gm ? gm[p] : 0.0) + gx * (ox + kx * (p % k.w)) + gy * (oy + ky * (p / k.w)); };
    double s = 0;
    for (int p = 0; p < hw; ++p) s += ph[p] * gphi(p);
    double gb = 0;
    for (int p = 0; p < hw; ++p) {
      const double gs = ph[p] * (gphi(p) - s);
      out.gt[m * hw + p] = f.beta[m] * gs;
      gb += t[m * hw + p] * gs;
    }
    out.gbeta[m] = gb;
  }
  return out;
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
    std::printf("FAIL %-24s %-8s B=%d L=%d H=%d W=%d Ci=%d C=%d mode=%d beta_map=%d cl=%d/%d: "
                "max error / max |ref| = %.3g\n",
                what, dtype_name(dt), k.b, k.l, k.h, k.w, k.ci, k.c, k.mode, k.beta_map, k.logits_cl, k.embed_cl,
                rel);
  }
}

Vec random_vec(size_t n, std::mt19937& rng, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// The stats as (max, sum) against the reference; the max compared relative to the largest |max|.
void expect_stats(const Case& k, const Vec& got, const Vec& want) {
  Vec gm, gs, wm, ws;
  for (size_t i = 0; i < want.size(); i += 2) {
    gm.push_back(got[i]);
    wm.push_back(want[i]);
    gs.push_back(got[i + 1]);
    ws.push_back(want[i + 1]);
  }
  expect_close("stats max", k, dk::DType::kFloat32, gm, wm);
  expect_close("stats sum", k, dk::DType::kFloat32, gs, ws);
}

void run_case(const Case& k, dk::DType dt, std::mt19937& rng) {
  const int hw = k.h * k.w;
  const dk::FusionLayout lay = dk::fusion_layout(k.mode, k.ci, k.c);
  const size_t n_t = size_t(k.b) * k.l * hw, n_i = size_t(k.b) * k.ci * hw, n_e = size_t(k.b) * k.c * hw;
  const size_t n_f = size_t(k.b) * lay.channels * hw, n_z = size_t(k.b) * k.l * 2, n_m = size_t(k.b) * hw;
  const size_t maps = size_t(k.b) * k.l;
  const dk::MapShape shape{k.b, k.l, k.h, k.w};
  const dk::DType f32 = dk::DType::kFloat32;
  Device dev;

  Vec t = random_vec(n_t, rng, 2.0), img = random_vec(n_i, rng, 1.0), emb = random_vec(n_e, rng, 1.0);
  Vec gz = random_vec(n_z, rng, 1.0), gf = random_vec(n_f, rng, 1.0), gphi = random_vec(n_t, rng, 1.0);
  Vec ext_mask = random_vec(n_m, rng, 1.0), gmask = random_vec(n_m, rng, 1.0);
  Vec beta_map = random_vec(maps, rng, 1.0);
  void* d_t = upload_as(dev, dt, t, k.b, k.l, hw, k.logits_cl);
  void* d_i = upload_as(dev, dt, img, k.b, k.ci, hw, k.embed_cl);
  void* d_e = upload_as(dev, dt, emb, k.b, k.c, hw, k.embed_cl);
  void* d_gf = upload_as(dev, dt, gf, k.b, lay.channels, hw, k.embed_cl);
  void* d_gphi = upload_as(dev, dt, gphi, k.b, k.l, hw, k.logits_cl);
  void *d_gz = dev.upload(dt, gz), *d_xm = dev.upload(dt, ext_mask), *d_gmask = dev.upload(dt, gmask);
  auto* d_beta = static_cast<float*>(dev.upload_f32(beta_map));

  const dk::Logits logits{d_t, strides(k.l, hw, k.logits_cl), k.beta, k.beta_map ? d_beta : nullptr};
  const dk::FusionInputs fusion{k.mode, d_i, strides(k.ci, hw, k.embed_cl), k.ci,
                                d_e,    strides(k.c, hw, k.embed_cl),  k.c};
  const dk::Strides fs = strides(lay.channels, hw, k.embed_cl);

  // The reference sees the inputs as rounded to dt.
  const Forward ref = reference_forward(k, t, beta_map);
  const Fusion head = reference_fusion(k, img, emb, ref.mask, gf);
  const Fusion ext = reference_fusion(k, img, emb, ext_mask, gf);

  // head_forward with fusion: stats, z, M, F
  auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * maps));
  auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
  void *d_z = dev.poisoned(dt, n_z), *d_f = dev.poisoned(dt, n_f), *d_m = dev.poisoned(dt, n_m);
  CHECK_CUDA(dk::head_forward(dt, shape, logits, k.normalized, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws,
                              nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_stats(k, download(f32, stats, 2 * maps), ref.stats);
  expect_close("head z", k, dt, download(dt, d_z, n_z), ref.z);
  expect_close("head mask", k, dt, download(dt, d_m, n_m), ref.mask);
  expect_close("head fused", k, dt, download_as(dt, d_f, k.b, lay.channels, hw, k.embed_cl), head.fused);

  // head_backward from the forward's M and stats; gradients NCHW contiguous
  const dk::Strides gis = dk::nchw_strides(k.ci, hw), ges = dk::nchw_strides(k.c, hw);
  void *d_gt = dev.poisoned(dt, n_t), *d_gi = dev.poisoned(dt, n_i), *d_ge = dev.poisoned(dt, n_e);
  auto* gbeta = static_cast<float*>(dev.poisoned(f32, maps));
  auto* bws = static_cast<float*>(dev.poisoned(f32, dk::head_backward_workspace_floats(shape)));
  CHECK_CUDA(dk::head_backward(dt, shape, logits, stats, k.normalized, d_gz, d_gf, fs, d_m, fusion, d_gt, gbeta, d_gi,
                               gis, d_ge, ges, bws, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  // the reference backward sees M as stored in dt
  Vec m_dt = download(dt, d_m, n_m);
  const Fusion head_b = reference_fusion(k, img, emb, m_dt, gf);
  const MapGrads hg = reference_map_backward(k, ref, t, head_b.gm, false, gz);
  expect_close("head grad_logits", k, dt, download(dt, d_gt, n_t), hg.gt);
  expect_close("head grad_beta", k, f32, download(f32, gbeta, maps), hg.gbeta);
  expect_close("head grad_image", k, dt, download(dt, d_gi, n_i), head_b.gi);
  expect_close("head grad_embed", k, dt, download(dt, d_ge, n_e), head_b.ge);

  // head_backward with grad_fused = null (loss on z only): grad_image = grad_embed = 0
  CHECK_CUDA(dk::head_backward(dt, shape, logits, stats, k.normalized, d_gz, nullptr, fs, d_m, fusion, d_gt, gbeta,
                               d_gi, gis, d_ge, ges, nullptr, nullptr));
  const MapGrads zg = reference_map_backward(k, ref, t, {}, false, gz);
  expect_close("z-only grad_logits", k, dt, download(dt, d_gt, n_t), zg.gt);
  expect_close("z-only grad_beta", k, f32, download(f32, gbeta, maps), zg.gbeta);
  expect_close("z-only grad_embed", k, dt, download(dt, d_ge, n_e), Vec(n_e, 0.0));

  if (!k.all_dtypes && dt != f32) return;
  // spatial_softmax (phi, no mask) and its backward (grad per map, in the logits' layout)
  void* d_phi = dev.poisoned(dt, n_t);
  CHECK_CUDA(dk::head_forward(dt, shape, logits, k.normalized, stats, nullptr, d_phi, nullptr, nullptr, nullptr, fs,
                              nullptr, nullptr));
  expect_close("softmax phi", k, dt, download(dt, d_phi, n_t), ref.phi);
  const dk::PhiGrad per_map{d_gphi, true, false, strides(k.l, hw, k.logits_cl)};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, k.normalized, per_map, nullptr, d_gt, gbeta, nullptr));
  const MapGrads sg = reference_map_backward(k, ref, t, gphi, true, {});
  expect_close("softmax grad", k, dt, download(dt, d_gt, n_t), sg.gt);
  expect_close("softmax grad_beta", k, f32, download(f32, gbeta, maps), sg.gbeta);

  // landmark_attention: z and M without fusion; backward with grad_mask in dt and grad_z
  void *d_z2 = dev.poisoned(dt, n_z), *d_m2 = dev.poisoned(dt, n_m);
  CHECK_CUDA(dk::head_forward(dt, shape, logits, k.normalized, stats, d_z2, nullptr, d_m2, nullptr, nullptr, fs, ws,
                              nullptr));
  expect_close("attention z", k, dt, download(dt, d_z2, n_z), ref.z);
  expect_close("attention mask", k, dt, download(dt, d_m2, n_m), ref.mask);
  const dk::PhiGrad per_batch{d_gmask, false, false, dk::Strides{0, 0, 0}};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, k.normalized, per_batch, d_gz, d_gt, gbeta, nullptr));
  const MapGrads ag = reference_map_backward(k, ref, t, gmask, false, gz);
  expect_close("attention grad", k, dt, download(dt, d_gt, n_t), ag.gt);
  expect_close("attention grad_beta", k, f32, download(f32, gbeta, maps), ag.gbeta);

  // fuse / fuse_backward with an explicit mask
  CHECK_CUDA(dk::fuse_forward(dt, shape, d_xm, fusion, d_f, fs, nullptr));
  expect_close("fuse", k, dt, download_as(dt, d_f, k.b, lay.channels, hw, k.embed_cl), ext.fused);
  void* d_gm = dev.poisoned(dt, n_m);
  CHECK_CUDA(dk::fuse_backward(dt, shape, d_gf, fs, d_xm, fusion, d_gi, gis, d_ge, ges, d_gm, false, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_close("fuse grad_image", k, dt, download(dt, d_gi, n_i), ext.gi);
  expect_close("fuse grad_embed", k, dt, download(dt, d_ge, n_e), ext.ge);
  expect_close("fuse grad_mask", k, dt, download(dt, d_gm, n_m), ext.gm);
}

// A one-pixel map has Phi = 1 whatever T and beta, so the gradients of T and beta are exactly 0 (the
// reference's too, so no tolerance helps). The first GPU run got ~1e-7 at B = L = H = W = 1, F1, beta = 1.3,
// normalized = false: the backward's beta * T - max was contracted into one FMA, skipping the rounding of
// beta * T that the forward's max had, and exp(rounding error) != 1. T = 3.5: 1.3f * 3.5 rounds by 1.2e-7.
// (The emulation is built with FMA contraction, as nvcc compiles, so this fails there too.)
void expect_zero(const char* what, dk::DType dt, const Vec& got) {
  for (double v : got)
    if (v != 0.0) {
      ++failures;
      std::printf("FAIL %-24s %-8s one-pixel map: %.3g instead of exactly 0\n", what, dtype_name(dt), v);
      return;
    }
}

void check_one_pixel_map_has_zero_gradients() {
  const dk::MapShape shape{1, 1, 1, 1};
  const dk::DType f32 = dk::DType::kFloat32;
  for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16}) {
    Device dev;
    Vec t{3.5}, img{0.5}, emb{0.25, -1.0, 2.0}, gz{0.75, -0.5}, gf{1.0, -2.0, 0.5}, gphi{1.5}, gmask{-0.75};
    void *d_t = dev.upload(dt, t), *d_i = dev.upload(dt, img), *d_e = dev.upload(dt, emb);
    void *d_gz = dev.upload(dt, gz), *d_gf = dev.upload(dt, gf), *d_gphi = dev.upload(dt, gphi);
    void* d_gmask = dev.upload(dt, gmask);
    const dk::Logits logits{d_t, dk::nchw_strides(1, 1), 1.3f, nullptr};
    const dk::FusionInputs fusion{1, d_i, dk::nchw_strides(1, 1), 1, d_e, dk::nchw_strides(3, 1), 3};  // F1
    const dk::Strides fs = dk::nchw_strides(3, 1);
    auto* stats = static_cast<float*>(dev.poisoned(f32, 2));
    auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
    void *d_z = dev.poisoned(dt, 2), *d_f = dev.poisoned(dt, 3), *d_m = dev.poisoned(dt, 1);
    CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws, nullptr));
    void *d_gt = dev.poisoned(dt, 1), *d_gi = dev.poisoned(dt, 1), *d_ge = dev.poisoned(dt, 3);
    auto* gbeta = static_cast<float*>(dev.poisoned(f32, 1));
    auto* bws = static_cast<float*>(dev.poisoned(f32, dk::head_backward_workspace_floats(shape)));
    CHECK_CUDA(dk::head_backward(dt, shape, logits, stats, false, d_gz, d_gf, fs, d_m, fusion, d_gt, gbeta, d_gi,
                                 dk::nchw_strides(1, 1), d_ge, dk::nchw_strides(3, 1), bws, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    expect_zero("1px head grad_logits", dt, download(dt, d_gt, 1));
    expect_zero("1px head grad_beta", f32, download(f32, gbeta, 1));
    const dk::PhiGrad per_map{d_gphi, true, false, dk::nchw_strides(1, 1)};
    CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, false, per_map, nullptr, d_gt, gbeta, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    expect_zero("1px softmax grad", dt, download(dt, d_gt, 1));
    expect_zero("1px softmax grad_beta", f32, download(f32, gbeta, 1));
    const dk::PhiGrad per_batch{d_gmask, false, false, dk::Strides{0, 0, 0}};
    CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, false, per_batch, d_gz, d_gt, gbeta, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    expect_zero("1px attention grad", dt, download(dt, d_gt, 1));
    expect_zero("1px attention grad_beta", f32, download(f32, gbeta, 1));
  }
}

// -inf logits get zero probability and a NaN makes its map's outputs NaN (and its batch element's mask), on a
// whole-tile shape (the ring kernels' with DECAFA_CUDA_MAPS=ring, the run kernels' otherwise): b = 0 has maps
// with -inf pixels (one map all -inf but one pixel: Phi one-hot there), b = 1 a NaN in map 0.
void check_special_values() {
  const Case k{2, 3, 16, 32, 1, 2, 2, 0.8f, false, false, false, false, true};
  const int hw = k.h * k.w;
  const dk::MapShape shape{k.b, k.l, k.h, k.w};
  const dk::DType f32 = dk::DType::kFloat32;
  std::mt19937 rng(77);
  for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16}) {
    Device dev;
    Vec t = random_vec(size_t(k.b) * k.l * hw, rng, 2.0), img = random_vec(size_t(k.b) * hw, rng, 1.0);
    Vec emb = random_vec(size_t(k.b) * k.c * hw, rng, 1.0), gz = random_vec(size_t(k.b) * k.l * 2, rng, 1.0);
    for (int p = 0; p < hw; p += 5) t[p] = -INFINITY;           // (0, 0): every fifth pixel
    for (int p = 0; p < hw; ++p) t[hw + p] = p == 77 ? 1.0 : -INFINITY;  // (0, 1): one-hot at pixel 77
    t[size_t(k.l) * hw + 123] = NAN;                              // (1, 0)
    void *d_t = upload_as(dev, dt, t, k.b, k.l, hw, false), *d_i = dev.upload(dt, img), *d_e = dev.upload(dt, emb);
    void* d_gz = dev.upload(dt, gz);
    const dk::Logits logits{d_t, dk::nchw_strides(k.l, hw), k.beta, nullptr};
    const dk::FusionInputs fusion{k.mode, d_i, dk::nchw_strides(1, hw), 1, d_e, dk::nchw_strides(k.c, hw), k.c};
    const dk::Strides fs = dk::nchw_strides(1, hw);  // F2 = I * M
    auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * k.b * k.l));
    auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
    void *d_z = dev.poisoned(dt, 2 * k.b * k.l), *d_f = dev.poisoned(dt, size_t(k.b) * hw);
    void* d_m = dev.poisoned(dt, size_t(k.b) * hw);
#ifdef DECAFA_EMULATION
    const unsigned long long ring_before = emu::traffic()["maps_forward_ring"].launches;
#endif
    CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws, nullptr));
#ifdef DECAFA_EMULATION
    const char* maps_env = std::getenv("DECAFA_CUDA_MAPS");
    if ((maps_env != nullptr && std::string(maps_env) == "ring") !=
        (emu::traffic()["maps_forward_ring"].launches > ring_before)) {
      ++failures;
      std::printf("FAIL special values: the ring forward ran or not against DECAFA_CUDA_MAPS\n");
    }
#endif
    void* d_gt = dev.poisoned(dt, t.size());
    auto* gbeta = static_cast<float*>(dev.poisoned(f32, k.b * k.l));
    auto* bws = static_cast<float*>(dev.poisoned(f32, dk::head_backward_workspace_floats(shape)));
    CHECK_CUDA(dk::head_backward(dt, shape, logits, stats, false, d_gz, nullptr, fs, d_m, fusion, d_gt, gbeta, d_i,
                                 dk::nchw_strides(1, hw), d_e, dk::nchw_strides(k.c, hw), bws, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const Vec z = download(dt, d_z, 2 * k.b * k.l), m = download(dt, d_m, size_t(k.b) * hw);
    const Vec gt = download(dt, d_gt, t.size());
    // b = 0 against the reference (which gives -inf pixels exp(-inf) = 0)
    Case k0 = k;
    k0.b = 1;
    Vec t0(t.begin(), t.begin() + size_t(k.l) * hw);
    const Forward ref = reference_forward(k0, t0, {});
    expect_close("special z (b=0)", k0, dt, Vec(z.begin(), z.begin() + 2 * k.l), ref.z);
    expect_close("special mask (b=0)", k0, dt, Vec(m.begin(), m.begin() + hw), ref.mask);
    const MapGrads g0 = reference_map_backward(k0, ref, t0, {}, false, Vec(gz.begin(), gz.begin() + 2 * k.l));
    expect_close("special grad_logits (b=0)", k0, dt, Vec(gt.begin(), gt.begin() + size_t(k.l) * hw), g0.gt);
    bool ok = z[2] == 77 % k.w && z[3] == 77 / k.w;  // the one-hot map's z exactly at its pixel
    for (int p = 0; p < hw; p += 5) ok = ok && gt[p] == 0.0;  // zero probability: zero gradient
    // b = 1: map 0's stats and z NaN, and the mask of b = 1 everywhere; maps 1, 2 finite
    const Vec st = download(f32, stats, 2 * k.b * k.l);
    ok = ok && std::isnan(st[2 * k.l + 1]) && std::isnan(z[2 * k.l]) && std::isnan(z[2 * k.l + 1]);
    ok = ok && std::isfinite(z[2 * k.l + 2]) && std::isfinite(z[2 * k.l + 5]);
    for (int p = 0; p < hw; ++p) ok = ok && std::isnan(m[hw + p]) && std::isfinite(m[p]);
    if (!ok) {
      ++failures;
      std::printf("FAIL special values (-inf, NaN) %-8s\n", dtype_name(dt));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch of the pixel kernel (set_programmatic_launch): the same bits as without it
// (on a GPU of sm_90 or later the launch overlaps the per-map kernel's tail; before sm_90 and in the
// emulation it is the ordinary launch, so there this checks the switch and its plumbing)
// ------------------------------------------------------------------------------------------------
void check_programmatic_launch() {
  const dk::MapShape shape{2, 5, 16, 32};
  const int hw = shape.height * shape.width, C = 3;
  const dk::FusionLayout lay = dk::fusion_layout(5, 1, C);
  const dk::DType f32 = dk::DType::kFloat32;
  std::mt19937 rng(31);
  for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kBFloat16}) {
    Vec t = random_vec(size_t(shape.batch) * shape.maps * hw, rng, 2.0), img = random_vec(size_t(2) * hw, rng, 1.0);
    Vec emb = random_vec(size_t(2) * C * hw, rng, 1.0);
    std::vector<Vec> results[2];
    for (int on = 0; on < 2; ++on) {
      Device dev;
      void *d_t = dev.upload(dt, t), *d_i = dev.upload(dt, img), *d_e = dev.upload(dt, emb);
      const dk::Logits logits{d_t, dk::nchw_strides(shape.maps, hw), 0.9f, nullptr};
      const dk::FusionInputs fusion{5, d_i, dk::nchw_strides(1, hw), 1, d_e, dk::nchw_strides(C, hw), C};
      const dk::Strides fs = dk::nchw_strides(lay.channels, hw);
      auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * shape.batch * shape.maps));
      auto* ws = static_cast<float*>(dev.poisoned(f32, dk::head_forward_workspace_floats(shape)));
      void *d_z = dev.poisoned(dt, 2 * shape.batch * shape.maps), *d_m = dev.poisoned(dt, size_t(shape.batch) * hw);
      void* d_f = dev.poisoned(dt, size_t(shape.batch) * lay.channels * hw);
      const bool before = dk::set_programmatic_launch(on == 1);
      if (before != false) {
        ++failures;
        std::printf("FAIL programmatic launch: on by default or left on\n");
      }
      CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws, nullptr));
      CHECK_CUDA(cudaDeviceSynchronize());
      dk::set_programmatic_launch(false);
      results[on] = {download(f32, stats, 2 * shape.batch * shape.maps), download(dt, d_z, 2 * shape.batch * shape.maps),
                     download(dt, d_m, size_t(shape.batch) * hw),
                     download(dt, d_f, size_t(shape.batch) * lay.channels * hw)};
    }
    if (results[0] != results[1]) {
      ++failures;
      std::printf("FAIL programmatic launch %-8s: outputs differ from the ordinary launch\n", dtype_name(dt));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Channel groups of the forward's pixel kernel (set_pixel_split): at small batches pixels_forward splits the
// fusion channels across CTAs; each group needs its tile's M, summed from the partial masks in every group or
// once by pixels_mask (float32 over the first plane of the workspace). Same bits at any number of groups, runs
// of maps and either way of getting M; whole and partial pixel tiles (FULL true / false), NCHW and channels_last
// E, float32 and bfloat16; head_forward (M, F), fuse_forward (a given mask) and M alone.
// ------------------------------------------------------------------------------------------------
void check_pixel_split() {
  struct Shape {
    Case k;
    const char* what;
  };
  // b, l, h, w, ci, c, mode, beta, beta_map, normalized, logits_cl, embed_cl, all_dtypes
  const Shape shapes[] = {
      {{1, 6, 16, 16, 1, 8, 5, 0.9f, false, false, false, false, true}, "whole tiles (float32), partial (16-bit)"},
      {{2, 5, 12, 20, 1, 6, 4, 1.1f, false, false, false, false, true}, "partial tiles"},
      {{1, 4, 32, 32, 3, 16, 5, 0.8f, false, false, false, false, true}, "whole tiles, Ci = 3"},
      {{1, 4, 8, 16, 1, 16, 5, 0.8f, false, false, false, true, true}, "channels_last E"},
      {{2, 3, 5, 7, 2, 3, 5, 1.0f, false, false, false, false, true}, "odd H*W (scalar)"},
      // the ring covers 16 x 32 (DECAFA_CUDA_MAPS=ring): over 5 SMs a CTA's range spans both batch elements, so
      // batch element 1's first plane is that CTA's second one
      {{2, 5, 16, 32, 1, 8, 5, 0.9f, false, false, false, false, true}, "ring ranges across batch elements"},
  };
  const int groups[] = {1, 2, 3, 8};
  const int runs[] = {1, 2, 5};
  const dk::DType f32 = dk::DType::kFloat32;
  std::mt19937 rng(2024);
  for (const Shape& sh : shapes) {
    const Case& k = sh.k;
    const int hw = k.h * k.w;
    const dk::MapShape shape{k.b, k.l, k.h, k.w};
    const dk::FusionLayout lay = dk::fusion_layout(k.mode, k.ci, k.c);
    const size_t n_t = size_t(k.b) * k.l * hw, n_m = size_t(k.b) * hw, n_f = size_t(k.b) * lay.channels * hw;
    for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kBFloat16}) {
      Vec t = random_vec(n_t, rng, 2.0), img = random_vec(size_t(k.b) * k.ci * hw, rng, 1.0);
      Vec emb = random_vec(size_t(k.b) * k.c * hw, rng, 1.0), xm = random_vec(n_m, rng, 1.0);
      std::vector<Vec> first, same_runs;
      bool reduced_seen = false, reread_seen = false;
      for (int r : runs)
        for (int g : groups) {
          const int saved_runs = dk::set_map_runs(r), saved_groups = dk::set_pixel_split(g);
          Device dev;
          Vec tt = t, ii = img, ee = emb, mm = xm;
          void* d_t = upload_as(dev, dt, tt, k.b, k.l, hw, false);
          void* d_i = upload_as(dev, dt, ii, k.b, k.ci, hw, k.embed_cl);
          void* d_e = upload_as(dev, dt, ee, k.b, k.c, hw, k.embed_cl);
          void* d_xm = dev.upload(dt, mm);
          const dk::Logits logits{d_t, dk::nchw_strides(k.l, hw), k.beta, nullptr};
          const dk::FusionInputs fusion{k.mode, d_i, strides(k.ci, hw, k.embed_cl), k.ci,
                                        d_e,    strides(k.c, hw, k.embed_cl),  k.c};
          const dk::Strides fs = strides(lay.channels, hw, k.embed_cl);
          auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * size_t(k.b) * k.l));
          auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
          void *d_z = dev.poisoned(dt, 2 * size_t(k.b) * k.l), *d_m = dev.poisoned(dt, n_m);
          void *d_f = dev.poisoned(dt, n_f), *d_f2 = dev.poisoned(dt, n_f), *d_m2 = dev.poisoned(dt, n_m);
#ifdef DECAFA_EMULATION
          const unsigned long long ring0 = emu::traffic()["maps_forward_ring"].launches;
          const unsigned long long mask0 = emu::traffic()["pixels_mask"].launches;
#endif
          CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws,
                                      nullptr));
#ifdef DECAFA_EMULATION
          // the run kernels write one plane per run (set_map_runs(r): runs of ceil(L / r) maps): pixels_mask sums
          // them first exactly where the launcher's byte count says so; the ring's planes follow its own ranges
          const bool ring = emu::traffic()["maps_forward_ring"].launches > ring0;
          const bool reduced = emu::traffic()["pixels_mask"].launches > mask0;
          (reduced ? reduced_seen : reread_seen) = true;
          const int rr = std::min(r, k.l), planes = (k.l + (k.l + rr - 1) / rr - 1) / ((k.l + rr - 1) / rr);
          if (!ring && reduced != (g > 1 && g * planes > planes + 1 + g)) {
            ++failures;
            std::printf("FAIL pixel split %s %-8s runs %d groups %d: pixels_mask %s\n", sh.what, dtype_name(dt), r,
                        g, reduced ? "ran" : "did not run");
          }
#endif
          CHECK_CUDA(dk::fuse_forward(dt, shape, d_xm, fusion, d_f2, fs, nullptr));
          CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, nullptr, nullptr, d_m2, nullptr, nullptr, fs, ws,
                                      nullptr));
          CHECK_CUDA(cudaDeviceSynchronize());
          std::vector<Vec> out = {download(dt, d_m, n_m), download(dt, d_f, n_f), download(dt, d_f2, n_f),
                                  download(dt, d_m2, n_m)};
          dk::set_map_runs(saved_runs);
          dk::set_pixel_split(saved_groups);
          if (first.empty()) {  // against the reference once
            const Forward ref = reference_forward(k, tt, {});
            expect_close("split mask", k, dt, out[0], ref.mask);
            expect_close("split fused", k, dt, from_layout(out[1], k.b, lay.channels, hw, k.embed_cl),
                         reference_fusion(k, ii, ee, ref.mask, Vec(n_f, 0.0)).fused);
            expect_close("split fuse", k, dt, from_layout(out[2], k.b, lay.channels, hw, k.embed_cl),
                         reference_fusion(k, ii, ee, mm, Vec(n_f, 0.0)).fused);
            first = out;
          }
          // M and F depend on the runs only through the order of the partial masks' sum: bit for bit against
          // one group at the same runs; the given mask's fusion against the first configuration; M alone
          // (pixels_mask) against M of the fused forward
          if (g == groups[0]) same_runs = out;
          const bool ok = out[0] == same_runs[0] && out[1] == same_runs[1] && out[2] == first[2] && out[3] == out[0];
          if (!ok) {
            ++failures;
            std::printf("FAIL pixel split %s %-8s runs %d groups %d: not bitwise equal (mask %d fused %d fuse %d "
                        "mask alone %d)\n", sh.what, dtype_name(dt), r, g, out[0] == same_runs[0],
                        out[1] == same_runs[1], out[2] == first[2], out[3] == out[0]);
          }
        }
#ifdef DECAFA_EMULATION
      // both ways of getting M ran (the run kernels' planes; the ring's runs are its own)
      const char* maps_env = std::getenv("DECAFA_CUDA_MAPS");
      if (!(maps_env != nullptr && std::string(maps_env) == "ring") && !(reduced_seen && reread_seen)) {
        ++failures;
        std::printf("FAIL pixel split %s %-8s: pixels_mask ran %s\n", sh.what, dtype_name(dt),
                    reduced_seen ? "in every configuration" : "in none");
      }
#endif
    }
  }
}

// ------------------------------------------------------------------------------------------------
// beta * T beyond float32: the exact limit of the softmax (overflow maps)
// ------------------------------------------------------------------------------------------------
// Every per-map output of one map: stats (max, sum), z, Phi, grad T and grad beta (per-batch and per-map
// gradient of Phi).
struct MapResults {
  Vec stats, z, phi, mask, gt, gbeta, gt2, gbeta2;
};

// Runs attention (stats, z, M), softmax (Phi), the per-batch backward (float32 mask gradient and grad z: the
// ring's) and the per-map backward on T in the given layout; coordinates normalised (with pixel coordinates,
// grad z moves g_s to tens, and c g_s of a tie map beyond float32 when c ~ 1e37).
MapResults overflow_run(dk::DType dt, const dk::MapShape& shape, bool cl, Vec& t, float beta, Vec& beta_map,
                        Vec& gz, Vec& gmask, Vec& gphi) {
  const int hw = shape.height * shape.width;
  const size_t maps = size_t(shape.batch) * shape.maps, n_t = maps * hw, n_m = size_t(shape.batch) * hw;
  const dk::DType f32 = dk::DType::kFloat32;
  Device dev;
  void* d_t = upload_as(dev, dt, t, shape.batch, shape.maps, hw, cl);
  void *d_gz = dev.upload(dt, gz), *d_gmask = dev.upload_f32(gmask);
  void* d_gphi = upload_as(dev, dt, gphi, shape.batch, shape.maps, hw, cl);
  auto* d_beta = static_cast<float*>(dev.upload_f32(beta_map));
  const dk::Logits logits{d_t, strides(shape.maps, hw, cl), beta, beta_map.empty() ? nullptr : d_beta};
  auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * maps));
  auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
  void *d_z = dev.poisoned(dt, 2 * maps), *d_m = dev.poisoned(dt, n_m), *d_phi = dev.poisoned(dt, n_t);
  void *d_gt = dev.poisoned(dt, n_t), *d_gt2 = dev.poisoned(dt, n_t);
  auto *gbeta = static_cast<float*>(dev.poisoned(f32, maps)), *gbeta2 = static_cast<float*>(dev.poisoned(f32, maps));
  CHECK_CUDA(dk::head_forward(dt, shape, logits, true, stats, nullptr, d_phi, nullptr, nullptr, nullptr,
                              dk::Strides{}, nullptr, nullptr));
  CHECK_CUDA(dk::head_forward(dt, shape, logits, true, stats, d_z, nullptr, d_m, nullptr, nullptr, dk::Strides{},
                              ws, nullptr));
  const dk::PhiGrad per_batch{d_gmask, false, true, dk::Strides{0, 0, 0}};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, true, per_batch, d_gz, d_gt, gbeta, nullptr));
  const dk::PhiGrad per_map{d_gphi, true, false, strides(shape.maps, hw, cl)};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, true, per_map, nullptr, d_gt2, gbeta2, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  return {download(f32, stats, 2 * maps), download(dt, d_z, 2 * maps),  download(dt, d_phi, n_t),
          download(dt, d_m, n_m),         download(dt, d_gt, n_t),     download(f32, gbeta, maps),
          download(dt, d_gt2, n_t),       download(f32, gbeta2, maps)};
}

// Elements [m * n, (m + 1) * n) of v.
Vec slice(const Vec& v, size_t m, size_t n) { return Vec(v.begin() + m * n, v.begin() + (m + 1) * n); }

void overflow_fail(const char* what, dk::DType dt, const dk::MapShape& sh, bool cl, const char* beta, size_t map) {
  ++failures;
  std::printf("FAIL overflow %-28s %-8s B=%d L=%d H=%d W=%d cl=%d beta=%s map %zu\n", what, dtype_name(dt), sh.batch,
              sh.maps, sh.height, sh.width, cl, beta, map);
}

// Maps of batch element 0: (0) large logits, beta * T overflows, one maximum; (1) ordinary logits (nothing
// overflows: the same bits as when its neighbour is ordinary too); (2) large logits with two equal extremes
// (Phi 1/2 each); (3) large logits, an overflow map for the other sign of beta (T = -T of map 0). Batch element
// 1: (0) large logits and a NaN, (1) large logits and a +inf one, (2) all -inf but one large pixel (the limit
// for beta > 0, NaN for beta < 0), (3) ordinary. Against the double-precision reference (beta * T does not overflow in
// double: it is the limit up to rounding), and exactly: stats (+-inf, k), Phi 1 / k, no-tie gradients 0.
void check_overflow() {
  const float fmax = 3.4028234663852886e38f;
  struct Shape {
    dk::MapShape shape;
    bool cl;
  };
  // whole tiles (the ring with DECAFA_CUDA_MAPS=ring, the on-chip vector path else), channels_last (map pairs),
  // a map over the on-chip capacity (the streamed kernels)
  const Shape shapes[] = {{{2, 4, 16, 32}, false}, {{2, 4, 6, 10}, true}, {{2, 4, 130, 130}, false}};
  std::mt19937 rng(2026);
#ifdef DECAFA_EMULATION
  const unsigned long long ring_fwd = emu::traffic()["maps_forward_ring"].launches;
  const unsigned long long ring_bwd = emu::traffic()["maps_backward_ring"].launches;
#endif
  for (const Shape& sh : shapes) {
    const dk::MapShape& shape = sh.shape;
    const int hw = shape.height * shape.width, L = shape.maps;
    const size_t maps = size_t(shape.batch) * L, n_t = maps * hw;
    for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16}) {
      if (hw > 16384 && dt != dk::DType::kFloat32) continue;  // the streamed kernels: float32 only (time)
      const bool half = dt == dk::DType::kFloat16;
      const double big = half ? 1e4 : 1e37;    // large logits in the type (float16 ends at 65504)
      const float b_big = half ? 1e36f : 100.f;  // a beta that overflows with them, not with ordinary logits
      struct BetaCase {
        const char* name;
        float beta;
        bool per_map;
      };
      const BetaCase betas[] = {{"+big", b_big, false}, {"-big", -b_big, false}, {"FLT_MAX", fmax, false},
                                {"per-map", 0.f, true}};
      for (const BetaCase& bc : betas) {
        Vec t(n_t), ordinary_t;
        auto big_map = [&](size_t m) {
          Vec r = random_vec(hw, rng, big);
          for (int p = 0; p < hw; ++p) t[m * hw + p] = r[p];
        };
        // ordinary maps: |beta T| of a few units (float16, whose smallest normal value times these betas is
        // already large: zeros, a uniform Phi); large finite |beta T| has its own check (check_large_logits)
        auto small_map = [&](size_t m, double scale) {
          Vec r = random_vec(hw, rng, scale);
          for (int p = 0; p < hw; ++p) t[m * hw + p] = half ? 0.0 : std::max(-3 * scale, std::min(3 * scale, r[p]));
        };
        const double small = bc.beta == fmax ? 1e-38 * 3 : 0.02;
        big_map(0);
        if (!half) t[hw / 4] = 3.3e38;  // near the end of float32 and bfloat16
        small_map(1, small);
        big_map(2);
        for (int p = 0; p < hw; ++p) t[3 * hw + p] = -t[p];
        // map 2: two equal extremes (the largest and the smallest value, both twice: whatever beta's sign)
        {
          double* m2 = &t[2 * hw];
          const int hi = int(std::max_element(m2, m2 + hw) - m2), lo = int(std::min_element(m2, m2 + hw) - m2);
          const int hi2 = (hi + hw / 2 + 1) % hw == lo ? (hi + 1) % hw : (hi + hw / 2 + 1) % hw;
          int lo2 = (lo + hw / 3 + 2) % hw;
          while (lo2 == hi || lo2 == hi2 || lo2 == lo) lo2 = (lo2 + 1) % hw;
          m2[hi2] = m2[hi];
          m2[lo2] = m2[lo];
        }
        big_map(size_t(L));
        t[size_t(L) * hw + hw / 3] = NAN;
        big_map(size_t(L) + 1);
        t[size_t(L + 1) * hw + hw / 2] = INFINITY;
        for (int p = 0; p < hw; ++p) t[size_t(L + 2) * hw + p] = -INFINITY;
        t[size_t(L + 2) * hw + 5] = -big;  // the only finite logit; its beta * T overflows to -inf for beta > 0
        small_map(size_t(L) + 3, small);
        Vec beta_map;
        if (bc.per_map)
          for (size_t m = 0; m < maps; ++m) beta_map.push_back((m % 2 ? -1.0 : 1.0) * b_big);
        Vec gz = random_vec(2 * maps, rng, 1.0), gmask = random_vec(size_t(shape.batch) * hw, rng, 1.0);
        Vec gphi = random_vec(n_t, rng, 1.0);
        const MapResults got = overflow_run(dt, shape, sh.cl, t, bc.beta, beta_map, gz, gmask, gphi);
        // the same with the overflow maps of batch element 0 made ordinary: map 1's outputs must not change
        Vec t_ord = t;
        for (size_t m : {0, 2, 3})
          for (int p = 0; p < hw; ++p) t_ord[m * hw + p] = half ? 0.0 : t[m * hw + p] / big * small;
        const MapResults ord = overflow_run(dt, shape, sh.cl, t_ord, bc.beta, beta_map, gz, gmask, gphi);
        const Vec* got_maps[] = {&got.stats, &got.z, &got.phi, &got.gt, &got.gbeta, &got.gt2, &got.gbeta2};
        const Vec* ord_maps[] = {&ord.stats, &ord.z, &ord.phi, &ord.gt, &ord.gbeta, &ord.gt2, &ord.gbeta2};
        const size_t per_map_n[] = {2, 2, size_t(hw), size_t(hw), 1, size_t(hw), 1};
        for (int o = 0; o < 7; ++o)
          if (slice(*got_maps[o], 1, per_map_n[o]) != slice(*ord_maps[o], 1, per_map_n[o]))
            overflow_fail("ordinary map changed", dt, shape, sh.cl, bc.name, 1);

        // the reference (t as rounded to dt by the upload)
        Case k{shape.batch, L, shape.height, shape.width, 1, 1, 1, bc.beta, bc.per_map, true, false, false, true};
        const Forward ref = reference_forward(k, t, beta_map);
        Vec gmask_f32 = gmask;
        for (auto& x : gmask_f32) x = static_cast<float>(x);
        const MapGrads rb = reference_map_backward(k, ref, t, gmask_f32, false, gz);
        const MapGrads rs = reference_map_backward(k, ref, t, gphi, true, {});
        const double tol = dt == dk::DType::kFloat32 ? 2e-4 : dt == dk::DType::kFloat16 ? 4e-3 : 2e-2;
        for (size_t m = 0; m < maps; ++m) {
          // c not finite in the direction of beta (a +inf logit with beta < 0 just gets zero probability)
          const bool beta_neg = (bc.per_map ? beta_map[m] : bc.beta) < 0;
          const bool nan_map = m == size_t(L) || (m == size_t(L) + 1 && !beta_neg) || (m == size_t(L) + 2 && beta_neg);
          const bool over = m != 1 && m != size_t(L) + 3;
          auto all = [&](const Vec& v, size_t n, auto pred) {
            for (size_t i = m * n; i < (m + 1) * n; ++i)
              if (!pred(v[i])) return false;
            return true;
          };
          auto isnan_ = [](double x) { return std::isnan(x); };
          if (nan_map) {
            if (!all(got.phi, hw, isnan_) || !all(got.z, 2, isnan_) || !all(got.gt2, hw, isnan_))
              overflow_fail("NaN map not all NaN", dt, shape, sh.cl, bc.name, m);
            continue;
          }
          // Phi and z against the reference; Phi exactly 1 / k on an overflow map
          // (grad T = beta g_s may be beyond the type: float16 with beta = 1e36, float32 with FLT_MAX and ties;
          // there the value must be the infinity of its sign)
          auto close = [&](const Vec& g, const Vec& w, size_t n, double scale) {
            for (size_t i = m * n; i < (m + 1) * n; ++i) {
              const double wr = round_to(dt, static_cast<float>(w[i]));
              if (std::isinf(wr) ? g[i] != wr : !(std::fabs(g[i] - w[i]) <= tol * scale)) return false;
            }
            return true;
          };
          auto maxabs = [&](const Vec& w, size_t n) {
            double r = 1e-30;
            for (size_t i = m * n; i < (m + 1) * n; ++i)
              if (!std::isinf(round_to(dt, static_cast<float>(w[i])))) r = std::max(r, std::fabs(w[i]));
            return r;
          };
          if (!close(got.phi, ref.phi, hw, 1.0)) overflow_fail("phi", dt, shape, sh.cl, bc.name, m);
          if (!close(got.z, ref.z, 2, 1.0)) overflow_fail("z", dt, shape, sh.cl, bc.name, m);
          if (!close(got.gt, rb.gt, hw, maxabs(rb.gt, hw))) overflow_fail("grad T (mask)", dt, shape, sh.cl, bc.name, m);
          if (!close(got.gt2, rs.gt, hw, maxabs(rs.gt, hw)))
            overflow_fail("grad T (per map)", dt, shape, sh.cl, bc.name, m);
          // grad beta = sum T g_s against the scale of its terms (with ties it is c (S - S): rounding only)
          auto gb_scale = [&](const MapGrads& r) {
            double sc = 1e-30;
            for (int p = 0; p < hw; ++p) sc += std::fabs(t[m * hw + p] * r.gt[m * hw + p] / ref.beta[m]);
            return sc;
          };
          const bool inf_logits = m == size_t(L) + 1 || m == size_t(L) + 2;  // grad beta: inf * 0 = NaN, as today
          if (!inf_logits && !(std::fabs(got.gbeta[m] - rb.gbeta[m]) <= tol * gb_scale(rb))) {
            overflow_fail("grad beta (mask)", dt, shape, sh.cl, bc.name, m);
            std::printf("  got %.9g want %.9g scale %.9g\n", got.gbeta[m], rb.gbeta[m], gb_scale(rb));
          }
          if (!inf_logits && !(std::fabs(got.gbeta2[m] - rs.gbeta[m]) <= tol * gb_scale(rs)))
            overflow_fail("grad beta (per map)", dt, shape, sh.cl, bc.name, m);
          if (!over) continue;
          const double smax = got.stats[2 * m], k = got.stats[2 * m + 1];
          // the pixels at c (map 2 has two by construction; rounding to 16 bits may tie others)
          double c = beta_neg ? INFINITY : -INFINITY;
          for (int p = 0; p < hw; ++p) c = beta_neg ? std::min(c, t[m * hw + p]) : std::max(c, t[m * hw + p]);
          const int ties = int(std::count(t.begin() + m * hw, t.begin() + (m + 1) * hw, c));
          if (m == 2 && ties < 2) overflow_fail("test: no tie", dt, shape, sh.cl, bc.name, m);
          if (!(std::isinf(smax) && k == ties)) overflow_fail("stats (+-inf, k)", dt, shape, sh.cl, bc.name, m);
          int hits = 0;
          for (int p = 0; p < hw; ++p) {
            const double ph = got.phi[m * hw + p];
            if (ph != 0.0 && ph != 1.0 / ties) hits = -1000;
            if (ph != 0.0) ++hits;
          }
          if (hits != ties) overflow_fail("phi not exactly 1/k", dt, shape, sh.cl, bc.name, m);
          if (ties == 1 && (!all(got.gt, hw, [](double x) { return x == 0.0; }) ||
                            !all(got.gt2, hw, [](double x) { return x == 0.0; }) ||
                            (!inf_logits && (got.gbeta[m] != 0.0 || got.gbeta2[m] != 0.0))))
            overflow_fail("gradient not exactly 0", dt, shape, sh.cl, bc.name, m);
        }
        // the mask: batch element 0 against the reference, 1 (NaN maps) all NaN
        Vec m0(got.mask.begin(), got.mask.begin() + hw), r0(ref.mask.begin(), ref.mask.begin() + hw);
        for (size_t i = 0; i < size_t(hw); ++i)
          if (!(std::fabs(m0[i] - r0[i]) <= tol * 4)) {
            overflow_fail("mask", dt, shape, sh.cl, bc.name, 0);
            break;
          }
        for (int p = 0; p < hw; ++p)
          if (!std::isnan(got.mask[hw + p])) {
            overflow_fail("mask of a NaN batch element", dt, shape, sh.cl, bc.name, size_t(L));
            break;
          }
      }
    }
  }
#ifdef DECAFA_EMULATION
  // with DECAFA_CUDA_MAPS=ring the whole-tile shape ran the ring forward and backward
  const char* maps_env = std::getenv("DECAFA_CUDA_MAPS");
  const bool ring = maps_env != nullptr && std::string(maps_env) == "ring";
  if (ring != (emu::traffic()["maps_forward_ring"].launches > ring_fwd) ||
      ring != (emu::traffic()["maps_backward_ring"].launches > ring_bwd)) {
    ++failures;
    std::printf("FAIL overflow: the ring kernels ran or not against DECAFA_CUDA_MAPS\n");
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// channels_last T: pairs of maps per access against one value per access
// ------------------------------------------------------------------------------------------------
using WidthCount = std::map<size_t, unsigned long long>;  // bytes per access -> accesses (emulation)

// "width:accesses,..." of a kernel's loads or stores.
std::string widths(const std::map<size_t, unsigned long long>& by_width) {
  std::string out;
  for (auto& [bytes, n] : by_width) out += (out.empty() ? "" : ",") + std::to_string(bytes) + ":" + std::to_string(n);
  return out.empty() ? "-" : out;
}

// The load widths of the two on-chip per-map kernels over one map_outputs call.
struct MapLoadWidths {
  WidthCount forward, backward;
};

// The per-map outputs (stats, z, M, Phi, and grad T / grad beta from a per-batch and a per-map gradient) of
// channels_last T uploaded `shift` elements past an aligned address: shift 0 lets the on-chip kernels read
// a pair of maps per access, shift 1 leaves one scalar per value. Under the emulation `widths` gets the load
// widths of the two on-chip kernels.
std::vector<Vec> map_outputs(dk::DType dt, const dk::MapShape& shape, Vec& t, Vec& gz, Vec& gmask, Vec& gphi,
                             int shift, MapLoadWidths* widths_out) {
  const int hw = shape.height * shape.width;
  const size_t maps = size_t(shape.batch) * shape.maps, n_t = maps * hw, n_m = size_t(shape.batch) * hw;
  const size_t es = dk::dtype_size(dt);
  const dk::DType f32 = dk::DType::kFloat32;
  Device dev;
  void* packed = upload_as(dev, dt, t, shape.batch, shape.maps, hw, true);
  auto* d_t = static_cast<unsigned char*>(dev.alloc((n_t + 1) * es)) + shift * es;
  CHECK_CUDA(cudaMemcpy(d_t, packed, n_t * es, cudaMemcpyDeviceToDevice));
  void *d_gz = dev.upload(dt, gz), *d_gmask = dev.upload(dt, gmask);
  void* d_gphi = upload_as(dev, dt, gphi, shape.batch, shape.maps, hw, true);
  const dk::Logits logits{d_t, dk::nhwc_strides(shape.maps, hw), 0.9f, nullptr};
  auto* stats = static_cast<float*>(dev.poisoned(f32, 2 * maps));
  auto* ws = static_cast<float*>(dev.poisoned(f32, std::max<size_t>(1, dk::head_forward_workspace_floats(shape))));
  void *d_z = dev.poisoned(dt, 2 * maps), *d_m = dev.poisoned(dt, n_m), *d_phi = dev.poisoned(dt, n_t);
  void *d_gt = dev.poisoned(dt, n_t), *d_gt2 = dev.poisoned(dt, n_t);
  auto *gbeta = static_cast<float*>(dev.poisoned(f32, maps)), *gbeta2 = static_cast<float*>(dev.poisoned(f32, maps));
#ifdef DECAFA_EMULATION
  emu::traffic().clear();
#endif
  CHECK_CUDA(dk::head_forward(dt, shape, logits, true, stats, d_z, nullptr, d_m, nullptr, nullptr, dk::Strides{},
                              ws, nullptr));
  CHECK_CUDA(dk::head_forward(dt, shape, logits, true, stats, nullptr, d_phi, nullptr, nullptr, nullptr,
                              dk::Strides{}, nullptr, nullptr));
  const dk::PhiGrad per_batch{d_gmask, false, false, dk::Strides{0, 0, 0}};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, true, per_batch, d_gz, d_gt, gbeta, nullptr));
  const dk::PhiGrad per_map{d_gphi, true, false, dk::nhwc_strides(shape.maps, hw)};
  CHECK_CUDA(dk::maps_backward(dt, shape, logits, stats, true, per_map, nullptr, d_gt2, gbeta2, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
#ifdef DECAFA_EMULATION
  widths_out->forward = emu::traffic()["maps_forward_onchip"].load_widths;
  widths_out->backward = emu::traffic()["maps_backward_onchip"].load_widths;
  emu::traffic().clear();
#else
  (void)widths_out;
#endif
  return {download(f32, stats, 2 * maps), download(dt, d_z, 2 * maps), download(dt, d_m, n_m),
          download(dt, d_phi, n_t),       download(dt, d_gt, n_t),     download(f32, gbeta, maps),
          download(dt, d_gt2, n_t),       download(f32, gbeta2, maps)};
}

// Large |beta T| (2e4 and more, nothing overflowing): every backend's stats, Phi, z and gradients against the
// double reference to 1e-5 (1e-4 for the gradients), which any rounding of beta T, of beta log2 e or of the shift
// that reached them as a map-wide scale would miss: the ring's exp2(T k2 - shift) sums to 2^d0 times the
// contract's sum (d0 = fma(max, k2, -shift), ~1e-3 at these logits), so the ring stores the sum divided by
// 2^d0, and its backward normalises by the sum of its own exponentials; the per-map backward (a run kernel)
// reads the stored sum. beta = +-2 and T on a 1/64 grid make beta T exact in float32 and in double, so the
// reference is the contract itself. (grad beta = sum T g_s cancels ~1e4-sized terms in float32: not compared.)
void check_large_logits() {
  const dk::MapShape shape{2, 3, 16, 32};  // whole tiles: the ring with DECAFA_CUDA_MAPS=ring
  const int hw = shape.height * shape.width;
  const size_t maps = size_t(shape.batch) * shape.maps, n_t = maps * hw;
  std::mt19937 rng(77);
  std::uniform_int_distribution<int> grid(0, 64 * 8);  // T within 8 of its map's base: s spans 16
  struct BetaCase {
    const char* name;
    float beta;
    bool per_map;
  };
  const BetaCase betas[] = {{"+2 (raw max)", 2.f, false}, {"-2", -2.f, false}, {"per-map +-2", 0.f, true}};
  for (const double base : {1e4, 1.3e5}) {
    for (const BetaCase& bc : betas) {
      Vec t(n_t);
      for (size_t m = 0; m < maps; ++m)
        for (int p = 0; p < hw; ++p) t[m * hw + p] = base + 997.0 * m + grid(rng) / 64.0;
      Vec beta_map;
      if (bc.per_map)
        for (size_t m = 0; m < maps; ++m) beta_map.push_back(m % 2 ? -2.0 : 2.0);
      Vec gz = random_vec(2 * maps, rng, 1.0), gmask = random_vec(size_t(shape.batch) * hw, rng, 1.0);
      Vec gphi = random_vec(n_t, rng, 1.0);
      const dk::DType f32 = dk::DType::kFloat32;
      const MapResults got = overflow_run(f32, shape, false, t, bc.beta, beta_map, gz, gmask, gphi);
      const Case k{shape.batch, shape.maps, shape.height, shape.width, 1, 1, 5, bc.beta, bc.per_map, true,
                   false, false, false};
      const Forward ref = reference_forward(k, t, beta_map);
      const MapGrads ag = reference_map_backward(k, ref, t, gmask, false, gz);
      const MapGrads sg = reference_map_backward(k, ref, t, gphi, true, {});
      // per map, relative to the map's largest |value| (at least `floor`: z's coordinates lie in [-1, 1])
      auto expect = [&](const char* what, const Vec& g, const Vec& w, double tol, size_t per, double floor = 0) {
        for (size_t m = 0; m < g.size() / per; ++m) {
          double err = 0, mag = floor;
          for (size_t i = m * per; i < (m + 1) * per; ++i) {
            const double d = std::fabs(g[i] - w[i]);
            err = d == d ? std::max(err, d) : INFINITY;
            mag = std::max(mag, std::fabs(w[i]));
          }
          if (!(err <= tol * mag)) {
            ++failures;
            std::printf("FAIL large logits %-20s beta %-12s |T| ~ %.3g map %zu: error %.3g of %.3g\n", what,
                        bc.name, base, m, err, mag);
            return;
          }
        }
      };
      expect("stats (max, sum)", got.stats, ref.stats, 1e-5, 1);
      expect("Phi", got.phi, ref.phi, 1e-5, size_t(hw));
      expect("z", got.z, ref.z, 1e-5, 2, 1.0);
      expect("mask", got.mask, ref.mask, 1e-5, size_t(hw));
      expect("grad T (mask, z)", got.gt, ag.gt, 1e-4, size_t(hw));
      expect("grad T (per-map Phi)", got.gt2, sg.gt, 1e-4, size_t(hw));
    }
  }
}

// Both paths give the same bits (each map is reduced alone, in the same order, either way), and under the
// emulation the aligned one is seen to load 2-element vectors and the shifted one scalars only. Shapes: runs
// starting at odd maps and ending with a single map (set_map_runs(3) over 8 maps), H*W not a multiple of the
// per-thread pixels, one pixel, and an odd L (odd pixel stride: no pairs, scalar either way).
void check_map_pairs_match_scalar() {
  struct Shape {
    dk::MapShape shape;
    int runs;  // set_map_runs: pairs need runs of two maps or more, whatever the device
  };
  const Shape shapes[] = {{{2, 8, 12, 12}, 3}, {{1, 6, 9, 13}, 1}, {{2, 2, 1, 1}, 1}, {{2, 7, 5, 5}, 1}};
  const char* names[] = {"stats", "z", "mask", "phi", "grad_T (mask)", "grad_beta (mask)", "grad_T (per map)",
                         "grad_beta (per map)"};
  std::mt19937 rng(4321);
  for (const Shape& sh : shapes) {
    const int saved = dk::set_map_runs(sh.runs);
    const dk::MapShape& shape = sh.shape;
    const size_t maps = size_t(shape.batch) * shape.maps, hw = size_t(shape.height) * shape.width;
    for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16}) {
      Vec t = random_vec(maps * hw, rng, 2.0), gz = random_vec(2 * maps, rng, 1.0);
      Vec gmask = random_vec(shape.batch * hw, rng, 1.0), gphi = random_vec(maps * hw, rng, 1.0);
      MapLoadWidths paired_widths, scalar_widths;
      const std::vector<Vec> paired = map_outputs(dt, shape, t, gz, gmask, gphi, 0, &paired_widths);
      const std::vector<Vec> scalar = map_outputs(dt, shape, t, gz, gmask, gphi, 1, &scalar_widths);
      for (size_t i = 0; i < paired.size(); ++i)
        if (paired[i] != scalar[i]) {
          ++failures;
          std::printf("FAIL pairs vs scalar %-20s %-8s B=%d L=%d H=%d W=%d: not bitwise equal\n", names[i],
                      dtype_name(dt), shape.batch, shape.maps, shape.height, shape.width);
        }
#ifdef DECAFA_EMULATION
      // The forward kernel loads nothing but T here: pairs in the aligned run, none in the shifted one. The
      // backward also loads float32 stats (a pair's width in 16-bit types): more of that width when aligned.
      const size_t pair = 2 * dk::dtype_size(dt);
      auto n = [pair](const WidthCount& w) { return w.count(pair) ? w.at(pair) : 0ull; };
      const bool pairs_expected = shape.maps % 2 == 0;
      const bool paired_ok = pairs_expected ? n(paired_widths.forward) > 0 &&
                                                  n(paired_widths.backward) > n(scalar_widths.backward)
                                            : n(paired_widths.forward) == 0;
      if (!paired_ok || n(scalar_widths.forward) != 0) {
        ++failures;
        std::printf("FAIL pairs vs scalar load widths %-8s B=%d L=%d H=%d W=%d\n", dtype_name(dt), shape.batch,
                    shape.maps, shape.height, shape.width);
      }
      std::printf("map pairs %-8s B=%d L=%d H=%d W=%d: forward loads %s / %s, backward loads %s / %s "
                  "(aligned / shifted T)\n", dtype_name(dt), shape.batch, shape.maps, shape.height, shape.width,
                  widths(paired_widths.forward).c_str(), widths(scalar_widths.forward).c_str(),
                  widths(paired_widths.backward).c_str(), widths(scalar_widths.backward).c_str());
#endif
    }
    dk::set_map_runs(saved);
  }
}

// ------------------------------------------------------------------------------------------------
// Traffic at the paper shape
// ------------------------------------------------------------------------------------------------
#ifdef DECAFA_EMULATION
// Bytes per kernel since the last call, printed as
// "traffic <pass> <kernel> <launches> <loaded> <stored> loads <width:accesses,...> stores <width:accesses,...>".
unsigned long long report_traffic(const char* pass) {
  unsigned long long total = 0;
  for (auto& [name, t] : emu::traffic()) {
    if (t.launches == 0) continue;
    std::printf("traffic %s %s %llu %llu %llu loads %s stores %s\n", pass, name.c_str(), t.launches, t.loads,
                t.stores, widths(t.load_widths).c_str(), widths(t.store_widths).c_str());
    total += t.loads + t.stores;
  }
  emu::traffic().clear();
  return total;
}

// The fused head at the paper shape; `cl`: T, I, E, F and the gradients channels_last (else NCHW).
int run_traffic(int batch, bool cl) {
  const int L = 98, H = 128, W = 128, C = 64, CI = 1, MODE = 5;
  const Case k{batch, L, H, W, CI, C, MODE, 1.0f, false, false, cl, cl, true};
  const dk::FusionLayout lay = dk::fusion_layout(MODE, CI, C);
  const int hw = H * W;
  const double b = batch;
  std::mt19937 rng(99);
  for (dk::DType dt : {dk::DType::kFloat32, dk::DType::kBFloat16}) {
    const double e = static_cast<double>(dk::dtype_size(dt));
    const dk::MapShape shape{batch, L, H, W};
    Device dev;
    Vec t = random_vec(size_t(batch) * L * hw, rng, 2.0), img = random_vec(size_t(batch) * CI * hw, rng, 1.0);
    Vec emb = random_vec(size_t(batch) * C * hw, rng, 1.0), gz = random_vec(size_t(batch) * L * 2, rng, 1.0);
    Vec gf = random_vec(size_t(batch) * lay.channels * hw, rng, 1.0);
    void* d_t = upload_as(dev, dt, t, batch, L, hw, cl);
    void *d_i = upload_as(dev, dt, img, batch, CI, hw, cl), *d_e = upload_as(dev, dt, emb, batch, C, hw, cl);
    void *d_gz = dev.upload(dt, gz), *d_gf = upload_as(dev, dt, gf, batch, lay.channels, hw, cl);
    const dk::Logits logits{d_t, strides(L, hw, cl), 1.0f, nullptr};
    const dk::FusionInputs fusion{MODE, d_i, strides(CI, hw, cl), CI, d_e, strides(C, hw, cl), C};
    const dk::Strides fs = strides(lay.channels, hw, cl);
    auto* stats = static_cast<float*>(dev.poisoned(dk::DType::kFloat32, size_t(batch) * L * 2));
    auto* ws = static_cast<float*>(dev.poisoned(dk::DType::kFloat32, dk::head_forward_workspace_floats(shape)));
    void *d_z = dev.poisoned(dt, size_t(batch) * L * 2), *d_f = dev.poisoned(dt, size_t(batch) * lay.channels * hw);
    void* d_m = dev.poisoned(dt, size_t(batch) * hw);
    emu::traffic().clear();
    CHECK_CUDA(dk::head_forward(dt, shape, logits, false, stats, d_z, nullptr, d_m, &fusion, d_f, fs, ws, nullptr));
    std::printf("traffic dtype %s batch %d layout %s\n", dtype_name(dt), batch, cl ? "channels_last" : "nchw");
    const double fwd = static_cast<double>(report_traffic("forward"));
    // floor: read T, I, E; write z, F
    const double fwd_floor = b * e * (double(L) * hw + double(CI) * hw + double(C) * hw + 2.0 * L +
                                      double(lay.channels) * hw);
    void *d_gt = dev.poisoned(dt, size_t(batch) * L * hw), *d_gi = dev.poisoned(dt, size_t(batch) * CI * hw);
    void* d_ge = dev.poisoned(dt, size_t(batch) * C * hw);
    auto* gbeta = static_cast<float*>(dev.poisoned(dk::DType::kFloat32, size_t(batch) * L));
    auto* bws = static_cast<float*>(dev.poisoned(dk::DType::kFloat32, dk::head_backward_workspace_floats(shape)));
    CHECK_CUDA(dk::head_backward(dt, shape, logits, stats, false, d_gz, d_gf, fs, d_m, fusion, d_gt, gbeta, d_gi,
                                 strides(CI, hw, cl), d_ge, strides(C, hw, cl), bws, nullptr));
    const double bwd = static_cast<double>(report_traffic("backward"));
    // floor: read grad F, grad z, T, I, E and the saved M and stats; write grad T, grad I, grad E
    const double bwd_floor = b * (e * (double(lay.channels) * hw + 2.0 * L + double(L) * hw + double(CI) * hw +
                                       double(C) * hw + hw + double(L) * hw + double(CI) * hw + double(C) * hw) +
                                  4.0 * 2 * L);
    std::printf("traffic summary %s forward %.0f floor %.0f ratio %.4f fwd+bwd %.0f floor %.0f ratio %.4f\n",
                dtype_name(dt), fwd, fwd_floor, fwd / fwd_floor, fwd + bwd, fwd_floor + bwd_floor,
                (fwd + bwd) / (fwd_floor + bwd_floor));
    // the counted run must also be right
    const Forward ref = reference_forward(k, download_as(dt, d_t, batch, L, hw, cl), {});
    expect_close("traffic mask", k, dt, download(dt, d_m, size_t(batch) * hw), ref.mask);
    expect_close("traffic z", k, dt, download(dt, d_z, size_t(batch) * L * 2), ref.z);
  }
  std::printf("decafa_kernels_smoke: %s\n", failures == 0 ? "all cases passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
#endif

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("decafa_kernels_smoke: no CUDA device visible, nothing run\n");
    return 0;
  }
  const std::string arg = argc > 1 ? argv[1] : "";
  // The library reads no environment for its runs of maps; this executable takes DECAFA_CUDA_RUNS=n (n > 0).
  if (const char* env = std::getenv("DECAFA_CUDA_RUNS")) {
    const int n = std::atoi(env);
    if (n <= 0) {
      std::fprintf(stderr, "decafa_kernels_smoke: DECAFA_CUDA_RUNS=%s is not a whole number >= 1\n", env);
      return 1;
    }
    dk::set_map_runs(n);
  }
#ifdef DECAFA_EMULATION
  if (arg == "--traffic")  // --traffic B [channels_last]
    return run_traffic(argc > 2 ? std::atoi(argv[2]) : 2, argc > 3 && std::string(argv[3]) == "channels_last");
#endif
  if (arg == "--runs") {  // the runs of maps the launchers pick for batch B at the paper shape on this device
    const dk::MapShape shape{argc > 2 ? std::atoi(argv[2]) : 64, 98, 128, 128};
    std::printf("runs %zu\n", dk::head_forward_workspace_floats(shape) / (size_t(shape.batch) * 128 * 128));
    return 0;
  }
  const bool quick = arg == "--quick";  // skip the large map
  std::mt19937 rng(1234);
  // b, l, h, w, ci, c, mode, beta, beta_map, normalized, logits_cl, embed_cl, all_dtypes
  const Case cases[] = {
      {2, 3, 5, 7, 1, 3, 5, 1.0f, false, false, false, false, true},    // scalar path (H*W odd)
      {2, 3, 1, 1, 2, 2, 4, 1.0f, true, true, false, false, true},      // one pixel, per-map beta
      {3, 5, 16, 16, 1, 8, 5, 0.7f, false, true, false, false, true},   // vector path, L not a multiple of 4
      {3, 5, 16, 16, 1, 8, 5, 0.7f, true, true, true, true, true},      // channels_last T and E
      {2, 6, 8, 12, 3, 8, 4, 1.2f, true, false, false, true, true},     // channels_last E, vector channels
      {2, 3, 6, 10, 4, 16, 5, 0.8f, false, false, false, true, true},   // channels_last E, 16-byte channels
      {3, 4, 16, 16, 3, 2, 1, 1.0f, false, false, true, false, false},  // F1, channels_last T
      {3, 4, 16, 16, 3, 2, 2, 1.0f, false, false, false, true, false},  // F2, channels_last E (C = 2)
      {2, 5, 12, 20, 1, 4, 3, 2.0f, false, false, false, false, false}, // F3
      {2, 9, 24, 24, 2, 7, 4, -1.5f, true, true, false, false, true},   // F4, negative beta
      // whole tiles of 512 pixels (the ring forward with DECAFA_CUDA_MAPS=ring): raw max, general path, F3
      {3, 5, 16, 32, 1, 8, 5, 0.7f, false, true, false, false, true},   // 512 pixels, 32 threads
      {2, 9, 32, 32, 2, 7, 4, -1.5f, true, true, false, false, true},   // per-map beta, negative beta
      {2, 19, 32, 48, 3, 4, 3, 2.0f, false, false, false, true, false}, // 1536 pixels, 19 maps, channels_last E
      {1, 2, 130, 130, 1, 2, 5, 1.0f, true, false, false, false, false},// map over the on-chip capacity
      {1, 2, 130, 130, 1, 2, 5, 1.0f, false, true, true, true, false},  // the same, channels_last
  };
  check_one_pixel_map_has_zero_gradients();
  check_special_values();
  check_overflow();
  check_large_logits();
  check_programmatic_launch();
  check_pixel_split();
  check_map_pairs_match_scalar();
  const dk::DType dtypes[] = {dk::DType::kFloat32, dk::DType::kFloat16, dk::DType::kBFloat16};
  for (const Case& k : cases) {
    if (quick && k.h * k.w > 40000) continue;
    for (dk::DType dt : dtypes)
      if (dt == dk::DType::kFloat32 || k.all_dtypes) run_case(k, dt, rng);
  }
#ifdef DECAFA_EMULATION
  // which per-map kernels the cases ran (DECAFA_CUDA_MAPS=ring: the ring where it covers the shape)
  std::printf("forward launches maps_forward_ring %llu maps_forward_onchip %llu\n",
              emu::traffic()["maps_forward_ring"].launches, emu::traffic()["maps_forward_onchip"].launches);
  std::printf("backward launches maps_backward_ring %llu maps_backward_onchip %llu\n",
              emu::traffic()["maps_backward_ring"].launches, emu::traffic()["maps_backward_onchip"].launches);
#endif
  std::printf("decafa_kernels_smoke: %s\n", failures == 0 ? "all cases passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
