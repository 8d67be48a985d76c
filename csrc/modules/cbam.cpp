#include "cbam.h"

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
  return spatial->forward(channel->forward(x));
}

void CBAMImpl::pretty_print(std::ostream& stream) const {
  stream << "cnn_attention::nn::CBAM(" << options.channels() << ")";
}

}  // namespace nn
}  // namespace cnn_attention
