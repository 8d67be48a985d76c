#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../channel_pool.h"

namespace cnn_attention {
namespace ops {

namespace {

// Same policy as channel_attention: run in autocast's lower-precision dtype (the kernels
// accumulate in float32), leave float64 alone.
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor channel_pool_autocast(const at::Tensor& x) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return channel_pool(at::autocast::cached_cast(
      at::autocast::get_lower_precision_fp_from_device_type(device_type), x, device_type));
}

}  // namespace

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCPU, m) {
  m.impl("channel_pool",
         TORCH_FN((channel_pool_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(cnn_attention, AutocastCUDA, m) {
  m.impl("channel_pool",
         TORCH_FN((channel_pool_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>)));
}

}  // namespace ops
}  // namespace cnn_attention
