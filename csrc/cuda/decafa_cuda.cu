// CUDA implementation of the decafa operator library (op contract v2; schemas in decafa_fast/ops/schemas.py):
// checks every argument (rank, shapes, dtype, device, layout; csrc/common/checks.h, shared with the CPU glue)
// with a RuntimeError that names the op and the argument, reads NCHW and channels_last logits / images /
// embeddings / incoming gradients in place (any other strides are copied to contiguous first), sets the
// device guard and calls the torch-free launchers of kernels/ on the current stream. Outputs: F in the
// memory format of E; phi, M, z, stats and every gradient contiguous.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the current stream; lighter than ATen/cuda/CUDAContext.h
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/op_list.h"
#include "decafa_kernels.cuh"

namespace {

namespace dk = decafa_kernels;
namespace checks = decafa::checks;
using at::Tensor;
using std::optional;

#define DECAFA_CHECK(cond, ...) TORCH_CHECK(cond, "decafa CUDA kernels: ", __VA_ARGS__)

dk::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return dk::DType::kFloat32;
    case at::kHalf: return dk::DType::kFloat16;
    case at::kBFloat16: return dk::DType::kBFloat16;
    default:
      DECAFA_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type(),
                   " (float64 runs on CPU or with the reference backend)");
  }
  return dk::DType::kFloat32;  // not reached
}

// The tensor that places the op (the logits, or fuse's image): a CUDA tensor in a dtype the kernels take.
// The other arguments are checked against it (csrc/common/checks.h).
void check_on_cuda(const char* op, const char* name, const Tensor& t, int64_t rank) {
  checks::tensor(op, name, t, rank);
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernels, got one on ", t.device());
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", s, " (float64 runs on CPU or with the reference backend)");
}

int to_int(int64_t v, const char* what) {
  DECAFA_CHECK(v >= 0 && v <= INT_MAX / 2, what, " = ", v, " is too large for the CUDA kernels");
  return static_cast<int>(v);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  DECAFA_CHECK(err == cudaSuccess, op, " failed: ", cudaGetErrorString(err));
}

// A (B, C, H, W) tensor as the kernels read it: NCHW or channels_last in place, anything else copied to
// contiguous. `strides` are in elements over (batch, channel, pixel).
struct Planes {
  Tensor t;
  dk::Strides strides;
  bool channels_last;
};

Planes planes(const Tensor& t) {
  const int64_t c = t.size(1), hw = t.size(2) * t.size(3);
  if (t.is_contiguous()) return {t, dk::nchw_strides(c, hw), false};
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return {t, dk::nhwc_strides(c, hw), true};
  return {t.contiguous(), dk::nchw_strides(c, hw), false};
}

// The logits: (B, L, H, W), float32 / float16 / bfloat16 CUDA, L, H, W >= 1.
void check_logits(const char* op, const Tensor& logits) {
  check_on_cuda(op, "logits", logits, 4);
  checks::logits(op, logits);
  to_int(logits.size(1), "L");
  to_int(logits.size(2) * logits.size(3), "H*W");
}

dk::MapShape map_shape(const Tensor& t) {
  return {t.size(0), static_cast<int>(t.size(1)), static_cast<int>(t.size(2)), static_cast<int>(t.size(3))};
}

// The logits, their temperature (beta_map (B, L) float32 or the float beta) and the kept tensors.
struct LogitsArg {
  Planes planes;
  Tensor beta_map;
  dk::Logits view;
};

// beta_map is float32: the accumulation dtype of the dtypes check_on_cuda takes.
LogitsArg logits_arg(const char* op, const Tensor& logits, double beta, const optional<Tensor>& beta_map_in) {
  check_logits(op, logits);
  LogitsArg a{planes(logits), Tensor(), {}};
  if (checks::beta_map(op, beta_map_in, logits)) a.beta_map = beta_map_in->contiguous();
  a.view = {a.planes.t.data_ptr(), a.planes.strides, static_cast<float>(beta),
            a.beta_map.defined() ? a.beta_map.data_ptr<float>() : nullptr};
  return a;
}

