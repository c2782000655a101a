#include "omnilite/modules/vision_encoder.h"

#include "omnilite/modules/attention.h"
#include "omnilite/modules/recompute.h"

namespace omnilite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ZeRO-3: a ViT block whose parameters are gathered for its forward (run without keeping activations) and again for
// its backward, which recomputes the forward exactly (recompute.h) and hands the gradients over (layer_gate.h).
struct GatedBlock : torch::autograd::Function<GatedBlock> {
  // x: [N, P, W] -> [N, P, W]
  static variable_list forward(AutogradContext* ctx, torch::Tensor x, ViTBlockImpl* block, LayerGate* gate,
                               int64_t index) {
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    ctx->saved_data["gate"] = reinterpret_cast<int64_t>(gate);
    ctx->saved_data["index"] = index;
    save_forward_state(ctx, x.device());
    ctx->save_for_backward({x});
    gate->gather(static_cast<size_t>(index));
    gate->prefetch(static_cast<size_t>(index) + 1);
    auto y = block->forward(x);
    gate->release(static_cast<size_t>(index));
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* block = reinterpret_cast<ViTBlockImpl*>(ctx->saved_data["block"].toInt());
    auto* gate = reinterpret_cast<LayerGate*>(ctx->saved_data["gate"].toInt());
    const auto index = static_cast<size_t>(ctx->saved_data["index"].toInt());
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    gate->gather(index);
    if (index > 0) gate->prefetch(index - 1);  // backward runs the blocks in reverse
    torch::Tensor y;
    {
      RecomputeScope recompute(ctx, x.device());
      y = block->forward(x);
    }
    if (grads[0].defined()) torch::autograd::backward({y}, {grads[0]});
    gate->after_backward(index);
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor()};  // per input
  }
};

}  // namespace

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
    if (!gate) {
      x = b->forward(x);
    } else if (torch::GradMode::is_enabled() && is_training()) {
      // the recomputation only runs when the function is part of the graph: give it an input that needs grad
      if (!x.requires_grad()) x = x.detach().requires_grad_(true);
      x = GatedBlock::apply(x, b, gate.get(), static_cast<int64_t>(i))[0];
    } else {
      TORCH_CHECK(!torch::GradMode::is_enabled(), "VisionEncoder: blocks with sharded parameters (train.zero = 3) run "
                  "with gradients only in training mode; hint: call eval() paths under torch::NoGradGuard");
      gate->gather(i);
      gate->prefetch(i + 1);
      x = b->forward(x);
      gate->release(i);
    }
  }
  return norm ? norm->forward(x) : x;
}

}  // namespace omnilite
