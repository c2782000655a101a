#include "omnilite/modules/vqvae.h"

#include <algorithm>
#include <numeric>

namespace omnilite {
namespace {

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(pad));
}
torch::nn::GroupNorm group_norm(int64_t c) { return torch::nn::GroupNorm(vq_groups(c), c); }

}  // namespace

int64_t vq_channels(const VQVAEOptions& o, int64_t level) {
  return o.base_channels * std::min<int64_t>(int64_t{1} << level, 4);
}
int64_t vq_groups(int64_t channels) { return std::gcd<int64_t>(32, channels); }

VQResBlockImpl::VQResBlockImpl(int64_t c) {
  norm1 = register_module("norm1", group_norm(c));
  conv1 = register_module("conv1", conv(c, c, 3, 1, 1));
  norm2 = register_module("norm2", group_norm(c));
  conv2 = register_module("conv2", conv(c, c, 3, 1, 1));
}

// x: [N, c, H, W] -> [N, c, H, W]
torch::Tensor VQResBlockImpl::forward(const torch::Tensor& x) {
  auto h = conv1->forward(torch::silu(norm1->forward(x)));
  return x + conv2->forward(torch::silu(norm2->forward(h)));
}

VQEncoderImpl::VQEncoderImpl(const VQVAEOptions& o, int64_t latent_channels) {
  const int64_t n = o.num_downsamples;
  conv_in = register_module("conv_in", conv(o.in_channels, vq_channels(o, 0), 3, 1, 1));
  for (int64_t i = 0; i < n; ++i) {
    res_blocks->push_back(VQResBlock(vq_channels(o, i)));
    downs->push_back(conv(vq_channels(o, i), vq_channels(o, i + 1), 4, 2, 1));
  }
  res_blocks->push_back(VQResBlock(vq_channels(o, n)));
  register_module("res_blocks", res_blocks);
  register_module("downs", downs);
  norm_out = register_module("norm_out", group_norm(vq_channels(o, n)));
  conv_out = register_module("conv_out", conv(vq_channels(o, n), latent_channels, 1, 1, 0));
}

// [N, C, H, W] -> [N, Cz, H/2^n, W/2^n]
torch::Tensor VQEncoderImpl::forward(const torch::Tensor& images) {
  const int64_t n = downs->size(), f = int64_t{1} << n;
  TORCH_CHECK(images.dim() == 4 && images.size(2) % f == 0 && images.size(3) % f == 0,
              "VQEncoder: expected images [N, C, H, W] with H, W multiples of ", f, ", got ", images.sizes(),
              "; hint: pad or resize images to a multiple of the VQ-VAE downsampling");
  auto x = conv_in->forward(images);
  for (int64_t i = 0; i < n; ++i) {
    x = res_blocks[i]->as<VQResBlockImpl>()->forward(x);
    x = downs[i]->as<torch::nn::Conv2dImpl>()->forward(x);  // halves H and W
  }
  x = res_blocks[n]->as<VQResBlockImpl>()->forward(x);
  return conv_out->forward(torch::silu(norm_out->forward(x)));
}

VQDecoderImpl::VQDecoderImpl(const VQVAEOptions& o, int64_t latent_channels) {
  const int64_t n = o.num_downsamples;
  conv_in = register_module("conv_in", conv(latent_channels, vq_channels(o, n), 3, 1, 1));
  res_blocks->push_back(VQResBlock(vq_channels(o, n)));
  for (int64_t i = n - 1; i >= 0; --i) {
    ups->push_back(conv(vq_channels(o, i + 1), vq_channels(o, i), 3, 1, 1));
    res_blocks->push_back(VQResBlock(vq_channels(o, i)));
  }
  register_module("res_blocks", res_blocks);
  register_module("ups", ups);
  norm_out = register_module("norm_out", group_norm(vq_channels(o, 0)));
  to_latent = register_module("to_latent", conv(vq_channels(o, 0), latent_channels, 3, 1, 1));
  conv_out = register_module("conv_out", conv(latent_channels, o.in_channels, 3, 1, 1));
}

