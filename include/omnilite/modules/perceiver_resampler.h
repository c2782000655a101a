// Perceiver Resampler (card layer 3, Flamingo's structure): num_latents learned queries attend to the image
// features and to themselves, producing a fixed set of num_latents tokens of the text width.
//   media = proj_in(features)                                   [N, P, D]
//   repeat depth times:
//     latents += to_out(attn(q = to_q(LN(latents)), kv = to_kv(concat(LN(media), LN(latents)))))
//     latents += fc2(GELU(fc1(LN(latents))))
//   out = LN(latents)                                           [N, L, D]
#pragma once

#include <memory>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/layer_gate.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

struct PerceiverAttentionImpl : torch::nn::Module {
  PerceiverAttentionImpl(int64_t dim, const ResamplerOptions& opts, const LinearBuilder& builder,
                         const std::string& path);
  // media: [N, P, D], latents: [N, L, D] -> [N, L, D] (the residual update)
  torch::Tensor forward(const torch::Tensor& media, const torch::Tensor& latents);

  int64_t num_heads;
  torch::nn::LayerNorm norm_media{nullptr};
  torch::nn::LayerNorm norm_latents{nullptr};
  std::shared_ptr<LinearBaseImpl> to_q;    // D -> D, no bias
  std::shared_ptr<LinearBaseImpl> to_kv;   // D -> 2D, no bias (keys and values)
  std::shared_ptr<LinearBaseImpl> to_out;  // D -> D, no bias
};
TORCH_MODULE(PerceiverAttention);

struct ResamplerFeedForwardImpl : torch::nn::Module {
  ResamplerFeedForwardImpl(int64_t dim, const ResamplerOptions& opts, const LinearBuilder& builder,
                           const std::string& path);
  // x: [N, L, D] -> [N, L, D] (the residual update)
  torch::Tensor forward(const torch::Tensor& x);

  torch::nn::LayerNorm norm{nullptr};
  std::shared_ptr<LinearBaseImpl> fc1;  // D -> ff_mult*D, no bias
  std::shared_ptr<LinearBaseImpl> fc2;  // ff_mult*D -> D, no bias
};
TORCH_MODULE(ResamplerFeedForward);

struct PerceiverResamplerImpl : torch::nn::Module {
  PerceiverResamplerImpl(int64_t vision_width, int64_t dim, const ResamplerOptions& opts,
                         const LinearBuilder& builder, const std::string& path);
  // features: [N, P, vision_width] -> [N, num_latents, D]
  torch::Tensor forward(const torch::Tensor& features);

  std::shared_ptr<LinearBaseImpl> proj_in;  // vision_width -> D, with bias
  torch::Tensor latents;                    // [num_latents, D], normal(0, 0.02)
  torch::nn::ModuleList attn_layers;        // depth PerceiverAttention
  torch::nn::ModuleList ff_layers;          // depth ResamplerFeedForward
  torch::nn::LayerNorm norm{nullptr};       // final LayerNorm
  // ZeRO-3 (train.zero = 3): attention layer i / feed-forward layer i gathered around each use (layer_gate.h);
  // null otherwise.
  std::shared_ptr<LayerGate> attn_gate, ff_gate;
};
TORCH_MODULE(PerceiverResampler);

}  // namespace omnilite
