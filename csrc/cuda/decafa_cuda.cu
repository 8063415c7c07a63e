// CUDA implementation of the decafa operator library (schemas in decafa_fast/ops/schemas.py): tensor checks,
// contiguous inputs, the current stream, dtype dispatch to the torch-free launchers in kernels/.
// Shapes and the math: decafa_fast/ops/schemas.py and kernels/README.md.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // the current stream; lighter than ATen/cuda/CUDAContext.h (no cuBLAS/cuSPARSE headers)
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "decafa_kernels.cuh"

namespace {

namespace dk = decafa_kernels;
using at::Tensor;

dk::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dk::DType::kFloat32;
    case at::kHalf:
      return dk::DType::kFloat16;
    case at::kBFloat16:
      return dk::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "decafa CUDA kernels: ", name, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type(), " (float64 runs on CPU or with the reference backend)");
  }
  return dk::DType::kFloat32;  // not reached
}

void check_cuda(const Tensor& t, const char* name, int64_t rank) {
  TORCH_CHECK(t.is_cuda(), "decafa CUDA kernels: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == rank, "decafa CUDA kernels: ", name, " must have rank ", rank, ", got shape ",
              t.sizes());
}

// `t` must be on the device of `ref` and have its dtype.
void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "decafa CUDA kernels: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "decafa CUDA kernels: ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_sizes(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "decafa CUDA kernels: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX / 2, "decafa CUDA kernels: ", what, " = ", v, " is too large");
  return static_cast<int>(v);
}

// logits (B, L, H, W) as the kernels' shape.
dk::MapShape map_shape(const Tensor& logits) {
  const int64_t h = logits.size(2), w = logits.size(3);
  to_int(h * w, "H*W");
  return {logits.size(0), to_int(logits.size(1), "L"), to_int(h, "H"), to_int(w, "W")};
}

// Image/embedding (B, C, H, W) as a MapShape with maps = 0 (the fusion kernels do not need L then).
dk::MapShape pixel_shape(const Tensor& t) {
  const int64_t h = t.size(2), w = t.size(3);
  to_int(h * w, "H*W");
  return {t.size(0), 0, to_int(h, "H"), to_int(w, "W")};
}

int check_mode(int64_t mode) {
  TORCH_CHECK(mode >= 1 && mode <= 5, "decafa CUDA kernels: mode must be 1..5 (F1..F5), got ", mode);
  return static_cast<int>(mode);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "decafa CUDA kernels: ", op, " failed: ", cudaGetErrorString(err));
}

// Checks the logits and returns them contiguous.
Tensor logits_arg(const Tensor& logits) {
  check_cuda(logits, "logits", 4);
  dtype_of(logits, "logits");
  TORCH_CHECK(logits.size(2) >= 1 && logits.size(3) >= 1 && logits.size(1) >= 1,
              "decafa CUDA kernels: logits must have L, H, W >= 1, got shape ", logits.sizes());
  return logits.contiguous();
}

// The saved log-sum-exp: float32 (B, L) on the logits' device.
// An optional incoming gradient checked against the logits (dtype, device) and a shape, made contiguous;
// undefined when the caller passed None.
Tensor optional_grad(const std::optional<Tensor>& grad, const char* name, const Tensor& logits,
                     at::IntArrayRef sizes) {
  if (!grad.has_value() || !grad->defined()) return Tensor();
  check_like(*grad, name, logits, "logits");
  check_sizes(*grad, name, sizes);
  return grad->contiguous();
}

Tensor lse_arg(const Tensor& lse, const Tensor& logits) {
  TORCH_CHECK(lse.is_cuda() && lse.device() == logits.device(), "decafa CUDA kernels: lse must be on ",
              logits.device(), ", got ", lse.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "decafa CUDA kernels: lse must be float32, got ",
                   lse.scalar_type());
  check_sizes(lse, "lse", {logits.size(0), logits.size(1)});
  return lse.contiguous();
}

// A (B, C, H, W) companion of `ref` (same B, H, W, device, dtype), made contiguous.
Tensor companion_arg(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_cuda(t, name, 4);
  check_like(t, name, ref, ref_name);
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(2) == ref.size(2) && t.size(3) == ref.size(3),
              "decafa CUDA kernels: ", name, " must match ", ref_name, " in B, H, W (", ref.sizes(), "), got ",
              t.sizes());
  to_int(t.size(1), "channels");
  return t.contiguous();
}

