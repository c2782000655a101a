#include "omnilite/modules/rfm_head.h"

#include <cmath>

namespace omnilite {

// [N, C, h, w] -> [N, (h/p)(w/p), C p p]
torch::Tensor patchify(const torch::Tensor& latents, int64_t p) {
  TORCH_CHECK(latents.dim() == 4 && latents.size(2) % p == 0 && latents.size(3) % p == 0,
              "patchify: expected latents [N, C, h, w] with h, w multiples of ", p, ", got ", latents.sizes());
  const int64_t N = latents.size(0), C = latents.size(1), h = latents.size(2) / p, w = latents.size(3) / p;
  return latents.view({N, C, h, p, w, p}).permute({0, 2, 4, 1, 3, 5}).reshape({N, h * w, C * p * p});
}

// [N, (h/p)(w/p), C p p] -> [N, C, h, w]
torch::Tensor unpatchify(const torch::Tensor& tokens, int64_t channels, int64_t h, int64_t w, int64_t p) {
  const int64_t N = tokens.size(0), gh = h / p, gw = w / p;
  TORCH_CHECK(tokens.dim() == 3 && tokens.size(1) == gh * gw && tokens.size(2) == channels * p * p,
              "unpatchify: expected tokens [N, ", gh * gw, ", ", channels * p * p, "], got ", tokens.sizes());
  return tokens.reshape({N, gh, gw, channels, p, p}).permute({0, 3, 1, 4, 2, 5}).reshape({N, channels, h, w});
}

// t: [N] -> [N, dim]
torch::Tensor timestep_features(const torch::Tensor& t, int64_t dim) {
  const int64_t half = dim / 2;
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(t.device());
  auto freqs = torch::exp(-std::log(10000.0) * torch::arange(half, opts) / static_cast<double>(half));  // [half]
  auto args = (t.to(torch::kFloat32) * 1000.0).unsqueeze(1) * freqs.unsqueeze(0);                      // [N, half]
  return torch::cat({args.cos(), args.sin()}, 1);
}

RFMHeadImpl::RFMHeadImpl(int64_t dim, const FlowOptions& o, int64_t token_dim, const LinearBuilder& builder,
                         const std::string& path)
    : time_embed_dim(o.time_embed_dim) {
  latent_in = register_module("latent_in", builder.make(join_path(path, "latent_in"), token_dim, dim, true));
  time_fc1 = register_module("time_fc1", builder.make(join_path(path, "time_fc1"), o.time_embed_dim, dim, true));
  time_fc2 = register_module("time_fc2", builder.make(join_path(path, "time_fc2"), dim, dim, true));
  out = register_module("out", builder.make(join_path(path, "out"), dim, token_dim, true));
}

// x_t: [n, P], t: [n] -> [n, D]
torch::Tensor RFMHeadImpl::embed(const torch::Tensor& x_t, const torch::Tensor& t) {
  auto temb = time_fc2->forward(torch::silu(time_fc1->forward(timestep_features(t, time_embed_dim).to(x_t.scalar_type()))));
  return latent_in->forward(x_t) + temb;
}

// h: [n, D] -> [n, P]
torch::Tensor RFMHeadImpl::forward(const torch::Tensor& h) { return out->forward(h); }

}  // namespace omnilite
