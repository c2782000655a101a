#include "omnilite/modules/text_decoder.h"

#include <string>

#include "omnilite/runtime.h"

namespace omnilite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Runs a decoder layer without keeping its activations; backward recomputes the layer with gradients on and
// back-propagates through the recomputation (parameter gradients accumulate there, the input gradient is
// returned). The recomputation must be the forward's function (as torch.utils.checkpoint with preserve_rng_state):
// the random generators are set back to their state at the forward (LoRA dropout draws the same masks, so top-2
// routing sees the same inputs) and restored afterwards (the recomputation consumes no randomness of the run), and
// the forward's CUDA autocast state is re-entered (backward runs outside the autocast region, on another thread).
struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  // x: [B, T, D] -> {y [B, T, D], router_logits [B*T, E]}
  // `allowed` comes by pointer: LibTorch 1.13 records every tensor argument as an input and fails on an undefined
  // one (text-only batches have no mask).
  static variable_list forward(AutogradContext* ctx, torch::Tensor x, DecoderLayerImpl* layer, torch::Tensor cos,
                               torch::Tensor sin, const torch::Tensor* allowed_ptr, bool causal) {
    const torch::Tensor& allowed = *allowed_ptr;
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["allowed"] = allowed;
    ctx->saved_data["causal"] = causal;
    const RngState rng = capture_rng({x.device()});
    ctx->saved_data["rng_cpu"] = rng.cpu;
    for (const auto& [index, state] : rng.cuda) ctx->saved_data["rng_cuda:" + std::to_string(index)] = state;
    const auto autocast = cuda_autocast_dtype();
    ctx->saved_data["autocast"] = autocast ? static_cast<int64_t>(*autocast) : int64_t{-1};
    ctx->save_for_backward({x});
    auto o = layer->forward(x, RopeTables{cos, sin}, allowed, causal);
    return {o.y, o.router_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    const auto& allowed_iv = ctx->saved_data["allowed"];
    const torch::Tensor allowed = allowed_iv.isTensor() ? allowed_iv.toTensor() : torch::Tensor();
    RngState forward_rng;
    forward_rng.cpu = ctx->saved_data["rng_cpu"].toTensor();
    if (x.is_cuda()) {
      const auto key = "rng_cuda:" + std::to_string(x.device().index());
      forward_rng.cuda.emplace_back(x.device().index(), ctx->saved_data[key].toTensor());
    }
    const RngState now = capture_rng({x.device()});
    const int64_t autocast = ctx->saved_data["autocast"].toInt();
    variable_list outs, gs;
    {
      restore_rng(forward_rng);
      torch::AutoGradMode enable(true);
      AutocastGuard amp(autocast >= 0, autocast >= 0 ? static_cast<torch::ScalarType>(autocast) : torch::kBFloat16);
      auto o = layer->forward(x, RopeTables{ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor()},
                              allowed, ctx->saved_data["causal"].toBool());
      if (grads[0].defined()) { outs.push_back(o.y); gs.push_back(grads[0]); }
      if (grads[1].defined()) { outs.push_back(o.router_logits); gs.push_back(grads[1]); }
    }
    restore_rng(now);
    if (!outs.empty()) torch::autograd::backward(outs, gs);
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};  // per input
  }
};

}  // namespace

TextDecoderImpl::TextDecoderImpl(const TextOptions& text, const MoEOptions& moe, const LinearBuilder& builder,
                                 const std::string& path)
    : opts(text) {
  embed_tokens = register_module("embed_tokens", TokenEmbedding(text.vocab_size, text.hidden_size));
  for (int64_t i = 0; i < text.num_layers; ++i)
    layers->push_back(DecoderLayer(text, moe, builder, join_path(path, "layers." + std::to_string(i))));
  register_module("layers", layers);
  norm = register_module("norm", RMSNorm(text.hidden_size, text.rms_norm_eps));
}

// x: [B, T, D] -> hidden [B, T, D]
TextDecoderOutput TextDecoderImpl::forward(const torch::Tensor& x, const torch::Tensor& positions,
                                           const torch::Tensor& allowed, bool causal, KVCache* cache) {
  const int64_t past = cache ? cache->length() : 0;
  if (cache && cache->layers.empty()) cache->layers.resize(layers->size());
  TORCH_CHECK(past + x.size(1) <= opts.max_position_embeddings, "TextDecoder: sequence of ", past + x.size(1),
              " tokens exceeds model.text.max_position_embeddings = ", opts.max_position_embeddings,
              "; hint: shorten the input or raise the limit in the config");
  auto rope = rope_tables(positions, opts.rope_dim, opts.rope_theta, x.scalar_type());
  TextDecoderOutput out;
  auto h = x;
  for (size_t i = 0; i < layers->size(); ++i) {
    auto* l = layers[i]->as<DecoderLayerImpl>();
    if (checkpoint_layers && torch::GradMode::is_enabled() && is_training() && !cache) {
      // The recomputation only runs when the function is part of the graph: give it an input that needs grad.
      if (!h.requires_grad()) h = h.detach().requires_grad_(true);
      auto o = CheckpointedLayer::apply(h, l, rope.cos, rope.sin, &allowed, causal);
      h = o[0];
      out.router_logits.push_back(o[1]);
    } else {
      auto o = l->forward(h, rope, allowed, causal, cache ? &cache->layers[i] : nullptr, cache ? cache->append : true);
      h = o.y;
      out.router_logits.push_back(o.router_logits);
    }
  }
  out.hidden = norm->forward(h);
  return out;
}

}  // namespace omnilite