int64_t fused_channels(int mode, const Tensor& image, const Tensor& embed) {
  return dk::fusion_layout(mode, static_cast<int>(image.size(1)), static_cast<int>(embed.size(1))).channels;
}

// ------------------------------------------------------------------------------------------------
// Forward ops
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> spatial_softmax_cuda(const Tensor& logits_in, double beta) {
  const Tensor logits = logits_arg(logits_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor phi = at::empty(logits.sizes(), logits.options());
  Tensor lse = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  check_launch(dk::map_forward(dtype_of(logits, "logits"), map_shape(logits), logits.data_ptr(),
                               static_cast<float>(beta), false, lse.data_ptr<float>(), nullptr, phi.data_ptr(),
                               current_stream()),
               "spatial_softmax");
  return {phi, lse};
}

// Shared by soft_argmax, attention_mask, landmark_attention and decafa_head.
struct HeadOutputs {
  Tensor z, mask, fused, lse;
};

HeadOutputs head_forward(const Tensor& logits, const Tensor* image, const Tensor* embed, int mode, double beta,
                         bool normalized, bool want_z, bool want_mask) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t b = logits.size(0), l = logits.size(1), h = logits.size(2), w = logits.size(3);
  HeadOutputs out;
  out.lse = at::empty({b, l}, logits.options().dtype(at::kFloat));
  if (want_z) out.z = at::empty({b, l, 2}, logits.options());
  if (want_mask) out.mask = at::empty({b, 1, h, w}, logits.options());
  int ci = 0, c = 0;
  if (mode != 0) {
    ci = static_cast<int>(image->size(1));
    c = static_cast<int>(embed->size(1));
    out.fused = at::empty({b, fused_channels(mode, *image, *embed), h, w}, logits.options());
  }
  check_launch(dk::head_forward(dtype_of(logits, "logits"), map_shape(logits), logits.data_ptr(),
                                mode != 0 ? image->data_ptr() : nullptr, ci,
                                mode != 0 ? embed->data_ptr() : nullptr, c, mode, static_cast<float>(beta),
                                normalized, out.lse.data_ptr<float>(), want_z ? out.z.data_ptr() : nullptr,
                                want_mask ? out.mask.data_ptr() : nullptr,
                                mode != 0 ? out.fused.data_ptr() : nullptr, current_stream()),
               "decafa head forward");
  return out;
}

std::tuple<Tensor, Tensor> soft_argmax_cuda(const Tensor& logits, double beta, bool normalized) {
  HeadOutputs o = head_forward(logits_arg(logits), nullptr, nullptr, 0, beta, normalized, true, false);
  return {o.z, o.lse};
}

std::tuple<Tensor, Tensor> attention_mask_cuda(const Tensor& logits, double beta) {
  HeadOutputs o = head_forward(logits_arg(logits), nullptr, nullptr, 0, beta, false, false, true);
  return {o.mask, o.lse};
}

std::tuple<Tensor, Tensor, Tensor> landmark_attention_cuda(const Tensor& logits, double beta, bool normalized) {
  HeadOutputs o = head_forward(logits_arg(logits), nullptr, nullptr, 0, beta, normalized, true, true);
  return {o.z, o.mask, o.lse};
}

std::tuple<Tensor, Tensor, Tensor> decafa_head_cuda(const Tensor& logits_in, const Tensor& image_in,
                                                    const Tensor& embed_in, int64_t mode, double beta,
                                                    bool normalized) {
  const Tensor logits = logits_arg(logits_in);
  const Tensor image = companion_arg(image_in, "image", logits, "logits");
  const Tensor embed = companion_arg(embed_in, "embedding", logits, "logits");
  HeadOutputs o = head_forward(logits, &image, &embed, check_mode(mode), beta, normalized, true, false);
  return {o.z, o.fused, o.lse};
}

// The checked, contiguous arguments of fuse and fuse_backward.
struct FuseArgs {
  Tensor image, embed, mask;
  int mode;
};

