#include "../self_attention.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace cnn_attention {
namespace ops {

namespace {

// The feature map and every weight run in autocast's lower-precision dtype (the matrix
// products as torch's own linear layers would under autocast); the softmax statistics and
// every accumulation stay float32 inside the kernels. float64 is left alone.
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor self_attention_autocast(const at::Tensor& x, const at::Tensor& qkv_weight,
                                   const std::optional<at::Tensor>& qkv_bias,
                                   const at::Tensor& out_weight,
                                   const std::optional<at::Tensor>& out_bias,
                                   const at::Tensor& gamma, int64_t qk_dim, int64_t num_heads,
                                   int64_t kv_stride) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::Tensor input = at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type);
  const auto dtype = input.scalar_type();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  auto cast_optional = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  };
  return self_attention(input, cast(qkv_weight), cast_optional(qkv_bias), cast(out_weight),
                        cast_optional(out_bias), cast(gamma), qk_dim, num_heads, kv_stride);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCPU, m) {
  m.impl("self_attention",
         TORCH_FN((self_attention_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCUDA, m) {
  m.impl("self_attention",
         TORCH_FN((self_attention_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace ops
}  // namespace cnn_attention
