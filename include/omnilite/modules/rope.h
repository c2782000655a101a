// Rotary position embedding, rotate-half convention (GPT-NeoX, Llama, Mixtral).
//
// For a head vector x of width rope_dim (the leading rope_dim dims of the head; the rest pass through):
//   inv_freq[i] = theta^(-2i / rope_dim),  i < rope_dim/2
//   angle[p, i] = p * inv_freq[i], duplicated to width rope_dim as cat(angle, angle)
//   rope(x) = x * cos(angle) + rotate_half(x) * sin(angle),  rotate_half(x) = cat(-x[half:], x[:half])
#pragma once

#include <torch/torch.h>

namespace omnilite {

struct RopeTables {
  torch::Tensor cos;  // [T, rope_dim], or [B, T, rope_dim] for per-row positions (packed samples)
  torch::Tensor sin;  // the same shape as cos
};

// positions: [T] or [B, T] int64 -> tables in `dtype` on the positions' device (angles computed in fp32, fp64 for fp64).
RopeTables rope_tables(const torch::Tensor& positions, int64_t rope_dim, double theta, torch::ScalarType dtype);

// x: [B, H, T, head_dim] -> same shape, first rope_dim dims of each head rotated.
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables);

}  // namespace omnilite