FuseArgs fuse_args(const Tensor& image_in, const Tensor& embed_in, const Tensor& mask_in, int64_t mode_in) {
  check_cuda(image_in, "image", 4);
  dtype_of(image_in, "image");
  const int mode = check_mode(mode_in);
  const Tensor image = image_in.contiguous();
  const Tensor embed = companion_arg(embed_in, "embedding", image, "image");
  const Tensor mask = companion_arg(mask_in, "mask", image, "image");
  TORCH_CHECK(mask.size(1) == 1, "decafa CUDA kernels: mask must have 1 channel, got shape ", mask.sizes());
  return {image, embed, mask, mode};
}

Tensor fuse_cuda(const Tensor& image_in, const Tensor& embed_in, const Tensor& mask_in, int64_t mode_in) {
  const FuseArgs args = fuse_args(image_in, embed_in, mask_in, mode_in);
  const Tensor &image = args.image, &embed = args.embed, &mask = args.mask;
  const int mode = args.mode;
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t b = image.size(0), h = image.size(2), w = image.size(3);
  Tensor fused = at::empty({b, fused_channels(mode, image, embed), h, w}, image.options());
  check_launch(dk::pixel_forward(dtype_of(image, "image"), pixel_shape(image), nullptr, nullptr, 1.f,
                                 mask.data_ptr(), nullptr, image.data_ptr(), static_cast<int>(image.size(1)),
                                 embed.data_ptr(), static_cast<int>(embed.size(1)), mode, fused.data_ptr(),
                                 current_stream()),
               "fuse");
  return fused;
}

// ------------------------------------------------------------------------------------------------
// Backward ops
// ------------------------------------------------------------------------------------------------
Tensor spatial_softmax_backward_cuda(const Tensor& grad_phi_in, const Tensor& logits_in, const Tensor& lse_in,
                                     double beta) {
  const Tensor logits = logits_arg(logits_in);
  const Tensor lse = lse_arg(lse_in, logits);
  check_cuda(grad_phi_in, "grad_phi", 4);
  check_like(grad_phi_in, "grad_phi", logits, "logits");
  check_sizes(grad_phi_in, "grad_phi", logits.sizes());
  const Tensor grad_phi = grad_phi_in.contiguous();
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad = at::empty(logits.sizes(), logits.options());
  check_launch(dk::map_backward(dtype_of(logits, "logits"), map_shape(logits), grad_phi.data_ptr(), true, false,
                                nullptr, logits.data_ptr(), lse.data_ptr<float>(), static_cast<float>(beta), false,
                                grad.data_ptr(), current_stream()),
               "spatial_softmax_backward");
  return grad;
}

Tensor landmark_attention_backward_cuda(const std::optional<Tensor>& grad_z_in,
                                        const std::optional<Tensor>& grad_mask_in, const Tensor& logits_in,
                                        const Tensor& lse_in, double beta, bool normalized) {
  const Tensor logits = logits_arg(logits_in);
  const Tensor lse = lse_arg(lse_in, logits);
  const int64_t b = logits.size(0), l = logits.size(1), h = logits.size(2), w = logits.size(3);
  const Tensor grad_z = optional_grad(grad_z_in, "grad_z", logits, {b, l, 2});
  const Tensor grad_mask = optional_grad(grad_mask_in, "grad_mask", logits, {b, 1, h, w});
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad = at::empty(logits.sizes(), logits.options());
  check_launch(dk::map_backward(dtype_of(logits, "logits"), map_shape(logits),
                                grad_mask.defined() ? grad_mask.data_ptr() : nullptr, false, false,
                                grad_z.defined() ? grad_z.data_ptr() : nullptr, logits.data_ptr(),
                                lse.data_ptr<float>(), static_cast<float>(beta), normalized, grad.data_ptr(),
                                current_stream()),
               "landmark_attention_backward");
  return grad;
}

