#include "omnilite/modules/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define OMNILITE_HAS_SDPA_GQA 1
#else
#define OMNILITE_HAS_SDPA_GQA 0
#endif

namespace omnilite {
namespace {

// Combined bool mask [B or 1, 1, T, S] from `allowed` and the causal rule, or undefined if neither applies.
torch::Tensor combined_mask(const torch::Tensor& allowed, bool causal, int64_t T, int64_t S, torch::Device dev) {
  torch::Tensor mask = allowed;
  if (causal && T > 1) {  // one query (decoding) sees every key
    // query i (of T, aligned to the last T keys) may see key j when j <= i + (S - T)
    auto tri = torch::ones({T, S}, torch::TensorOptions().dtype(torch::kBool).device(dev)).tril(S - T);
    mask = mask.defined() ? (mask & tri) : tri.view({1, 1, T, S});
  }
  return mask;
}

void check_shapes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected 4-d q/k/v, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " must match");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "attention: ", k.size(1), " KV heads must divide ", q.size(1),
              " query heads");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "attention: q ", q.sizes(), " vs k ", k.sizes());
}

// One KV head's G query rows (a decoding step): scores of the S keys, softmax, weighted sum of the S values.
// q: [G, Dh] scaled, k/v rows t at k + t * ks, v + t * vs, p: [G * S] scratch, out: [G, Dh] zeroed.
// Cloned for AVX2 + FMA (chosen at load time by the CPU) and a baseline x86-64 build.
__attribute__((target_clones("arch=haswell", "default"))) void one_kv_head(const float* q, const float* k,
                                                                         int64_t ks, const float* v, int64_t vs,
                                                                         int64_t G, int64_t S, int64_t Dh, float* p,
                                                                         float* out) {
  for (int64_t t = 0; t < S; ++t) {
    const float* kt = k + t * ks;
    for (int64_t g = 0; g < G; ++g) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorisable without reassociation
      int64_t d = 0;
      for (; d + 8 <= Dh; d += 8)
        for (int u = 0; u < 8; ++u) acc[u] += q[g * Dh + d + u] * kt[d + u];
      float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; d < Dh; ++d) dot += q[g * Dh + d] * kt[d];
      p[g * S + t] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * S;
    const float mx = *std::max_element(pg, pg + S);
    float sum = 0.f;
    for (int64_t t = 0; t < S; ++t) sum += (pg[t] = std::exp(pg[t] - mx));
    for (int64_t t = 0; t < S; ++t) pg[t] /= sum;
  }
  for (int64_t t = 0; t < S; ++t) {
    const float* vt = v + t * vs;
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * S + t];
      float* og = out + g * Dh;
      for (int64_t d = 0; d < Dh; ++d) og[d] += w * vt[d];
    }
  }
}

// One query per head (a decoding step) on the CPU in float32, with nothing masked: per KV head, its G query heads'
// scores, softmax and weighted sum of values (one_kv_head), reading each cached key and value once (the batched
// GEMMs packed them first, per head, for a 4-row product). Scores, softmax and sums in float32, as below.
// q: [B, H, 1, Dh], k/v: [B, Hkv, S, Dh] with a contiguous last dim -> [B, H, 1, Dh]
torch::Tensor one_query_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(3), Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const auto qs = (q * (1.0 / std::sqrt(static_cast<double>(Dh)))).contiguous();  // [B, H, 1, Dh]
  auto out = torch::zeros({B, H, 1, Dh}, q.options());
  const float *qp = qs.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(static_cast<size_t>(G * S));  // [G, S] scores, then probabilities
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, j = i % Hkv;
      one_kv_head(qp + (b * H + j * G) * Dh, kp + b * k.stride(0) + j * k.stride(1), k.stride(2),
                  vp + b * v.stride(0) + j * v.stride(1), v.stride(2), G, S, Dh, p.data(),
                  op + (b * H + j * G) * Dh);
    }
  });
  return out;
}

}  // namespace

void one_query_attention_cpu(const float* q, const float* k, const float* v, int64_t H, int64_t Hkv, int64_t S,
                             int64_t Dh, int64_t head_stride, float* out) {
  const int64_t G = H / Hkv;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));  // as q * scale rounds it
  std::vector<float> qs(static_cast<size_t>(H * Dh));
  for (int64_t i = 0; i < H * Dh; ++i) qs[static_cast<size_t>(i)] = q[i] * scale;
  std::fill(out, out + H * Dh, 0.f);
  at::parallel_for(0, Hkv, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> p(static_cast<size_t>(G * S));
    for (int64_t j = j0; j < j1; ++j)
      one_kv_head(qs.data() + j * G * Dh, k + j * head_stride, Dh, v + j * head_stride, Dh, G, S, Dh, p.data(),
                  out + j * G * Dh);
  });
}

