// What a recomputation needs to be the forward's function (as torch.utils.checkpoint with preserve_rng_state): the
// random generators and the CUDA autocast state at the forward, kept in the autograd context of a custom function
// whose backward runs the forward again (activation checkpointing, ZeRO-3's gathered blocks).
#pragma once

#include <memory>

#include <torch/torch.h>

#include "omnilite/runtime.h"

namespace omnilite {

// Keeps the generators of `device` (and the CPU's) and the autocast state in ctx->saved_data.
void save_forward_state(torch::autograd::AutogradContext* ctx, torch::Device device);

// While alive: the generators as at the forward, gradients on, the forward's autocast state entered. Afterwards the
// generators are back where they were (the recomputation consumes no randomness of the run).
class RecomputeScope {
 public:
  RecomputeScope(torch::autograd::AutogradContext* ctx, torch::Device device);
  ~RecomputeScope();
  RecomputeScope(const RecomputeScope&) = delete;
  RecomputeScope& operator=(const RecomputeScope&) = delete;

 private:
  RngState before_;
  std::unique_ptr<torch::AutoGradMode> grad_;
  std::unique_ptr<AutocastGuard> amp_;
};

}  // namespace omnilite
