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

#include "omnilite/modules/layer_gate.h"

namespace omnilite {

// ZeRO-3: a block whose parameters are gathered for its forward (run without keeping activations) and again for its
// backward, which recomputes the forward exactly (RecomputeScope) and hands the gradients over (layer_gate.h).
// Block::forward takes `Inputs` tensors (one: x; two: media and x) and returns one. A one-input block is applied as
// apply(x, x, ...): LibTorch 1.13 records every tensor argument as an input and refuses an undefined one.
template <class Block, int Inputs>
struct GatedBlock : torch::autograd::Function<GatedBlock<Block, Inputs>> {
  using Ctx = torch::autograd::AutogradContext;
  // a: [N, P, W] (the input, or media), b: [N, L, W] (the latents; a again for one input) -> y like the last input
  static torch::autograd::variable_list forward(Ctx* ctx, torch::Tensor a, torch::Tensor b, Block* block,
                                                LayerGate* gate, int64_t index) {
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    ctx->saved_data["gate"] = reinterpret_cast<int64_t>(gate);
    ctx->saved_data["index"] = index;
    save_forward_state(ctx, a.device());
    ctx->save_for_backward({a, b});
    gate->gather(static_cast<size_t>(index));
    gate->prefetch(static_cast<size_t>(index) + 1);
    auto y = run(block, a, b);
    gate->release(static_cast<size_t>(index));
    return {y};
  }

  static torch::autograd::variable_list backward(Ctx* ctx, torch::autograd::variable_list grads) {
    auto* block = reinterpret_cast<Block*>(ctx->saved_data["block"].toInt());
    auto* gate = reinterpret_cast<LayerGate*>(ctx->saved_data["gate"].toInt());
    const auto index = static_cast<size_t>(ctx->saved_data["index"].toInt());
    const auto saved = ctx->get_saved_variables();
    auto a = saved[0].detach().requires_grad_(true);
    auto b = Inputs == 2 ? saved[1].detach().requires_grad_(true) : a;
    gate->gather(index);
    if (index > 0) gate->prefetch(index - 1);  // backward runs the blocks in reverse
    torch::Tensor y;
    {
      RecomputeScope recompute(ctx, a.device());
      y = run(block, a, b);
    }
    if (grads[0].defined()) torch::autograd::backward({y}, {grads[0]});
    gate->after_backward(index);
    return {a.grad(), Inputs == 2 ? b.grad() : torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }

 private:
  static torch::Tensor run(Block* block, const torch::Tensor& a, const torch::Tensor& b) {
    if constexpr (Inputs == 2) return block->forward(a, b);
    else return block->forward(a);
  }
};

// Block `index` of a block list under `gate`: through GatedBlock when gradients are on in training (an input that
// needs no gradient is given one, so that the recomputation is part of the graph), else gathered around a plain
// forward. `b` is ignored for one-input blocks.
template <class Block, int Inputs>
torch::Tensor gated_forward(Block* block, LayerGate& gate, size_t index, torch::Tensor a, torch::Tensor b,
                            bool training) {
  if (torch::GradMode::is_enabled() && training) {
    if (!a.requires_grad()) a = a.detach().requires_grad_(true);
    if (Inputs == 1) b = a;
    else if (!b.requires_grad()) b = b.detach().requires_grad_(true);
    return GatedBlock<Block, Inputs>::apply(a, b, block, &gate, static_cast<int64_t>(index))[0];
  }
  TORCH_CHECK(!torch::GradMode::is_enabled(), "blocks with sharded parameters (train.zero = 3) run with gradients "
              "only in training mode; hint: call eval() paths under torch::NoGradGuard");
  gate.gather(index);
  gate.prefetch(index + 1);
  torch::Tensor y;
  if constexpr (Inputs == 2) y = block->forward(a, b);
  else y = block->forward(a);
  gate.release(index);
  return y;
}

}  // namespace omnilite
