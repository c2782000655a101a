// One text decoder layer (Mixtral): h = x + attn(rms(x)); y = h + moe(rms(h)).
#pragma once

#include <torch/torch.h>

#include "omnilite/modules/attention.h"
#include "omnilite/modules/moe.h"
#include "omnilite/modules/rms_norm.h"

namespace omnilite {

struct DecoderLayerOutput {
  torch::Tensor y;              // [B, T, D]
  torch::Tensor router_logits;  // [B*T, E]
};

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const TextOptions& text, const MoEOptions& moe, const LinearBuilder& builder,
                   const std::string& path);
  // x: [B, T, D], rope tables for T positions, allowed/causal as attention_core -> y: [B, T, D]
  DecoderLayerOutput forward(const torch::Tensor& x, const RopeTables& rope, const torch::Tensor& allowed,
                             bool causal, LayerKV* cache = nullptr, bool append = true);

  RMSNorm input_layernorm{nullptr};           // before attention
  GQAttention self_attn{nullptr};             // grouped-query attention with RoPE
  RMSNorm post_attention_layernorm{nullptr};  // before the MoE
  MoE moe{nullptr};                           // sparse SwiGLU experts (Mixtral's block_sparse_moe)
};
TORCH_MODULE(DecoderLayer);

}  // namespace omnilite
