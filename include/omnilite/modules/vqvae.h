// VQ-VAE (card layer 8): encoder to a 4-channel latent at 1/8 resolution, nearest-code quantiser, decoder ending
// in the card's Conv2d(4 -> 3, kernel 3, stride 1).
//
// Channels per resolution level i = 0..n (n = num_downsamples): ch(i) = base * min(2^i, 4).
// Encoder: conv_in(C -> ch0, 3x3); per level i < n: ResBlock(ch_i), down_i = Conv(ch_i -> ch_{i+1}, 4x4, stride 2);
//          mid ResBlock(ch_n); GroupNorm + SiLU; conv_out(ch_n -> latent_channels, 1x1).
// Decoder: conv_in(latent_channels -> ch_n, 3x3); mid ResBlock(ch_n); per level i = n-1..0: nearest 2x upsample,
//          up_i = Conv(ch_{i+1} -> ch_i, 3x3), ResBlock(ch_i); GroupNorm + SiLU; to_latent(ch_0 -> latent_channels,
//          3x3); SiLU; conv_out(latent_channels -> C, 3x3) -- the card's last layer.
// ResBlock(c): x + Conv3x3(SiLU(GN(Conv3x3(SiLU(GN(x)))))).
#pragma once

#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite {

// Channels at resolution level i of the VQ-VAE.
int64_t vq_channels(const VQVAEOptions& o, int64_t level);
// GroupNorm groups used for c channels: gcd(32, c).
int64_t vq_groups(int64_t channels);

struct VQResBlockImpl : torch::nn::Module {
  explicit VQResBlockImpl(int64_t channels);
  // x: [N, c, H, W] -> [N, c, H, W]
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};  // c -> c, 3x3
};
TORCH_MODULE(VQResBlock);

struct VQEncoderImpl : torch::nn::Module {
  VQEncoderImpl(const VQVAEOptions& o, int64_t latent_channels);
  // images: [N, C, H, W] (H, W multiples of 2^n) -> z_e: [N, latent_channels, H/2^n, W/2^n]
  torch::Tensor forward(const torch::Tensor& images);
  torch::nn::Conv2d conv_in{nullptr};
  torch::nn::ModuleList res_blocks;  // one per level (n), then the mid block
  torch::nn::ModuleList downs;       // n stride-2 convs
  torch::nn::GroupNorm norm_out{nullptr};
  torch::nn::Conv2d conv_out{nullptr};
};
TORCH_MODULE(VQEncoder);

struct VQDecoderImpl : torch::nn::Module {
  VQDecoderImpl(const VQVAEOptions& o, int64_t latent_channels);
  // z: [N, latent_channels, h, w] -> images [N, C, h*2^n, w*2^n]
  torch::Tensor forward(const torch::Tensor& z);
  torch::nn::Conv2d conv_in{nullptr};
  torch::nn::ModuleList res_blocks;  // the mid block, then one per level (n..1 order of upsampling)
  torch::nn::ModuleList ups;         // n convs after each 2x upsample
  torch::nn::GroupNorm norm_out{nullptr};
  torch::nn::Conv2d to_latent{nullptr};  // ch0 -> latent_channels, 3x3
  torch::nn::Conv2d conv_out{nullptr};   // latent_channels -> C, 3x3, stride 1 (card: Conv2d 4 -> 3)
};
TORCH_MODULE(VQDecoder);

struct QuantizerOutput {
  torch::Tensor z_q;            // [N, C, h, w] quantised latent, straight-through gradient to z_e
  torch::Tensor indices;        // [N, h, w] int64 code ids
  torch::Tensor commit_loss;    // scalar: mean ||z_e - sg(z_q)||^2
  torch::Tensor codebook_loss;  // scalar: mean ||sg(z_e) - z_q||^2
};

struct VectorQuantizerImpl : torch::nn::Module {
  VectorQuantizerImpl(int64_t codebook_size, int64_t dim);
  // z_e: [N, C, h, w] -> nearest code per position (L2)
  QuantizerOutput forward(const torch::Tensor& z_e);
  // indices: [N, h, w] -> codes [N, C, h, w]
  torch::Tensor lookup(const torch::Tensor& indices);
  torch::Tensor codebook;  // [codebook_size, C], uniform(-1/K, 1/K)
};
TORCH_MODULE(VectorQuantizer);

struct VQVAEOutput {
  torch::Tensor recon;  // [N, C, H, W]
  QuantizerOutput q;
};

struct VQVAEImpl : torch::nn::Module {
  VQVAEImpl(const VQVAEOptions& o, int64_t latent_channels);
  // images: [N, C, H, W] -> reconstruction and quantiser output
  VQVAEOutput forward(const torch::Tensor& images);
  // The flow's data space: quantised latents standardised per channel with latent_mean / latent_std, so that
  // they match the N(0, I) noise in scale. images: [N, C, H, W] -> [N, latent_channels, H/2^n, W/2^n]
  torch::Tensor encode_normalized(const torch::Tensor& images);
  // Inverse of encode_normalized: un-standardise, snap to the nearest code, decode.
  // z: [N, latent_channels, h, w] -> images [N, C, h*2^n, w*2^n]
  torch::Tensor decode_normalized(const torch::Tensor& z);
  // Sets latent_mean / latent_std from quantised latents of `images` [N, C, H, W] (no gradient).
  void fit_latent_stats(const torch::Tensor& images);

  VQEncoder encoder{nullptr};
  VectorQuantizer quantizer{nullptr};
  VQDecoder decoder{nullptr};
  torch::Tensor latent_mean;  // [latent_channels] buffer, per-channel mean of quantised training latents
  torch::Tensor latent_std;   // [latent_channels] buffer, per-channel std (1 until fit_latent_stats runs)
};
TORCH_MODULE(VQVAE);

}  // namespace omnilite