// An optional incoming gradient of the logits' dtype and device with the given shape, made contiguous;
// undefined when the caller passed None.
Tensor optional_grad(const char* op, const char* name, const optional<Tensor>& grad, const Tensor& logits,
                     at::IntArrayRef sizes) {
  if (!checks::optional_grad(op, name, grad, sizes, "logits", logits)) return Tensor();
  checks::same_dtype(op, name, *grad, "logits", logits);
  return grad->contiguous();
}

// A (B, C, H, W) companion of `ref` (same B, H, W, device, dtype).
void check_companion(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  checks::companion(op, name, t, ref_name, ref);
  to_int(t.size(1), "channels");
}

// The fusion sources: image (B, Ci, H, W), embedding (B, C, H, W), both like `ref`; F's channel count.
struct FusionArg {
  Planes image, embed;
  dk::FusionInputs view;
  int64_t channels;
};

FusionArg fusion_arg(const char* op, const Tensor& image, const Tensor& embed, const Tensor& ref, const char* ref_name,
                     int mode) {
  check_companion(op, "image", image, ref_name, ref);
  check_companion(op, "embedding", embed, ref_name, ref);
  FusionArg f{planes(image), planes(embed), {}, 0};
  const int ci = static_cast<int>(image.size(1)), c = static_cast<int>(embed.size(1));
  f.view = {mode, f.image.t.data_ptr(), f.image.strides, ci, f.embed.t.data_ptr(), f.embed.strides, c};
  f.channels = dk::fusion_layout(mode, ci, c).channels;
  to_int(f.channels, "fused channels");
  return f;
}

