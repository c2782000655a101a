// Shared helpers of the test suite: config loading, error measures and a finite-difference gradient check.
#pragma once

#include <filesystem>
#include <functional>
#include <string>

#include <torch/torch.h>

#include "omnilite/config.h"

namespace testing {

inline std::string source_path(const std::string& rel) { return std::string(OMNILITE_SOURCE_DIR) + "/" + rel; }

// A fresh, empty folder under the system temp dir for one test.
inline std::string fresh_temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("omnilite_test_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

inline omnilite::Config load(const std::string& rel) { return omnilite::load_config_file(source_path(rel)); }

// max |a - b| / max(1, max |b|): the normalised error the tests report.
inline double max_rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  auto bd = b.to(torch::kFloat64);
  auto scale = std::max(1.0, bd.abs().max().item<double>());
  return (a.to(torch::kFloat64) - bd).abs().max().item<double>() / scale;
}

// Central finite differences of loss() w.r.t. `n` entries of `param` (float64), against autograd.
// Returns the largest |fd - autograd| / max(1e-3, |autograd|) over the sampled entries.
inline double finite_difference_error(const std::function<torch::Tensor()>& loss, torch::Tensor param, int n,
                                      double eps = 1e-6) {
  param.mutable_grad() = torch::Tensor();
  auto l = loss();
  auto grad = torch::autograd::grad({l}, {param})[0];
  auto flat = param.data().view(-1);
  double worst = 0.0;
  torch::NoGradGuard ng;
  for (int i = 0; i < n; ++i) {
    const int64_t k = (i * 7919) % flat.numel();
    const double orig = flat[k].item<double>();
    flat[k] = orig + eps;
    const double up = loss().item<double>();
    flat[k] = orig - eps;
    const double down = loss().item<double>();
    flat[k] = orig;
    const double fd = (up - down) / (2 * eps);
    const double ad = grad.view(-1)[k].item<double>();
    worst = std::max(worst, std::abs(fd - ad) / std::max(1e-3, std::abs(ad)));
  }
  return worst;
}

}  // namespace testing
