#include "cbam.h"

#include "../ops/channel_attention.h"

namespace cnn_attention {
namespace nn {

CBAMImpl::CBAMImpl(CBAMOptions options_) : options(std::move(options_)) { reset(); }

void CBAMImpl::reset() {
  channel = register_module("channel", ChannelAttention(ChannelAttentionOptions(options.channels())
                                                            .reduction(options.reduction())
                                                            .min_hidden(options.min_hidden())
                                                            .pool("avgmax")));
  spatial = register_module("spatial", SoftAttention(SoftAttentionOptions()
                                                         .kernel_size(options.kernel_size())
                                                         .spatial_dims(options.spatial_dims())));
}

torch::Tensor CBAMImpl::forward(const torch::Tensor& x) {
  const int64_t dims = options.spatial_dims();
  TORCH_CHECK(x.dim() == dims + 2, "CBAM: x must be (N, C, *S) with ", dims,
              " spatial dims (spatial_dims), got ", x.dim(), " dims");
  return ops::cbam(x, channel->fc1_weight, channel->fc1_bias, channel->fc2_weight,
                   channel->fc2_bias, spatial->scores->weight, spatial->scores->bias,
                   channel->options.gate(), channel->options.activation());
}

void CBAMImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::CBAM(" << options.channels() << ")";
}

}  // namespace nn
}  // namespace cnn_attention
