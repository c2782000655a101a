// Grouped-query attention (text backbone) and the scaled-dot-product core shared by every attention here.
//
// B = batch, T = query length, S = key length, H = query heads, Hkv = key/value heads, G = H / Hkv,
// Dh = head dim. Query head h reads key/value head h / G (Mixtral's repeat_kv order).
//
// The core never materialises repeated K/V: on LibTorch >= 2.5 it calls scaled_dot_product_attention with
// enable_gqa (flash / memory-efficient kernels on CUDA); on older versions it views the queries as
// [B, Hkv, G*T, Dh] so that one batched matmul per KV head serves its whole group.
#pragma once

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/rope.h"

namespace omnilite {

// One query per head of one sequence over its S cached positions (a decoding step) on the CPU in float32, the
// arithmetic of attention_core's one-query path: q [H, Dh] (unscaled), keys and values of KV head j at
// k + j * head_stride and v + j * head_stride, rows of Dh, -> out [H, Dh]. The KV heads run on the intra-op threads.
void one_query_attention_cpu(const float* q, const float* k, const float* v, int64_t H, int64_t Hkv, int64_t S,
                             int64_t Dh, int64_t head_stride, float* out);

// q: [B, H, T, Dh], k/v: [B, Hkv, S, Dh], allowed: bool [B or 1, 1, T, S] (true = may attend) or undefined,
// causal: apply the causal rule (key j <= query i, aligned at the end) in addition to `allowed`
// -> [B, H, T, Dh]. Softmax in fp32.
torch::Tensor attention_core(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& allowed, bool causal);

// Query rows per chunk: one chunk's [batch, heads, rows, keys] scores of elem_bytes each fill at most 32 MiB (at
// least 16 rows). attention_core chunks when T exceeds it.
int64_t attention_chunk_rows(int64_t batch, int64_t heads, int64_t keys, int64_t elem_bytes);

// attention_core a chunk of `rows` query rows at a time, forward and backward (a custom autograd function that
// keeps q, k, v and the output, and recomputes each chunk's probabilities in the backward): peak memory of the
// scores O(rows x S) instead of O(T x S). Same shapes and arguments as attention_core.
torch::Tensor attention_chunked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& allowed, bool causal, int64_t rows);

// The same computation done the plain way (K/V repeated to H heads, explicit masked softmax): the reference the
// tests compare attention_core against.
torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& allowed, bool causal);

// Text self-attention: q/k/v/o projections (no bias, Mixtral), RoPE on q and k, GQA core.
struct GQAttentionImpl : torch::nn::Module {
  GQAttentionImpl(const TextOptions& opts, const LinearBuilder& builder, const std::string& path);
  // x: [B, T, D], rope: tables for the T positions, allowed/causal: as attention_core (with a cache: over the
  // S = cached + T keys) -> [B, T, D]. With `cache`, the keys/values of x follow the cached ones (and are stored
  // there when `append`).
  torch::Tensor forward(const torch::Tensor& x, const RopeTables& rope, const torch::Tensor& allowed, bool causal,
                        LayerKV* cache = nullptr, bool append = true);

  TextOptions opts;
  std::shared_ptr<LinearBaseImpl> q_proj;  // D -> H*Dh
  std::shared_ptr<LinearBaseImpl> k_proj;  // D -> Hkv*Dh
  std::shared_ptr<LinearBaseImpl> v_proj;  // D -> Hkv*Dh
  std::shared_ptr<LinearBaseImpl> o_proj;  // H*Dh -> D
};
TORCH_MODULE(GQAttention);

}  // namespace omnilite