namespace {

// The additive mask of query rows t0..t1-1 over keys 0..s1-1: 0 where allowed (and causal), -inf elsewhere, shaped
// [B|1, 1, 1, t1 - t0, s1] to broadcast over KV heads and groups; undefined when nothing is masked.
torch::Tensor chunk_bias(const torch::Tensor& allowed, bool causal, int64_t T, int64_t S, int64_t t0, int64_t t1,
                         int64_t s1, const torch::TensorOptions& o) {
  const int64_t n = t1 - t0;
  torch::Tensor ok;
  if (allowed.defined()) ok = allowed.narrow(2, t0, n).narrow(3, 0, s1);  // [B|1, 1, n, s1]
  if (causal && t0 + (S - T) < s1 - 1) {  // the first row cannot see every key the chunk reads
    // row t0 + i may see key j when j <= t0 + i + (S - T)
    auto tri = torch::ones({n, s1}, o.dtype(torch::kBool)).tril(t0 + (S - T)).view({1, 1, n, s1});
    ok = ok.defined() ? ok.logical_and(tri) : tri;
  }
  if (!ok.defined()) return {};
  return torch::zeros(ok.sizes(), o)
      .masked_fill_(ok.logical_not(), -std::numeric_limits<double>::infinity())
      .unsqueeze(1);
}

// Query-chunked attention (the memory layout of flash attention's outer loop, without its online softmax: every
// chunk of query rows sees all of its keys at once): the [.., T, S] scores never exist, only one chunk's [.., n, S]
// scores and probabilities, and the backward recomputes them chunk by chunk from q, k, v (the standard
// dS = P * (dP - rowsum(dO * O)) rule). Under the causal rule a chunk reads only the keys its last row may see, so
// half the products of the plain path are skipped. Same arithmetic per row as attention_core's plain path.
struct ChunkedAttention : torch::autograd::Function<ChunkedAttention> {
  // Query rows t0 .. t0 + n - 1 and the keys 0 .. s1 - 1 they read.
  struct Chunk {
    int64_t t0, n, s1;
  };
  static std::vector<Chunk> chunks(int64_t T, int64_t S, bool causal, int64_t rows) {
    std::vector<Chunk> c;
    for (int64_t t0 = 0; t0 < T; t0 += rows) {
      const int64_t n = std::min(rows, T - t0);
      c.push_back({t0, n, causal ? std::min(S, t0 + n + (S - T)) : S});
    }
    return c;
  }
  // qs: [B, Hkv, G, T, Dh] scaled queries -> probabilities of the chunk's rows [B, Hkv, G, n, s1]
  static torch::Tensor probs(const torch::Tensor& qs, const torch::Tensor& k, const torch::Tensor& allowed,
                             bool causal, const Chunk& c) {
    const int64_t B = qs.size(0), Hkv = qs.size(1), G = qs.size(2), T = qs.size(3), Dh = qs.size(4), S = k.size(2);
    auto qc = qs.narrow(3, c.t0, c.n).reshape({B, Hkv, G * c.n, Dh});
    auto s = torch::matmul(qc, k.narrow(2, 0, c.s1).transpose(-1, -2)).view({B, Hkv, G, c.n, c.s1});
    auto bias = chunk_bias(allowed, causal, T, S, c.t0, c.t0 + c.n, c.s1, qs.options());
    if (bias.defined()) s.add_(bias);
    const auto acc = qs.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    return torch::softmax(s.to(acc), -1).to(qs.scalar_type());
  }