// F (B, channels, H, W) in the memory format of the embedding as read.
Tensor empty_fused(const FusionArg& f, dk::Strides* strides) {
  const Tensor& e = f.embed.t;
  const int64_t hw = e.size(2) * e.size(3);
  if (f.embed.channels_last) {
    *strides = dk::nhwc_strides(f.channels, hw);
    return at::empty({e.size(0), f.channels, e.size(2), e.size(3)},
                     e.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  *strides = dk::nchw_strides(f.channels, hw);
  return at::empty({e.size(0), f.channels, e.size(2), e.size(3)}, e.options());
}

// A mask (B, 1, H, W) like `ref`, made contiguous.
Tensor mask_arg(const char* op, const Tensor& mask, const Tensor& ref, const char* ref_name) {
  checks::mask(op, mask, ref_name, ref);
  return mask.contiguous();
}

// grad_fused (B, channels, H, W) like `ref`, read in place when NCHW or channels_last.
Planes grad_fused_arg(const char* op, const Tensor& grad, const Tensor& ref, const char* ref_name, int64_t channels) {
  checks::grad(op, "grad_fused", grad, {ref.size(0), channels, ref.size(2), ref.size(3)}, ref_name, ref);
  checks::same_dtype(op, "grad_fused", grad, ref_name, ref);
  return planes(grad);
}

// ------------------------------------------------------------------------------------------------
// Forward ops
// ------------------------------------------------------------------------------------------------
struct HeadOutputs {
  Tensor z, phi, mask, fused, stats;
};

// Shared by every forward op on the logits. `fusion` null: no F.
HeadOutputs head_forward(const LogitsArg& lg, const Tensor& logits, const FusionArg* fusion, bool normalized,
                         bool want_z, bool want_phi, bool want_mask, const char* op) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t b = logits.size(0), l = logits.size(1), h = logits.size(2), w = logits.size(3);
  const dk::MapShape shape = map_shape(logits);
  HeadOutputs out;
  out.stats = at::empty({b, l, 2}, logits.options().dtype(at::kFloat));
  if (want_z) out.z = at::empty({b, l, 2}, logits.options());
  if (want_phi) out.phi = at::empty({b, l, h, w}, logits.options());
  if (want_mask) out.mask = at::empty({b, 1, h, w}, logits.options());
  dk::Strides fs{0, 0, 0};
  if (fusion != nullptr) out.fused = empty_fused(*fusion, &fs);
  Tensor workspace;
  if (want_mask || fusion != nullptr)
    workspace = at::empty({static_cast<int64_t>(dk::head_forward_workspace_floats(shape))},
                          logits.options().dtype(at::kFloat));
  check_launch(dk::head_forward(dtype_of(logits, "logits"), shape, lg.view, normalized, out.stats.data_ptr<float>(),
                                want_z ? out.z.data_ptr() : nullptr, want_phi ? out.phi.data_ptr() : nullptr,
                                want_mask ? out.mask.data_ptr() : nullptr, fusion ? &fusion->view : nullptr,
                                fusion ? out.fused.data_ptr() : nullptr, fs,
                                workspace.defined() ? workspace.data_ptr<float>() : nullptr, current_stream()),
               op);
  return out;
}

std::tuple<Tensor, Tensor> spatial_softmax_cuda(const Tensor& logits, double beta, const optional<Tensor>& beta_map) {
  const LogitsArg lg = logits_arg("spatial_softmax", logits, beta, beta_map);
  HeadOutputs o = head_forward(lg, logits, nullptr, false, false, true, false, "spatial_softmax");
  return {o.phi, o.stats};
}

std::tuple<Tensor, Tensor> soft_argmax_cuda(const Tensor& logits, double beta, const optional<Tensor>& beta_map,
                                            bool normalized) {
  const LogitsArg lg = logits_arg("soft_argmax", logits, beta, beta_map);
  HeadOutputs o = head_forward(lg, logits, nullptr, normalized, true, false, false, "soft_argmax");
  return {o.z, o.stats};
}

std::tuple<Tensor, Tensor> attention_mask_cuda(const Tensor& logits, double beta, const optional<Tensor>& beta_map) {
  const LogitsArg lg = logits_arg("attention_mask", logits, beta, beta_map);
  HeadOutputs o = head_forward(lg, logits, nullptr, false, false, false, true, "attention_mask");
  return {o.mask, o.stats};
}

std::tuple<Tensor, Tensor, Tensor> landmark_attention_cuda(const Tensor& logits, double beta,
                                                           const optional<Tensor>& beta_map, bool normalized) {
  const LogitsArg lg = logits_arg("landmark_attention", logits, beta, beta_map);
  HeadOutputs o = head_forward(lg, logits, nullptr, normalized, true, false, true, "landmark_attention");
  return {o.z, o.mask, o.stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> decafa_head_cuda(const Tensor& logits, const Tensor& image,
                                                            const Tensor& embed, int64_t mode, double beta,
                                                            const optional<Tensor>& beta_map, bool normalized) {
  const char* op = "decafa_head";
  const LogitsArg lg = logits_arg(op, logits, beta, beta_map);
  const FusionArg f = fusion_arg(op, image, embed, logits, "logits", checks::mode(op, mode));
  HeadOutputs o = head_forward(lg, logits, &f, normalized, true, false, true, "decafa_head");
  return {o.z, o.fused, o.mask, o.stats};
}

// The arguments of fuse and fuse_backward: image (the reference of the others), embedding, mask, mode.
struct FuseArgs {
  FusionArg f;
  Tensor mask;
  dk::MapShape shape;
};

FuseArgs fuse_args(const char* op, const Tensor& image, const Tensor& embed, const Tensor& mask, int64_t mode) {
  check_on_cuda(op, "image", image, 4);
  to_int(image.size(2) * image.size(3), "H*W");
  // braced initialisation runs left to right: image and embedding are checked before the mask
  return {fusion_arg(op, image, embed, image, "image", checks::mode(op, mode)), mask_arg(op, mask, image, "image"),
          {image.size(0), 0, static_cast<int>(image.size(2)), static_cast<int>(image.size(3))}};
}

Tensor fuse_cuda(const Tensor& image, const Tensor& embed, const Tensor& mask_in, int64_t mode_in) {
  const FuseArgs a = fuse_args("fuse", image, embed, mask_in, mode_in);
  const c10::cuda::CUDAGuard guard(image.device());
  dk::Strides fs{0, 0, 0};
  Tensor fused = empty_fused(a.f, &fs);
  check_launch(dk::fuse_forward(dtype_of(image, "image"), a.shape, a.mask.data_ptr(), a.f.view, fused.data_ptr(),
                                fs, current_stream()),
               "fuse");
  return fused;
}

// ------------------------------------------------------------------------------------------------
// Backward ops
// ------------------------------------------------------------------------------------------------
Tensor stats_arg(const char* op, const Tensor& stats, const Tensor& logits) {
  checks::stats(op, stats, logits);
  return stats.contiguous();
}

std::tuple<Tensor, Tensor> maps_backward(const LogitsArg& lg, const Tensor& logits, const Tensor& stats,
                                         bool normalized, dk::PhiGrad grad, const Tensor& grad_z, const char* op) {
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  Tensor grad_beta = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  check_launch(dk::maps_backward(dtype_of(logits, "logits"), map_shape(logits), lg.view, stats.data_ptr<float>(),
                                 normalized, grad, grad_z.defined() ? grad_z.data_ptr() : nullptr,
                                 grad_logits.data_ptr(), grad_beta.data_ptr<float>(), current_stream()),
               op);
  return {grad_logits, grad_beta};
}

std::tuple<Tensor, Tensor> spatial_softmax_backward_cuda(const Tensor& grad_phi, const Tensor& logits,
                                                         const Tensor& stats_in, double beta,
                                                         const optional<Tensor>& beta_map) {
  const char* op = "spatial_softmax_backward";
  const LogitsArg lg = logits_arg(op, logits, beta, beta_map);
  const Tensor stats = stats_arg(op, stats_in, logits);
  checks::grad(op, "grad_phi", grad_phi, logits.sizes(), "logits", logits);
  checks::same_dtype(op, "grad_phi", grad_phi, "logits", logits);
  const Planes g = planes(grad_phi);
  return maps_backward(lg, logits, stats, false, dk::PhiGrad{g.t.data_ptr(), true, false, g.strides}, Tensor(),
                       "spatial_softmax_backward");
}

std::tuple<Tensor, Tensor> landmark_attention_backward_cuda(const optional<Tensor>& grad_z_in,
                                                            const optional<Tensor>& grad_mask_in,
                                                            const Tensor& logits, const Tensor& stats_in, double beta,
                                                            const optional<Tensor>& beta_map, bool normalized) {
  const char* op = "landmark_attention_backward";
  const LogitsArg lg = logits_arg(op, logits, beta, beta_map);
  const Tensor stats = stats_arg(op, stats_in, logits);
  const int64_t b = logits.size(0), l = logits.size(1), h = logits.size(2), w = logits.size(3);
  const Tensor grad_z = optional_grad(op, "grad_z", grad_z_in, logits, {b, l, 2});
  const Tensor grad_mask = optional_grad(op, "grad_mask", grad_mask_in, logits, {b, 1, h, w});
  const dk::PhiGrad g{grad_mask.defined() ? grad_mask.data_ptr() : nullptr, false, false, dk::Strides{0, 0, 0}};
  return maps_backward(lg, logits, stats, normalized, g, grad_z, "landmark_attention_backward");
}

std::tuple<Tensor, Tensor, Tensor> fuse_backward_cuda(const Tensor& grad_fused_in, const Tensor& image,
                                                      const Tensor& embed, const Tensor& mask_in, int64_t mode_in) {
  const char* op = "fuse_backward";
  const FuseArgs a = fuse_args(op, image, embed, mask_in, mode_in);
  const Planes grad_fused = grad_fused_arg(op, grad_fused_in, image, "image", a.f.channels);
  const c10::cuda::CUDAGuard guard(image.device());
  Tensor grad_image = at::empty(image.sizes(), image.options());
  Tensor grad_embed = at::empty(embed.sizes(), embed.options());
  Tensor grad_mask = at::empty(a.mask.sizes(), a.mask.options());
  const int64_t hw = image.size(2) * image.size(3);
  check_launch(dk::fuse_backward(dtype_of(image, "image"), a.shape, grad_fused.t.data_ptr(), grad_fused.strides,
                                 a.mask.data_ptr(), a.f.view, grad_image.data_ptr(),
                                 dk::nchw_strides(image.size(1), hw), grad_embed.data_ptr(),
                                 dk::nchw_strides(embed.size(1), hw), grad_mask.data_ptr(), false, current_stream()),
               "fuse_backward");
  return {grad_image, grad_embed, grad_mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> decafa_head_backward_cuda(
    const optional<Tensor>& grad_z_in, const optional<Tensor>& grad_fused_in, const Tensor& logits,
    const Tensor& image, const Tensor& embed, const Tensor& mask_in, const Tensor& stats_in, int64_t mode_in,
    double beta, const optional<Tensor>& beta_map, bool normalized) {
  const char* op = "decafa_head_backward";
  const LogitsArg lg = logits_arg(op, logits, beta, beta_map);
  const int mode = checks::mode(op, mode_in);
  const FusionArg f = fusion_arg(op, image, embed, logits, "logits", mode);
  const Tensor mask = mask_arg(op, mask_in, logits, "logits");
  const Tensor stats = stats_arg(op, stats_in, logits);
  const int64_t b = logits.size(0), l = logits.size(1), hw = logits.size(2) * logits.size(3);
  const Tensor grad_z = optional_grad(op, "grad_z", grad_z_in, logits, {b, l, 2});
  Planes grad_fused{Tensor(), {0, 0, 0}, false};
  if (grad_fused_in.has_value() && grad_fused_in->defined())
    grad_fused = grad_fused_arg(op, *grad_fused_in, logits, "logits", f.channels);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  Tensor grad_image = at::empty(image.sizes(), image.options());
  Tensor grad_embed = at::empty(embed.sizes(), embed.options());
  Tensor grad_beta = at::empty({b, l}, logits.options().dtype(at::kFloat));
  const dk::MapShape shape = map_shape(logits);
  Tensor workspace;
  if (grad_fused.t.defined())
    workspace = at::empty({static_cast<int64_t>(dk::head_backward_workspace_floats(shape))},
                          logits.options().dtype(at::kFloat));
  check_launch(dk::head_backward(dtype_of(logits, "logits"), shape, lg.view, stats.data_ptr<float>(), normalized,
                                 grad_z.defined() ? grad_z.data_ptr() : nullptr,
                                 grad_fused.t.defined() ? grad_fused.t.data_ptr() : nullptr, grad_fused.strides,
                                 mask.data_ptr(), f.view, grad_logits.data_ptr(), grad_beta.data_ptr<float>(),
                                 grad_image.data_ptr(), dk::nchw_strides(image.size(1), hw), grad_embed.data_ptr(),
                                 dk::nchw_strides(embed.size(1), hw),
                                 workspace.defined() ? workspace.data_ptr<float>() : nullptr, current_stream()),
               "decafa_head_backward");
  return {grad_logits, grad_image, grad_embed, grad_beta};
}

}  // namespace

// Every op of the table (csrc/common/op_list.h) as <op>_cuda: declared from the list, so that a definition
// whose signature differs from the table's fails to compile here, and registered from it.
namespace {
#define DECAFA_DECLARE_OP(name, returns, params) returns name##_cuda params;
DECAFA_OPS(DECAFA_DECLARE_OP)
#undef DECAFA_DECLARE_OP
}  // namespace

// The runs of maps of the per-map run kernels (decafa_kernels::set_map_runs): plain C symbols, so that Python
// sets them with ctypes from the loaded library (decafa_fast/ops/cuda_runs.py passes DECAFA_CUDA_RUNS, as
// decafa_fast.settings parses it, once at import) without a schema of their own. 0: the kernels' own choice.
// decafa_cuda_set_runs returns the previous value, or -1 (nothing changed) for a negative `runs`.
extern "C" __attribute__((visibility("default"))) int decafa_cuda_set_runs(int runs) {
  return runs < 0 ? -1 : dk::set_map_runs(runs);
}
extern "C" __attribute__((visibility("default"))) int decafa_cuda_runs() { return dk::map_runs_setting(); }
// The channel groups of the forward's pixel kernel (decafa_kernels::set_pixel_split), the same way: 0 the
// launcher's choice, n > 0 forced (1: no split); the benchmarks time both in one process.
extern "C" __attribute__((visibility("default"))) int decafa_cuda_set_pixel_split(int groups) {
  return groups < 0 ? -1 : dk::set_pixel_split(groups);
}
extern "C" __attribute__((visibility("default"))) int decafa_cuda_pixel_split() { return dk::set_pixel_split(-1); }

TORCH_LIBRARY_IMPL(decafa, CUDA, m) {
#define DECAFA_REGISTER_OP(name, returns, params) m.impl(#name, &name##_cuda);
  DECAFA_OPS(DECAFA_REGISTER_OP)
#undef DECAFA_REGISTER_OP
}
