#include "omnilite/param_count.h"

#include "omnilite/modules/vqvae.h"

namespace omnilite {
namespace {

int64_t linear(int64_t in, int64_t out, bool bias) { return in * out + (bias ? out : 0); }
int64_t layer_norm(int64_t d) { return 2 * d; }
int64_t conv(int64_t in, int64_t out, int64_t k) { return in * out * k * k + out; }
int64_t group_norm(int64_t c) { return 2 * c; }
int64_t vq_res_block(int64_t c) { return 2 * group_norm(c) + 2 * conv(c, c, 3); }

}  // namespace

ParamReport count_parameters(const ModelConfig& c) {
  ParamReport r;
  const auto& v = c.vision;
  const int64_t g = v.image_size / v.patch_size;
  r.rows.push_back({"vision.patch_embed", conv(v.in_channels, v.width, v.patch_size) + g * g * v.width, 0});
  const int64_t vit_linear_w = v.width * 3 * v.width + v.width * v.width + 2 * v.width * v.mlp_dim;
  const int64_t vit_block = 2 * layer_norm(v.width) + linear(v.width, 3 * v.width, true) +
                            linear(v.width, v.width, true) + linear(v.width, v.mlp_dim, true) +
                            linear(v.mlp_dim, v.width, true);
  r.rows.push_back({"vision.blocks", v.depth * vit_block, v.depth * vit_linear_w});
  r.rows.push_back({"vision.norm", layer_norm(v.width), 0});

  const int64_t D = c.text.hidden_size;
  const auto& rs = c.resampler;
  const int64_t rs_attn_w = D * D + D * 2 * D + D * D, rs_ff_w = 2 * D * rs.ff_mult * D;
  const int64_t rs_layer = 2 * layer_norm(D) + rs_attn_w + layer_norm(D) + rs_ff_w;
  r.rows.push_back({"resampler", linear(v.width, D, true) + rs.num_latents * D + rs.depth * rs_layer + layer_norm(D),
                    v.width * D + rs.depth * (rs_attn_w + rs_ff_w)});

  const auto& t = c.text;
  const auto& m = c.moe;
  const int64_t L = t.num_layers, Dh = t.head_dim;
  const int64_t attn = D * t.num_heads * Dh + 2 * D * t.num_kv_heads * Dh + t.num_heads * Dh * D;
  const int64_t expert = 3 * D * m.expert_hidden;
  const int64_t gate = D * m.num_experts;
  r.rows.push_back({"text.embed_tokens", t.vocab_size * D, 0});
  r.rows.push_back({"text.layers.*.self_attn", L * attn, L * attn});
  r.rows.push_back({"text.layers.*.moe.gate", L * gate, 0});
  r.rows.push_back({"text.layers.*.moe.experts", L * m.num_experts * expert, L * m.num_experts * expert});
  r.rows.push_back({"text.layers.*.*_layernorm", L * 2 * D, 0});
  r.rows.push_back({"text.norm", D, 0});
  r.rows.push_back({"lm_head", t.tie_word_embeddings ? 0 : t.vocab_size * D, 0});

  const auto& f = c.flow;
  const int64_t P = c.flow_token_dim();
  r.rows.push_back({"flow", linear(P, D, true) + linear(f.time_embed_dim, D, true) + linear(D, D, true) +
                                linear(D, P, true), 0});

  const auto& q = c.vqvae;
  const int64_t n = q.num_downsamples, Cz = f.latent_channels;
  int64_t enc = conv(q.in_channels, vq_channels(q, 0), 3) + vq_res_block(vq_channels(q, n)) +
                group_norm(vq_channels(q, n)) + conv(vq_channels(q, n), Cz, 1);
  int64_t dec = conv(Cz, vq_channels(q, n), 3) + vq_res_block(vq_channels(q, n)) + group_norm(vq_channels(q, 0)) +
                conv(vq_channels(q, 0), Cz, 3) + conv(Cz, q.in_channels, 3);
  for (int64_t i = 0; i < n; ++i) {
    enc += vq_res_block(vq_channels(q, i)) + conv(vq_channels(q, i), vq_channels(q, i + 1), 4);
    dec += conv(vq_channels(q, i + 1), vq_channels(q, i), 3) + vq_res_block(vq_channels(q, i));
  }
  r.rows.push_back({"vqvae", enc + q.codebook_size * Cz + dec, 0});

  for (const auto& row : r.rows) {
    r.total += row.params;
    r.nf4_params += row.nf4_params;
  }
  r.active_backbone = L * (attn + gate + m.top_k * expert + 2 * D) + D;
  r.active_with_embeddings = r.active_backbone + t.vocab_size * D + (t.tie_word_embeddings ? 0 : t.vocab_size * D);
  r.active_matmul = L * (attn + gate + m.top_k * expert) + t.vocab_size * D;
  r.bytes_fp32 = 4.0 * r.total;
  r.bytes_bf16 = 2.0 * r.total;
  r.bytes_nf4 = r.nf4_params * kNf4BitsPerParam / 8.0 + 2.0 * (r.total - r.nf4_params);
  return r;
}

double train_flops_per_token(const ModelConfig& c, int64_t seq) {
  const auto& t = c.text;
  return 6.0 * static_cast<double>(count_parameters(c).active_matmul) +
         12.0 * static_cast<double>(t.num_layers * t.num_heads * t.head_dim) * static_cast<double>(seq);
}

}  // namespace omnilite