  // q: [B, H, T, Dh], k/v: [B, Hkv, S, Dh] -> [B, H, T, Dh]
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const c10::IValue& mask, bool causal, int64_t rows) {
    const auto allowed = mask.isTensor() ? mask.toTensor() : torch::Tensor();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3), Hkv = k.size(1), S = k.size(2);
    const int64_t G = H / Hkv;
    const auto qs = (q * (1.0 / std::sqrt(static_cast<double>(Dh)))).reshape({B, Hkv, G, T, Dh});
    auto out = torch::empty({B, Hkv, G, T, Dh}, q.options());
    for (const auto& c : chunks(T, S, causal, rows)) {
      auto p = probs(qs, k, allowed, causal, c).view({B, Hkv, G * c.n, c.s1});
      out.narrow(3, c.t0, c.n).copy_(torch::matmul(p, v.narrow(2, 0, c.s1)).view({B, Hkv, G, c.n, Dh}));
    }
    out = out.view({B, H, T, Dh});
    ctx->save_for_backward({q, k, v, out});
    ctx->saved_data["allowed"] = mask;  // a bool mask, no gradient (an IValue: apply() rejects undefined tensors)
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["rows"] = rows;
    return out;
  }

  // grads: {dO [B, H, T, Dh]} -> {dq, dk, dv, none, none, none}
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3];
    const auto& mask = ctx->saved_data["allowed"];
    const auto allowed = mask.isTensor() ? mask.toTensor() : torch::Tensor();
    const bool causal = ctx->saved_data["causal"].toBool();
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3), Hkv = k.size(1), S = k.size(2);
    const int64_t G = H / Hkv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
    const auto qs = (q * scale).reshape({B, Hkv, G, T, Dh});
    const auto dout = grads[0].reshape({B, Hkv, G, T, Dh});
    const auto delta = (dout * out.view({B, Hkv, G, T, Dh})).sum(-1, true);  // [B, Hkv, G, T, 1] rowsum(dO * O)
    auto dq = torch::empty({B, Hkv, G, T, Dh}, q.options());
    auto dk = torch::zeros_like(k), dv = torch::zeros_like(v);
    for (const auto& c : chunks(T, S, causal, rows)) {
      auto p = probs(qs, k, allowed, causal, c);                            // [B, Hkv, G, n, s1]
      auto doc = dout.narrow(3, c.t0, c.n).reshape({B, Hkv, G * c.n, Dh});
      auto kc = k.narrow(2, 0, c.s1), vc = v.narrow(2, 0, c.s1);
      auto p2 = p.view({B, Hkv, G * c.n, c.s1});
      dv.narrow(2, 0, c.s1).add_(torch::matmul(p2.transpose(-1, -2), doc));  // [B, Hkv, s1, Dh]
      auto ds = torch::matmul(doc, vc.transpose(-1, -2)).view({B, Hkv, G, c.n, c.s1});  // dP
      ds.sub_(delta.narrow(3, c.t0, c.n)).mul_(p);                                       // dS = P * (dP - delta)
      auto ds2 = ds.view({B, Hkv, G * c.n, c.s1});
      dq.narrow(3, c.t0, c.n).copy_(torch::matmul(ds2, kc).mul_(scale).view({B, Hkv, G, c.n, Dh}));
      auto qc = qs.narrow(3, c.t0, c.n).reshape({B, Hkv, G * c.n, Dh});
      dk.narrow(2, 0, c.s1).add_(torch::matmul(ds2.transpose(-1, -2), qc));  // [B, Hkv, s1, Dh]
    }
    return {dq.view({B, H, T, Dh}), dk, dv, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

// q: [B, H, T, Dh], k/v: [B, Hkv, S, Dh] -> [B, H, T, Dh]
torch::Tensor attention_core(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& allowed, bool causal) {
  check_shapes(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const bool needs_grad =
      torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  // bf16 on the CPU without gradients (a bf16 model's prompt): LibTorch 1.13's CPU bf16 matmul is ~20x slower than
  // its float32 one, so the float32 attention of the widened values runs, rounded to bf16 once at the end.
  if (!needs_grad && q.device().is_cpu() && q.scalar_type() == torch::kBFloat16 &&
      k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16)
    return attention_core(q.to(torch::kFloat32), k.to(torch::kFloat32), v.to(torch::kFloat32), allowed, causal)
        .to(torch::kBFloat16);
  if (T == 1 && !allowed.defined() && !needs_grad && q.device().is_cpu() && q.scalar_type() == torch::kFloat32 &&
      k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.stride(3) == 1 && v.stride(3) == 1)
    return one_query_attention(q, k, v);
#if OMNILITE_HAS_SDPA_GQA
  if (q.scalar_type() != torch::kFloat64) {
    if (!allowed.defined() && causal && T == S)
      return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt,
                                              /*enable_gqa=*/true);
    auto mask = combined_mask(allowed, causal, T, S, q.device());
    std::optional<torch::Tensor> opt_mask;
    if (mask.defined()) opt_mask = mask;
    return at::scaled_dot_product_attention(q, k, v, opt_mask, 0.0, /*is_causal=*/false, std::nullopt,
                                            /*enable_gqa=*/true);
  }
#endif
  // Long rows: [.., T, S] scores of more than 32 MiB are computed a chunk of query rows at a time (their memory is
  // what limits long-context training), forward and backward.
  const int64_t rows = attention_chunk_rows(B, H, S, q.element_size());
  if (T > rows) return attention_chunked(q, k, v, allowed, causal, rows);
  // The [.., T, S] tensors dominate on CPU: the scale goes on q (T x Dh values, not T x S) and the mask is added in
  // place as 0 / -inf, so scores, probabilities and the output are the only T x S allocations.
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  auto qg = (q * scale).reshape({B, Hkv, G * T, Dh});              // group g of KV head j: rows g*T .. g*T+T-1
  auto scores = torch::matmul(qg, k.transpose(-1, -2));            // [B, Hkv, G*T, S]
  scores = scores.view({B, Hkv, G, T, S});
  auto mask = combined_mask(allowed, causal, T, S, q.device());
  if (mask.defined()) {
    auto bias = torch::zeros(mask.sizes(), q.options()).masked_fill_(mask.logical_not(),
                                                                     -std::numeric_limits<double>::infinity());
    scores.add_(bias.unsqueeze(1));  // [B|1, 1, 1, T, S] broadcast over heads and groups
  }
  const auto acc = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto probs = torch::softmax(scores.to(acc), -1).to(q.scalar_type());  // [B, Hkv, G, T, S]
  auto out = torch::matmul(probs.view({B, Hkv, G * T, S}), v);          // [B, Hkv, G*T, Dh]
  return out.view({B, H, T, Dh});
}

int64_t attention_chunk_rows(int64_t batch, int64_t heads, int64_t keys, int64_t elem_bytes) {
  const int64_t budget = int64_t{32} << 20;  // bytes of one chunk's scores
  return std::max<int64_t>(16, budget / std::max<int64_t>(1, batch * heads * keys * elem_bytes));
}

torch::Tensor attention_chunked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& allowed, bool causal, int64_t rows) {
  check_shapes(q, k, v);
  TORCH_CHECK(rows > 0, "attention_chunked: rows per chunk must be positive, got ", rows);
  const c10::IValue mask = allowed.defined() ? c10::IValue(allowed) : c10::IValue();
  return ChunkedAttention::apply(q, k.contiguous(), v.contiguous(), mask, causal, rows);
}

