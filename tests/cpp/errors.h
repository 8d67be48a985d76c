// The message of the c10::Error a call raises, for the tests of error messages.
#pragma once

#include <c10/util/Exception.h>

#include <functional>
#include <string>

namespace cnn_attention_test {

// What `f` raised without the backtrace; empty when it raised nothing.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace cnn_attention_test
