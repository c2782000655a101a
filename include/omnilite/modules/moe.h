// Sparse mixture-of-experts feed-forward, Mixtral semantics.
//
// N = tokens (B*T flattened), D = width, E = experts, K = top_k, F = expert hidden width.
//   router_logits = gate(x)                       [N, E]
//   p = softmax(router_logits in fp32)            [N, E]
//   (w, e) = topk(p, K); w /= sum(w)              [N, K]
//   y[n] = sum_k w[n,k] * expert_{e[n,k]}(x[n]),  expert(x) = w2(silu(w1 x) * w3 x)
// Dispatch sorts the N*K token-slots by expert; the experts then run on their contiguous slices in one of two ways
// (MoEDispatch): a loop over the experts, or grouped GEMMs over their stacked weights.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

// One SwiGLU expert: w2(silu(w1 x) * w3 x).
struct SwiGLUExpertImpl : torch::nn::Module {
  SwiGLUExpertImpl(int64_t dim, int64_t hidden, const LinearBuilder& builder, const std::string& path);
  // x: [n, D] -> [n, D]
  torch::Tensor forward(const torch::Tensor& x);

  std::shared_ptr<LinearBaseImpl> w1;  // D -> F (gate branch)
  std::shared_ptr<LinearBaseImpl> w2;  // F -> D (down projection)
  std::shared_ptr<LinearBaseImpl> w3;  // D -> F (up branch)
};
TORCH_MODULE(SwiGLUExpert);

// How MoEImpl::forward runs the experts. Only the implementation differs: outputs agree to rounding, parameters and
// checkpoints are the same. Each MoE module holds its own choice (MoEImpl::dispatch; set_moe_dispatch sets a whole
// model's from runtime.moe_dispatch).
enum class MoEDispatch {
  Auto,     // Grouped where it pays (CUDA, bf16 compute, plain experts, LibTorch >= 2.9, aligned widths), else Loop
  Loop,     // each expert's SwiGLU on its slice: 3 GEMMs per expert, the per-expert counts read back to the host
            // once per layer (a device sync on CUDA); works with every projection variant (plain, LoRA, NF4)
  Grouped,  // at::_grouped_mm over the stacked expert weights with on-device offsets: 2 grouped GEMMs per layer,
            // no host sync; plain experts only, LibTorch >= 2.9, D and F multiples of 16 bytes' worth of elements
};
// "auto" | "loop" | "grouped" -> MoEDispatch; throws std::invalid_argument naming the value.
MoEDispatch parse_moe_dispatch(const std::string& name);
const char* moe_dispatch_name(MoEDispatch d);
// Whether this build has the grouped path (compiled against LibTorch >= 2.9, which has at::_grouped_mm on CPU and
// CUDA with its derivative).
bool moe_grouped_available();
// MoE layer forwards by the path they took (what a benchmark reports, so that a figure says which path produced it).
struct MoEPathCounts {
  int64_t loop = 0;     // forwards through loop_experts
  int64_t grouped = 0;  // forwards through grouped_experts
};
// Sets the dispatch of every MoE module in `model` (the model itself included).
void set_moe_dispatch(torch::nn::Module& model, MoEDispatch d);
// The forwards of every MoE module in `model` so far, summed.
MoEPathCounts moe_path_counts(const torch::nn::Module& model);

struct MoEOutput {
  torch::Tensor y;              // [B, T, D]
  torch::Tensor router_logits;  // [B*T, E], before softmax (for the balancing and z losses)
};

struct MoEImpl : torch::nn::Module {
  MoEImpl(int64_t dim, const MoEOptions& opts, const LinearBuilder& builder, const std::string& path);
  // x: [B, T, D] -> y: [B, T, D], router_logits: [B*T, E]
  MoEOutput forward(const torch::Tensor& x);
  // Routing alone: x [N, D] -> weights [N, K] (renormalised, x's dtype) and expert ids [N, K] (int64).
  std::pair<torch::Tensor, torch::Tensor> route(const torch::Tensor& router_logits) const;
  // Whether forward(x) takes the grouped path under `dispatch`; throws std::runtime_error naming
  // the reason when Grouped is asked for and x or the experts cannot take it.
  bool uses_grouped(const torch::Tensor& x) const;

  MoEOptions opts;
  torch::nn::Linear gate{nullptr};  // router D -> E, no bias; always full precision
  torch::nn::ModuleList experts;    // E SwiGLU experts, registered as experts.0 .. experts.E-1
  MoEDispatch dispatch = MoEDispatch::Auto;  // how forward runs the experts (a run-time choice, not a weight)
  MoEPathCounts forwards;                    // this module's forwards so far, by path

 private:
  // xs [S, D] slots in expert order, counts [E] -> [S, D]: expert e on its slice, one after the other.
  torch::Tensor loop_experts(const torch::Tensor& xs, const torch::Tensor& counts);
  // xs [S, D] slots in expert order, counts [E] -> [S, D]: two grouped GEMMs (w1|w3 fused, then w2).
  torch::Tensor grouped_experts(const torch::Tensor& xs, const torch::Tensor& counts);
  // Why the grouped path cannot run x through these experts; empty when it can.
  std::string grouped_obstacle(const torch::Tensor& x) const;

  bool plain_experts_ = false;  // every expert projection is a bias-free PlainLinear (no LoRA, no NF4)
};
TORCH_MODULE(MoE);

}  // namespace omnilite
