// The files that tests/cpp/make_models.py writes (scripted models, their input and Python's
// outputs), for the C++ tests that load them.
#pragma once

#include <gtest/gtest.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace cnn_attention_test {

// The directory of the models (ctest sets CNN_ATTENTION_TEST_MODELS); empty when unset.
inline std::string models_dir() {
  const char* dir = std::getenv("CNN_ATTENTION_TEST_MODELS");
  return dir ? dir : "";
}

// A tensor that Python wrote with torch.save.
inline torch::Tensor load_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  EXPECT_TRUE(file.good()) << "missing " << path;
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

}  // namespace cnn_attention_test