std::tuple<Tensor, Tensor, Tensor> fuse_backward_cuda(const Tensor& grad_fused_in, const Tensor& image_in,
                                                      const Tensor& embed_in, const Tensor& mask_in,
                                                      int64_t mode_in) {
  const FuseArgs args = fuse_args(image_in, embed_in, mask_in, mode_in);
  const Tensor &image = args.image, &embed = args.embed, &mask = args.mask;
  const int mode = args.mode;
  const Tensor grad_fused = companion_arg(grad_fused_in, "grad_fused", image, "image");
  TORCH_CHECK(grad_fused.size(1) == fused_channels(mode, image, embed), "decafa CUDA kernels: grad_fused must have ",
              fused_channels(mode, image, embed), " channels for mode ", mode, ", got shape ", grad_fused.sizes());
  const c10::cuda::CUDAGuard guard(image.device());
  Tensor grad_image = at::empty(image.sizes(), image.options());
  Tensor grad_embed = at::empty(embed.sizes(), embed.options());
  Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  check_launch(dk::pixel_backward(dtype_of(image, "image"), pixel_shape(image), grad_fused.data_ptr(), nullptr,
                                  nullptr, 1.f, mask.data_ptr(), image.data_ptr(), static_cast<int>(image.size(1)),
                                  embed.data_ptr(), static_cast<int>(embed.size(1)), mode, grad_image.data_ptr(),
                                  grad_embed.data_ptr(), grad_mask.data_ptr(), false,
                                  current_stream()),
               "fuse_backward");
  return {grad_image, grad_embed, grad_mask};
}

std::tuple<Tensor, Tensor, Tensor> decafa_head_backward_cuda(const std::optional<Tensor>& grad_z_in,
                                                             const std::optional<Tensor>& grad_fused_in,
                                                             const Tensor& logits_in, const Tensor& image_in,
                                                             const Tensor& embed_in, const Tensor& lse_in,
                                                             int64_t mode_in, double beta, bool normalized) {
  const Tensor logits = logits_arg(logits_in);
  const Tensor image = companion_arg(image_in, "image", logits, "logits");
  const Tensor embed = companion_arg(embed_in, "embedding", logits, "logits");
  const Tensor lse = lse_arg(lse_in, logits);
  const int mode = check_mode(mode_in);
  const int64_t b = logits.size(0), l = logits.size(1), h = logits.size(2), w = logits.size(3);
  const Tensor grad_z = optional_grad(grad_z_in, "grad_z", logits, {b, l, 2});
  const Tensor grad_fused =
      optional_grad(grad_fused_in, "grad_fused", logits, {b, fused_channels(mode, image, embed), h, w});
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  Tensor grad_image = at::empty(image.sizes(), image.options());
  Tensor grad_embed = at::empty(embed.sizes(), embed.options());
  const dk::MapShape shape = map_shape(logits);
  Tensor workspace;
  if (grad_fused.defined())
    workspace = at::empty({static_cast<int64_t>(dk::head_backward_workspace_floats(shape))},
                          logits.options().dtype(at::kFloat));
  check_launch(dk::head_backward(dtype_of(logits, "logits"), shape, grad_z.defined() ? grad_z.data_ptr() : nullptr,
                                 grad_fused.defined() ? grad_fused.data_ptr() : nullptr, logits.data_ptr(),
                                 image.data_ptr(), static_cast<int>(image.size(1)), embed.data_ptr(),
                                 static_cast<int>(embed.size(1)), lse.data_ptr<float>(), mode,
                                 static_cast<float>(beta), normalized, grad_logits.data_ptr(), grad_image.data_ptr(),
                                 grad_embed.data_ptr(), workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                 current_stream()),
               "decafa_head_backward");
  return {grad_logits, grad_image, grad_embed};
}

}  // namespace

TORCH_LIBRARY_IMPL(decafa, CUDA, m) {
  m.impl("spatial_softmax", &spatial_softmax_cuda);
  m.impl("spatial_softmax_backward", &spatial_softmax_backward_cuda);
  m.impl("soft_argmax", &soft_argmax_cuda);
  m.impl("attention_mask", &attention_mask_cuda);
  m.impl("landmark_attention", &landmark_attention_cuda);
  m.impl("landmark_attention_backward", &landmark_attention_backward_cuda);
  m.impl("fuse", &fuse_cuda);
  m.impl("fuse_backward", &fuse_backward_cuda);
  m.impl("decafa_head", &decafa_head_cuda);
  m.impl("decafa_head_backward", &decafa_head_backward_cuda);
}
