#pragma once

// The two links between the dispatcher and this library's functions.

#include <ATen/core/dispatch/Dispatcher.h>

namespace cnn_attention {
namespace ops {

// The typed handle of a registered operator, for the C++ functions that call the dispatcher
// (each caches it in a function-local static).
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Fn>();
}

// A backend's kernel for an operator: `kPass` is the device-independent implementation
// (<family>_impl.cpp), whose first parameter is the functions a backend supplies, and
// `kBackend` one backend's set of them (kCpuBackend, kCudaBackend). OnBackend::kernel has the
// operator's own signature, so that TORCH_FN registers it with no boxing:
//   m.impl("channel_pool", TORCH_FN((OnBackend<channel_pool_forward, kBackend>::kernel)));
template <auto kPass, const auto& kBackend, typename Pass = decltype(kPass)>
struct OnBackend;

template <auto kPass, const auto& kBackend, typename Backend, typename Result, typename... Args>
struct OnBackend<kPass, kBackend, Result (*)(const Backend&, Args...)> {
  static Result kernel(Args... args) { return kPass(kBackend, args...); }
};

}  // namespace ops
}  // namespace cnn_attention
