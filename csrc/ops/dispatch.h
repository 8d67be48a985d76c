#pragma once

// The typed handle of a registered operator, for the C++ functions that call the dispatcher
// (each caches it in a function-local static).

#include <ATen/core/dispatch/Dispatcher.h>

namespace cnn_attention {
namespace ops {

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Fn>();
}

}  // namespace ops
}  // namespace cnn_attention
