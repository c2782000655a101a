#include "omnilite/modules/rope.h"

namespace omnilite {

RopeTables rope_tables(const torch::Tensor& positions, int64_t rope_dim, double theta, torch::ScalarType dtype) {
  const auto fdtype = dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto opts = torch::TensorOptions().dtype(fdtype).device(positions.device());
  // inv_freq: [rope_dim/2]
  auto inv_freq = 1.0 / torch::pow(theta, torch::arange(0, rope_dim, 2, opts) / static_cast<double>(rope_dim));
  auto angles = positions.to(fdtype).unsqueeze(-1) * inv_freq;  // [(B,) T, rope_dim/2]
  auto emb = torch::cat({angles, angles}, -1);                  // [(B,) T, rope_dim]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

// x: [B, H, T, Dh] -> [B, H, T, Dh]
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables) {
  const int64_t rope_dim = tables.cos.size(-1);
  const int64_t head_dim = x.size(-1);
  auto rot = rope_dim == head_dim ? x : x.narrow(-1, 0, rope_dim);
  const int64_t half = rope_dim / 2;
  auto rotated_half = torch::cat({-rot.narrow(-1, half, half), rot.narrow(-1, 0, half)}, -1);
  // cos/sin [T, rope_dim] broadcast over B and H; [B, T, rope_dim] over H
  const auto cos = tables.cos.dim() == 3 ? tables.cos.unsqueeze(1) : tables.cos;
  const auto sin = tables.sin.dim() == 3 ? tables.sin.unsqueeze(1) : tables.sin;
  auto out = rot * cos + rotated_half * sin;
  if (rope_dim == head_dim) return out;
  return torch::cat({out, x.narrow(-1, rope_dim, head_dim - rope_dim)}, -1);
}

}  // namespace omnilite