// Plain reference: K/V repeated to H heads, masked softmax.
torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& allowed, bool causal) {
  check_shapes(q, k, v);
  const int64_t H = q.size(1), T = q.size(2), S = k.size(2), Hkv = k.size(1);
  auto kr = k.repeat_interleave(H / Hkv, 1);  // [B, H, S, Dh]
  auto vr = v.repeat_interleave(H / Hkv, 1);
  auto scores = torch::matmul(q, kr.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(3)));
  auto mask = combined_mask(allowed, causal, T, S, q.device());
  if (mask.defined()) scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  return torch::matmul(torch::softmax(scores, -1), vr);
}

GQAttentionImpl::GQAttentionImpl(const TextOptions& o, const LinearBuilder& builder, const std::string& path)
    : opts(o) {
  const int64_t D = o.hidden_size, Dh = o.head_dim;
  q_proj = register_module("q_proj", builder.make(join_path(path, "q_proj"), D, o.num_heads * Dh, false));
  k_proj = register_module("k_proj", builder.make(join_path(path, "k_proj"), D, o.num_kv_heads * Dh, false));
  v_proj = register_module("v_proj", builder.make(join_path(path, "v_proj"), D, o.num_kv_heads * Dh, false));
  o_proj = register_module("o_proj", builder.make(join_path(path, "o_proj"), o.num_heads * Dh, D, false));
}

// x: [B, T, D] -> [B, T, D]
torch::Tensor GQAttentionImpl::forward(const torch::Tensor& x, const RopeTables& rope, const torch::Tensor& allowed,
                                       bool causal, LayerKV* cache, bool append) {
  const int64_t B = x.size(0), T = x.size(1), Dh = opts.head_dim;
  auto q = q_proj->forward(x).view({B, T, opts.num_heads, Dh}).transpose(1, 2);     // [B, H, T, Dh]
  auto k = k_proj->forward(x).view({B, T, opts.num_kv_heads, Dh}).transpose(1, 2);  // [B, Hkv, T, Dh]
  auto v = v_proj->forward(x).view({B, T, opts.num_kv_heads, Dh}).transpose(1, 2);  // [B, Hkv, T, Dh]
  q = apply_rope(q, rope);
  k = apply_rope(k, rope);
  if (cache) std::tie(k, v) = cache->write(k, v, opts.max_position_embeddings, append);  // [B, Hkv, S, Dh]
  auto out = attention_core(q, k, v, allowed, causal);                            // [B, H, T, Dh]
  return o_proj->forward(out.transpose(1, 2).reshape({B, T, opts.num_heads * Dh}));  // [B, T, D]
}

}  // namespace omnilite
