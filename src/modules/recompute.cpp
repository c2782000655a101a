#include "omnilite/modules/recompute.h"

#include <string>

namespace omnilite {

void save_forward_state(torch::autograd::AutogradContext* ctx, torch::Device device) {
  const RngState rng = capture_rng({device});
  ctx->saved_data["rng_cpu"] = rng.cpu;
  for (const auto& [index, state] : rng.cuda) ctx->saved_data["rng_cuda:" + std::to_string(index)] = state;
  const auto autocast = cuda_autocast_dtype();
  ctx->saved_data["autocast"] = autocast ? static_cast<int64_t>(*autocast) : int64_t{-1};
}

RecomputeScope::RecomputeScope(torch::autograd::AutogradContext* ctx, torch::Device device)
    : before_(capture_rng({device})) {
  RngState forward_rng;
  forward_rng.cpu = ctx->saved_data["rng_cpu"].toTensor();
  if (device.is_cuda()) {
    const auto key = "rng_cuda:" + std::to_string(device.index());
    forward_rng.cuda.emplace_back(device.index(), ctx->saved_data[key].toTensor());
  }
  restore_rng(forward_rng);
  grad_ = std::make_unique<torch::AutoGradMode>(true);
  const int64_t autocast = ctx->saved_data["autocast"].toInt();
  amp_ = std::make_unique<AutocastGuard>(autocast >= 0,
                                         autocast >= 0 ? static_cast<torch::ScalarType>(autocast) : torch::kBFloat16);
}

RecomputeScope::~RecomputeScope() {
  amp_.reset();
  grad_.reset();
  restore_rng(before_);
}

}  // namespace omnilite
