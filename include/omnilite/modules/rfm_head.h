// Rectified-flow head (card layer 7) and its input side.
//
// A generated image is a VQ-VAE latent [C=4, h, w] cut into p x p patches (p = 4): one token of C*p*p = 64
// values per patch. Into the backbone: latent_in(x_t) + time_mlp(sinusoid(t)); out of it: out(h) predicts the
// velocity x1 - x0 of each token.
#pragma once

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

// latents: [N, C, h, w] (h, w multiples of p) -> tokens [N, (h/p)*(w/p), C*p*p], row-major over patches, each
// token ordered (c, dy, dx).
torch::Tensor patchify(const torch::Tensor& latents, int64_t p);
// tokens: [N, (h/p)*(w/p), C*p*p] -> latents [N, C, h, w]; the inverse of patchify.
torch::Tensor unpatchify(const torch::Tensor& tokens, int64_t channels, int64_t h, int64_t w, int64_t p);
// Sinusoidal timestep features (DiT): t: [N] in [0, 1] -> [N, dim] = cat(cos(1000 t f), sin(1000 t f)),
// f_i = 10000^(-i / (dim/2)).
torch::Tensor timestep_features(const torch::Tensor& t, int64_t dim);

struct RFMHeadImpl : torch::nn::Module {
  RFMHeadImpl(int64_t dim, const FlowOptions& opts, int64_t token_dim, const LinearBuilder& builder,
              const std::string& path);
  // Input side. x_t: [n, P] noisy latent tokens, t: [n] flow times -> [n, D] embeddings for the backbone.
  torch::Tensor embed(const torch::Tensor& x_t, const torch::Tensor& t);
  // Output side. h: [n, D] final hidden states at the tokens -> [n, P] predicted velocities.
  torch::Tensor forward(const torch::Tensor& h);

  int64_t time_embed_dim;
  std::shared_ptr<LinearBaseImpl> latent_in;  // P -> D (64 -> 2048), with bias
  std::shared_ptr<LinearBaseImpl> time_fc1;   // time_embed_dim -> D, with bias
  std::shared_ptr<LinearBaseImpl> time_fc2;   // D -> D, with bias
  std::shared_ptr<LinearBaseImpl> out;        // D -> P (2048 -> 64), with bias: the card's flow head
};
TORCH_MODULE(RFMHead);

}  // namespace omnilite
