#include "omnilite/modules/vision_encoder.h"

#include "omnilite/modules/attention.h"
#include "omnilite/modules/recompute.h"

namespace omnilite {

torch::nn::LayerNorm make_layer_norm(int64_t width, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({width}).eps(eps));
}

ViTBlockImpl::ViTBlockImpl(const VisionOptions& o, const LinearBuilder& builder, const std::string& path)
    : num_heads(o.num_heads), quick_gelu(o.activation == "quick_gelu") {
  norm1 = register_module("norm1", make_layer_norm(o.width, o.norm_eps));
  qkv = register_module("qkv", builder.make(join_path(path, "qkv"), o.width, 3 * o.width, true));
  proj = register_module("proj", builder.make(join_path(path, "proj"), o.width, o.width, true));
  norm2 = register_module("norm2", make_layer_norm(o.width, o.norm_eps));
  fc1 = register_module("fc1", builder.make(join_path(path, "fc1"), o.width, o.mlp_dim, true));
  fc2 = register_module("fc2", builder.make(join_path(path, "fc2"), o.mlp_dim, o.width, true));
}

// x: [N, P, W] -> [N, P, W]
torch::Tensor ViTBlockImpl::forward(const torch::Tensor& x) {
  const int64_t N = x.size(0), P = x.size(1), W = x.size(2), Dh = W / num_heads;
  auto qkv_out = qkv->forward(norm1->forward(x)).view({N, P, 3, num_heads, Dh}).permute({2, 0, 3, 1, 4});
  // qkv_out: [3, N, heads, P, Dh]
  auto a = attention_core(qkv_out[0], qkv_out[1], qkv_out[2], torch::Tensor(), /*causal=*/false);
  auto h = x + proj->forward(a.transpose(1, 2).reshape({N, P, W}));
  auto u = fc1->forward(norm2->forward(h));
  return h + fc2->forward(quick_gelu ? u * torch::sigmoid(1.702 * u) : torch::gelu(u));
}

VisionEncoderImpl::VisionEncoderImpl(const VisionOptions& o, const LinearBuilder& builder, const std::string& path) {
  patch_embed = register_module("patch_embed", PatchEmbed(o));
  if (o.pre_norm) pre_norm = register_module("pre_norm", make_layer_norm(o.width, o.norm_eps));
  for (int64_t i = 0; i < o.depth; ++i)
    blocks->push_back(ViTBlock(o, builder, join_path(path, "blocks." + std::to_string(i))));
  register_module("blocks", blocks);
  if (o.final_norm) norm = register_module("norm", make_layer_norm(o.width, o.norm_eps));
}

// images: [N, C, H, W] -> [N, P, W]
torch::Tensor VisionEncoderImpl::forward(const torch::Tensor& images) {
  auto x = patch_embed->forward(images);
  if (pre_norm) x = pre_norm->forward(x);
  for (size_t i = 0; i < blocks->size(); ++i) {
    auto* b = blocks[i]->as<ViTBlockImpl>();
    x = gate ? gated_forward<ViTBlockImpl, 1>(b, *gate, i, x, torch::Tensor(), is_training()) : b->forward(x);
  }
  return norm ? norm->forward(x) : x;
}

}  // namespace omnilite
