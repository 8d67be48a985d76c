// The C++ modules accept and refuse the options of tests/shared/module_options.txt as the table
// says; the Python modules are held to the same table (tests/python/test_module_options.py),
// so the two accept and refuse the same options.
#include <cnn_attention/cnn_attention.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"

namespace {

namespace cnn = cnn_attention::nn;
using cnn_attention_test::error_of;

using Options = std::map<std::string, std::string>;

double real(const std::string& text) {
  if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
  if (text == "inf") return std::numeric_limits<double>::infinity();
  return std::stod(text);
}

// Sets each option by name on an options object; an unknown name fails the test.
template <typename ModuleOptions>
using Setters = std::map<std::string, std::function<void(ModuleOptions&, const std::string&)>>;

template <typename ModuleOptions>
ModuleOptions with(ModuleOptions options, const Options& values,
                   const Setters<ModuleOptions>& setters) {
  for (const auto& [name, text] : values) {
    const auto setter = setters.find(name);
    EXPECT_NE(setter, setters.end()) << "no setter for option " << name;
    if (setter != setters.end()) setter->second(options, text);
  }
  return options;
}

// A setter entry for an integer, real or word option (the option's name is its setter's).
// clang-format off
#define INT_OPTION(Type, name) {#name, [](Type& o, const std::string& v) { o.name(std::stoll(v)); }}
#define REAL_OPTION(Type, name) {#name, [](Type& o, const std::string& v) { o.name(real(v)); }}
#define WORD_OPTION(Type, name) {#name, [](Type& o, const std::string& v) { o.name(v); }}
// clang-format on

// Builds `module` with `values` over the table's defaults.
void build(const std::string& module, const Options& values) {
  if (module == "ChannelAttention") {
    using O = cnn::ChannelAttentionOptions;
    const Setters<O> setters{INT_OPTION(O, channels), INT_OPTION(O, reduction),
                             INT_OPTION(O, min_hidden), WORD_OPTION(O, pool), WORD_OPTION(O, gate),
                             WORD_OPTION(O, activation)};
    cnn::ChannelAttention(with(O(16), values, setters));
  } else if (module == "ChannelGate") {
    using O = cnn::ChannelGateOptions;
    const Setters<O> setters{WORD_OPTION(O, gate)};
    cnn::ChannelGate(with(O(), values, setters));
  } else if (module == "SoftAttention") {
    using O = cnn::SoftAttentionOptions;
    const Setters<O> setters{INT_OPTION(O, kernel_size), WORD_OPTION(O, normalize),
                             REAL_OPTION(O, temperature), INT_OPTION(O, spatial_dims)};
    cnn::SoftAttention(with(O(), values, setters));
  } else if (module == "HardAttention") {
    using O = cnn::HardAttentionOptions;
    const Setters<O> setters{INT_OPTION(O, kernel_size),  WORD_OPTION(O, mode),
                             REAL_OPTION(O, threshold),   INT_OPTION(O, k),
                             REAL_OPTION(O, keep_ratio),  WORD_OPTION(O, estimator),
                             REAL_OPTION(O, temperature), REAL_OPTION(O, noise),
                             INT_OPTION(O, spatial_dims)};
    cnn::HardAttention(with(O(), values, setters));
  } else if (module == "SelfAttention") {
    using O = cnn::SelfAttentionOptions;
    const Setters<O> setters{INT_OPTION(O, channels),     INT_OPTION(O, num_heads),
                             INT_OPTION(O, qk_reduction), INT_OPTION(O, v_reduction),
                             INT_OPTION(O, kv_stride),    REAL_OPTION(O, gamma_init)};
    cnn::SelfAttention(with(O(16), values, setters));
  } else if (module == "CBAM") {
    using O = cnn::CBAMOptions;
    const Setters<O> setters{INT_OPTION(O, channels), INT_OPTION(O, reduction),
                             INT_OPTION(O, min_hidden), INT_OPTION(O, kernel_size),
                             INT_OPTION(O, spatial_dims)};
    cnn::CBAM(with(O(16), values, setters));
  } else {
    ADD_FAILURE() << "unknown module " << module;
  }
}

TEST(ModuleOptions, AcceptAndRefuseAsTheSharedTable) {
  std::ifstream table(CNN_ATTENTION_MODULE_OPTIONS);
  ASSERT_TRUE(table.good()) << "missing " << CNN_ATTENTION_MODULE_OPTIONS;
  std::string line;
  int cases = 0;
  for (int number = 1; std::getline(table, line); ++number) {
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::vector<std::string> parts;
    for (std::string word; words >> word;) parts.push_back(word);
    if (parts.empty()) continue;
    ASSERT_GE(parts.size(), 2u) << "line " << number;
    const std::string module = parts.front(), verdict = parts.back();
    ASSERT_TRUE(verdict == "yes" || verdict == "no") << "line " << number;
    Options values;
    for (size_t i = 1; i + 1 < parts.size(); ++i) {
      const auto equals = parts[i].find('=');
      ASSERT_NE(equals, std::string::npos) << "line " << number;
      values[parts[i].substr(0, equals)] = parts[i].substr(equals + 1);
    }
    const std::string error = error_of([&] { build(module, values); });
    if (verdict == "yes") {
      EXPECT_EQ(error, "") << "line " << number << ": " << line;
    } else {
      EXPECT_NE(error, "") << "line " << number << " was accepted: " << line;
    }
    ++cases;
  }
  EXPECT_GT(cases, 50);
}

}  // namespace
