// Vision Transformer (card layer 2): patch embedding, `depth` pre-norm blocks, final LayerNorm.
// Block: x = x + proj(MHA(LN(x))); x = x + fc2(GELU(fc1(LN(x)))). Attention is bidirectional over patches.
// CLIP's variant (vision.class_token, pre_norm, activation = quick_gelu, final_norm = false) is the same blocks:
// CLIP's separate q, k and v projections are the rows of the fused qkv (io/part_import concatenates them).
#pragma once

#include <memory>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/layer_gate.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/patch_embed.h"

namespace omnilite {

struct ViTBlockImpl : torch::nn::Module {
  ViTBlockImpl(const VisionOptions& opts, const LinearBuilder& builder, const std::string& path);
  // x: [N, P, W] -> [N, P, W]
  torch::Tensor forward(const torch::Tensor& x);

  int64_t num_heads;
  bool quick_gelu;                       // vision.activation = "quick_gelu"
  torch::nn::LayerNorm norm1{nullptr};
  std::shared_ptr<LinearBaseImpl> qkv;   // W -> 3W, with bias (fused q, k, v as in timm)
  std::shared_ptr<LinearBaseImpl> proj;  // W -> W, with bias
  torch::nn::LayerNorm norm2{nullptr};
  std::shared_ptr<LinearBaseImpl> fc1;   // W -> mlp_dim
  std::shared_ptr<LinearBaseImpl> fc2;   // mlp_dim -> W
};
TORCH_MODULE(ViTBlock);

struct VisionEncoderImpl : torch::nn::Module {
  VisionEncoderImpl(const VisionOptions& opts, const LinearBuilder& builder, const std::string& path);
  // images: [N, C, H, W] -> features [N, P, W], P = (H/patch) * (W/patch) (+ 1 with a class token)
  torch::Tensor forward(const torch::Tensor& images);

  PatchEmbed patch_embed{nullptr};
  torch::nn::LayerNorm pre_norm{nullptr};  // vision.pre_norm only
  torch::nn::ModuleList blocks;            // depth ViT blocks: blocks.0 .. blocks.{depth-1}
  torch::nn::LayerNorm norm{nullptr};      // vision.final_norm only
  // ZeRO-3 (train.zero = 3): block i's parameters are gathered around each use (layer_gate.h); null otherwise.
  std::shared_ptr<LayerGate> gate;
};
TORCH_MODULE(VisionEncoder);

// LayerNorm over the last dim with the given width and epsilon.
torch::nn::LayerNorm make_layer_norm(int64_t width, double eps);

}  // namespace omnilite
