#include "omnilite/modules/text_decoder.h"

#include <string>

#include "omnilite/modules/recompute.h"

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
// With a LayerGate (ZeRO-3) the layer's parameters are gathered for the forward and for the recomputation, released
// after the forward, and handed over with their gradients after the backward.
struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  // x: [B, T, D] -> {y [B, T, D], router_logits [B*T, E]}
  // `allowed` comes by pointer: LibTorch 1.13 records every tensor argument as an input and fails on an undefined
  // one (text-only batches have no mask).
  static variable_list forward(AutogradContext* ctx, torch::Tensor x, DecoderLayerImpl* layer, torch::Tensor cos,
                               torch::Tensor sin, const torch::Tensor* allowed_ptr, bool causal, LayerGate* gate,
                               int64_t index) {
    const torch::Tensor& allowed = *allowed_ptr;
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["gate"] = reinterpret_cast<int64_t>(gate);
    ctx->saved_data["index"] = index;
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["allowed"] = allowed;
    ctx->saved_data["causal"] = causal;
    save_forward_state(ctx, x.device());
    ctx->save_for_backward({x});
    if (gate) {
      gate->gather(static_cast<size_t>(index));
      gate->prefetch(static_cast<size_t>(index) + 1);
    }
    auto o = layer->forward(x, RopeTables{cos, sin}, allowed, causal);
    if (gate) gate->release(static_cast<size_t>(index));
    return {o.y, o.router_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    auto* gate = reinterpret_cast<LayerGate*>(ctx->saved_data["gate"].toInt());
    const auto index = static_cast<size_t>(ctx->saved_data["index"].toInt());
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    const auto& allowed_iv = ctx->saved_data["allowed"];
    const torch::Tensor allowed = allowed_iv.isTensor() ? allowed_iv.toTensor() : torch::Tensor();
    variable_list outs, gs;
    if (gate) {
      gate->gather(index);
      if (index > 0) gate->prefetch(index - 1);  // backward runs the layers in reverse
    }
    {
      RecomputeScope recompute(ctx, x.device());
      auto o = layer->forward(x, RopeTables{ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor()},
                              allowed, ctx->saved_data["causal"].toBool());
      if (grads[0].defined()) { outs.push_back(o.y); gs.push_back(grads[0]); }
      if (grads[1].defined()) { outs.push_back(o.router_logits); gs.push_back(grads[1]); }
    }
    if (!outs.empty()) torch::autograd::backward(outs, gs);
    if (gate) gate->after_backward(index);
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor(), torch::Tensor()};  // per input
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
    const bool grad = torch::GradMode::is_enabled();
    if ((checkpoint_layers || gate) && grad && is_training() && !cache) {
      // The recomputation only runs when the function is part of the graph: give it an input that needs grad.
      if (!h.requires_grad()) h = h.detach().requires_grad_(true);
      auto o = CheckpointedLayer::apply(h, l, rope.cos, rope.sin, &allowed, causal, gate.get(),
                                        static_cast<int64_t>(i));
      h = o[0];
      out.router_logits.push_back(o[1]);
    } else {
      TORCH_CHECK(!gate || !grad, "TextDecoder: layers with sharded parameters (train.zero = 3) run with gradients "
                  "only in training mode; hint: call eval() paths under torch::NoGradGuard");
      if (gate) {
        gate->gather(i);
        gate->prefetch(i + 1);
      }
      auto o = l->forward(h, rope, allowed, causal, cache ? &cache->layers[i] : nullptr, cache ? cache->append : true);
      if (gate) gate->release(i);
      h = o.y;
      out.router_logits.push_back(o.router_logits);
    }
  }
  out.hidden = norm->forward(h);
  return out;
}

}  // namespace omnilite
