// Loads a model that uses cnn_attention operators and runs it, with no Python: a TorchScript
// file (MODEL.pt) or an AOTInductor package (MODEL.pt2, from torch.export and
// torch._inductor.aoti_compile_and_package; its compiled code calls our operators through the
// dispatcher, which is why the library must be linked here too).
//
//   run_model MODEL.pt|MODEL.pt2 INPUT.pt [--expect EXPECTED.pt] [--atol 1e-5] [--save OUTPUT.pt]
//
// INPUT.pt and EXPECTED.pt are tensors written by Python's torch.save. With --expect the
// program exits 1 when the largest difference exceeds --atol. Including the library's
// header is what keeps it linked (and its operators registered) under --as-needed.
#include <cnn_attention/cnn_attention.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

torch::Tensor load_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

torch::Tensor run(const std::string& model_path, const torch::Tensor& input) {
  torch::NoGradGuard no_grad;
  if (ends_with(model_path, ".pt2")) {
    torch::inductor::AOTIModelPackageLoader package(model_path);
    return package.run({input}).at(0);
  }
  torch::jit::Module model = torch::jit::load(model_path);
  model.eval();
  return model.forward({input}).toTensor();
}

void save_tensor(const torch::Tensor& t, const std::string& path) {
  const std::vector<char> bytes = torch::pickle_save(t);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0]
              << " MODEL.pt|MODEL.pt2 INPUT.pt [--expect EXPECTED.pt] [--atol 1e-5] [--save OUTPUT.pt]\n";
    return 2;
  }
  std::string expect_path, save_path;
  double atol = 1e-5;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--expect") expect_path = argv[i + 1];
    else if (flag == "--save") save_path = argv[i + 1];
    else if (flag == "--atol") atol = std::atof(argv[i + 1]);
    else {
      std::cerr << "unknown option " << flag << "\n";
      return 2;
    }
  }
  try {
    const torch::Tensor output = run(argv[1], load_tensor(argv[2]));
    std::cout << "cnn_attention " << cnn_attention::build_info() << "\n"
              << "output " << output.sizes() << " sum " << output.sum().item<double>() << "\n";
    if (!save_path.empty()) save_tensor(output, save_path);
    if (!expect_path.empty()) {
      const torch::Tensor expected = load_tensor(expect_path);
      if (!expected.sizes().equals(output.sizes())) {
        std::cout << "MISMATCH: expected sizes " << expected.sizes() << "\n";
        return 1;
      }
      const double diff = (output.to(torch::kDouble) - expected.to(torch::kDouble)).abs().max().item<double>();
      std::cout << "max abs difference from Python " << diff << (diff <= atol ? " (match)" : " MISMATCH") << "\n";
      return diff <= atol ? 0 : 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "run_model: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
