// Torch-free GPU smoke test of the decafa kernels: head_forward / head_backward (float32) against a CPU
// double-precision computation, over shapes that take the scalar path, the vector path, the chunk loop
// and the unstaged (map larger than shared memory) path, for every fusion mode.
// Exit code: 0 = passed or no GPU (says so), 1 = a mismatch or a CUDA error.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "decafa_kernels.cuh"

namespace dk = decafa_kernels;

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    cudaError_t err_ = (expr);                                                                   \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

struct Case {
  int b, l, h, w, ci, c, mode;
  float beta;
  bool normalized;
  const char* chunk;  // DECAFA_CUDA_BATCH_CHUNK, or nullptr for auto
};

std::vector<float> random_vec(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

float* to_device(const std::vector<float>& v) {
  float* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(v.size(), 1) * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

float* poisoned(size_t n) {  // NaN-filled, so unwritten outputs fail the comparison
  std::vector<float> v(n, NAN);
  return to_device(v);
}

std::vector<float> to_host(const float* d, size_t n) {
  std::vector<float> v(n);
  CHECK_CUDA(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

// max |got - want| / (max |want| + 1e-6) over the array; NaN counts as a failure.
bool close(const char* what, const Case& k, const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(got[i] - want[i]);
    if (!(d == d)) err = INFINITY;
    err = std::max(err, d);
    ref = std::max(ref, std::fabs(want[i]));
  }
  const double rel = err / (ref + 1e-6);
  const bool ok = rel < 2e-4;
  if (!ok)
    std::printf("FAIL %-12s B=%d L=%d H=%d W=%d mode=%d: max rel error %.3g\n", what, k.b, k.l, k.h, k.w, k.mode,
                rel);
  return ok;
}

bool run_case(const Case& k, std::mt19937& rng) {
  if (k.chunk) setenv("DECAFA_CUDA_BATCH_CHUNK", k.chunk, 1); else unsetenv("DECAFA_CUDA_BATCH_CHUNK");
  const int hw = k.h * k.w;
  const dk::FusionLayout lay = dk::fusion_layout(k.mode, k.ci, k.c);
  const size_t n_t = size_t(k.b) * k.l * hw, n_i = size_t(k.b) * k.ci * hw, n_e = size_t(k.b) * k.c * hw;
  const size_t n_f = size_t(k.b) * lay.channels * hw, n_z = size_t(k.b) * k.l * 2;
  const auto t = random_vec(n_t, rng, 2.f), img = random_vec(n_i, rng, 1.f), emb = random_vec(n_e, rng, 1.f);
  const auto gz = random_vec(n_z, rng, 1.f), gf = random_vec(n_f, rng, 1.f);

  // CPU reference in double.
  std::vector<double> lse(size_t(k.b) * k.l), z(n_z), phi(n_t), mask(size_t(k.b) * hw, 0.0), fused(n_f);
  const double kx = k.normalized ? (k.w > 1 ? 2.0 / (k.w - 1) : 0.0) : 1.0, ox = k.normalized ? -1.0 : 0.0;
  const double ky = k.normalized ? (k.h > 1 ? 2.0 / (k.h - 1) : 0.0) : 1.0, oy = ox;
  for (int m = 0; m < k.b * k.l; ++m) {
    double mx = -INFINITY, s = 0, sx = 0, sy = 0;
    for (int p = 0; p < hw; ++p) mx = std::max(mx, double(k.beta) * t[size_t(m) * hw + p]);
    for (int p = 0; p < hw; ++p) s += std::exp(double(k.beta) * t[size_t(m) * hw + p] - mx);
    lse[m] = mx + std::log(s);
    for (int p = 0; p < hw; ++p) {
      const double ph = std::exp(double(k.beta) * t[size_t(m) * hw + p] - lse[m]);
      phi[size_t(m) * hw + p] = ph;
      sx += ph * (p % k.w);
      sy += ph * (p / k.w);
      mask[size_t(m / k.l) * hw + p] += ph;
    }
    z[2 * m] = ox + kx * sx;
    z[2 * m + 1] = oy + ky * sy;
  }
  std::vector<double> gi(n_i, 0.0), ge(n_e, 0.0), gm(size_t(k.b) * hw, 0.0), gt(n_t);
  for (int b = 0; b < k.b; ++b)
    for (int p = 0; p < hw; ++p) {
      const double mv = mask[size_t(b) * hw + p];
      auto seg = [&](const std::vector<float>& src, int channels, int plain, int masked, std::vector<double>& g) {
        for (int c = 0; c < channels; ++c) {
          const double x = src[(size_t(b) * channels + c) * hw + p];
          const size_t out = size_t(b) * lay.channels * hw + p;
          if (plain >= 0) {
            fused[out + size_t(plain + c) * hw] = x;
            g[(size_t(b) * channels + c) * hw + p] += gf[out + size_t(plain + c) * hw];
          }
          if (masked >= 0) {
            const double gv = gf[out + size_t(masked + c) * hw];
            fused[out + size_t(masked + c) * hw] = x * mv;
            g[(size_t(b) * channels + c) * hw + p] += gv * mv;
            gm[size_t(b) * hw + p] += gv * x;
          }
        }
      };
      seg(img, k.ci, lay.image_plain, lay.image_masked, gi);
      seg(emb, k.c, lay.embed_plain, lay.embed_masked, ge);
    }
  for (int m = 0; m < k.b * k.l; ++m) {
    const int b = m / k.l;
    double s = 0, zx = 0, zy = 0;
    for (int p = 0; p < hw; ++p) {
      const double ph = phi[size_t(m) * hw + p];
      s += gm[size_t(b) * hw + p] * ph;
      zx += ph * (p % k.w);
      zy += ph * (p / k.w);
    }
    for (int p = 0; p < hw; ++p) {
      const double d = gm[size_t(b) * hw + p] - s + gz[2 * m] * kx * ((p % k.w) - zx) +
                       gz[2 * m + 1] * ky * ((p / k.w) - zy);
      gt[size_t(m) * hw + p] = k.beta * phi[size_t(m) * hw + p] * d;
    }
  }

  // GPU.
  float *d_t = to_device(t), *d_i = to_device(img), *d_e = to_device(emb), *d_gz = to_device(gz),
        *d_gf = to_device(gf);
  float *d_lse = poisoned(lse.size()), *d_z = poisoned(n_z), *d_f = poisoned(n_f), *d_m = poisoned(mask.size());
  float *d_gt = poisoned(n_t), *d_gi = poisoned(n_i), *d_ge = poisoned(n_e), *d_ws = poisoned(size_t(k.b) * hw);
  const dk::MapShape shape{k.b, k.l, k.h, k.w};
  CHECK_CUDA(dk::head_forward(dk::DType::kFloat32, shape, d_t, d_i, k.ci, d_e, k.c, k.mode, k.beta, k.normalized,
                              d_lse, d_z, d_m, d_f, nullptr));
  CHECK_CUDA(dk::head_backward(dk::DType::kFloat32, shape, d_gz, d_gf, d_t, d_i, k.ci, d_e, k.c, d_lse, k.mode,
                               k.beta, k.normalized, d_gt, d_gi, d_ge, d_ws, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  bool ok = close("lse", k, to_host(d_lse, lse.size()), lse) && close("z", k, to_host(d_z, n_z), z) &&
            close("mask", k, to_host(d_m, mask.size()), mask) && close("fused", k, to_host(d_f, n_f), fused) &&
            close("grad_logits", k, to_host(d_gt, n_t), gt) && close("grad_image", k, to_host(d_gi, n_i), gi) &&
            close("grad_embed", k, to_host(d_ge, n_e), ge);
  for (float* p : {d_t, d_i, d_e, d_gz, d_gf, d_lse, d_z, d_f, d_m, d_gt, d_gi, d_ge, d_ws}) cudaFree(p);
  return ok;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("decafa_kernels_smoke: no CUDA device visible, nothing run\n");
    return 0;
  }
  std::mt19937 rng(1234);
  const Case cases[] = {
      {2, 3, 5, 7, 1, 3, 5, 1.0f, false, nullptr},     // scalar path (H*W odd)
      {2, 3, 1, 1, 2, 2, 4, 1.0f, true, nullptr},      // one pixel
      {3, 4, 16, 16, 1, 5, 5, 0.7f, true, nullptr},    // vector path
      {3, 4, 16, 16, 3, 2, 1, 1.0f, false, "1"},       // F1, chunk loop
      {3, 4, 16, 16, 3, 2, 2, 1.0f, false, "2"},       // F2, uneven chunks
      {2, 5, 12, 20, 1, 4, 3, 2.0f, false, nullptr},   // F3
      {4, 3, 32, 32, 2, 8, 4, -1.5f, true, nullptr},   // F4, negative beta
      {1, 2, 190, 190, 1, 2, 5, 1.0f, false, nullptr}, // map over the shared-memory staging limit
  };
  bool ok = true;
  for (const Case& k : cases) ok = run_case(k, rng) && ok;
  std::printf("decafa_kernels_smoke: %s\n", ok ? "all cases passed" : "FAILED");
  return ok ? 0 : 1;
}