// [N, Cz, h, w] -> [N, C, h*2^n, w*2^n]
torch::Tensor VQDecoderImpl::forward(const torch::Tensor& z) {
  auto x = res_blocks[0]->as<VQResBlockImpl>()->forward(conv_in->forward(z));
  for (size_t i = 0; i < ups->size(); ++i) {
    x = torch::nn::functional::interpolate(
        x, torch::nn::functional::InterpolateFuncOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(
               torch::kNearest));
    x = ups[i]->as<torch::nn::Conv2dImpl>()->forward(x);
    x = res_blocks[i + 1]->as<VQResBlockImpl>()->forward(x);
  }
  x = torch::silu(to_latent->forward(torch::silu(norm_out->forward(x))));
  return conv_out->forward(x);
}

VectorQuantizerImpl::VectorQuantizerImpl(int64_t K, int64_t dim) {
  codebook = register_parameter("codebook", torch::empty({K, dim}).uniform_(-1.0 / K, 1.0 / K));
}

// z_e: [N, C, h, w] -> QuantizerOutput
QuantizerOutput VectorQuantizerImpl::forward(const torch::Tensor& z_e) {
  const int64_t N = z_e.size(0), C = z_e.size(1), h = z_e.size(2), w = z_e.size(3);
  auto flat = z_e.permute({0, 2, 3, 1}).reshape({-1, C});  // [N*h*w, C]
  auto cb = codebook.to(flat.scalar_type());
  // ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2  -> [N*h*w, K]
  auto d = flat.pow(2).sum(1, true) - 2 * flat.matmul(cb.t()) + cb.pow(2).sum(1).unsqueeze(0);
  auto idx = d.argmin(1);                                   // [N*h*w]
  auto z_q = cb.index_select(0, idx).view({N, h, w, C}).permute({0, 3, 1, 2});  // [N, C, h, w]
  QuantizerOutput out;
  out.commit_loss = (z_e - z_q.detach()).pow(2).mean();
  out.codebook_loss = (z_e.detach() - z_q).pow(2).mean();
  out.z_q = z_e + (z_q - z_e).detach();  // straight-through estimator
  out.indices = idx.view({N, h, w});
  return out;
}

// indices: [N, h, w] -> [N, C, h, w]
torch::Tensor VectorQuantizerImpl::lookup(const torch::Tensor& indices) {
  return torch::embedding(codebook, indices).permute({0, 3, 1, 2});
}

VQVAEImpl::VQVAEImpl(const VQVAEOptions& o, int64_t latent_channels) {
  encoder = register_module("encoder", VQEncoder(o, latent_channels));
  quantizer = register_module("quantizer", VectorQuantizer(o.codebook_size, latent_channels));
  decoder = register_module("decoder", VQDecoder(o, latent_channels));
  latent_mean = register_buffer("latent_mean", torch::zeros({latent_channels}));
  latent_std = register_buffer("latent_std", torch::ones({latent_channels}));
}

// [N, C, H, W] -> [N, Cz, h, w]
torch::Tensor VQVAEImpl::encode_normalized(const torch::Tensor& images) {
  auto z = quantizer->forward(encoder->forward(images)).z_q.detach();
  return (z - latent_mean.view({1, -1, 1, 1})) / latent_std.view({1, -1, 1, 1});
}

// [N, Cz, h, w] -> [N, C, H, W]
torch::Tensor VQVAEImpl::decode_normalized(const torch::Tensor& z) {
  auto raw = z * latent_std.view({1, -1, 1, 1}) + latent_mean.view({1, -1, 1, 1});
  return decoder->forward(quantizer->forward(raw).z_q);
}

void VQVAEImpl::fit_latent_stats(const torch::Tensor& images) {
  torch::NoGradGuard ng;
  auto z = quantizer->forward(encoder->forward(images)).z_q;  // [N, Cz, h, w]
  latent_mean.copy_(z.mean({0, 2, 3}));
  latent_std.copy_(z.std({0, 2, 3}).clamp_min(1e-4));
}

// images: [N, C, H, W] -> recon [N, C, H, W]
VQVAEOutput VQVAEImpl::forward(const torch::Tensor& images) {
  auto q = quantizer->forward(encoder->forward(images));
  return {decoder->forward(q.z_q), q};
}

}  // namespace omnilite
