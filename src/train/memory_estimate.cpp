#include "omnilite/train/memory_estimate.h"

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "omnilite/data/mm_batch.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/attention.h"
#include "omnilite/modules/losses.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/param_count.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/pattern.h"
#include "omnilite/quant/nf4.h"
#include "omnilite/train/zero.h"

namespace omnilite {
namespace {

// Weights, gradients and AdamW state: the projections as the builder records them, every other tensor as the
// model holds it.
void estimate_weights(const Config& cfg, const RecordingBuilder& rec, const OmniLiteImpl& model, MemoryEstimate& e) {
  const auto& tr = cfg.train;
  auto trainable_full = [&](const std::string& name) {
    if (name.rfind("vqvae.", 0) == 0) return false;  // omni always freezes the VQ-VAE
    if (cfg.lora.enabled) return matches_any(name, cfg.lora.modules_to_save);
    return !matches_any(name, tr.freeze);
  };
  // trainable values per block of ZeRO-3's block lists, and of the rest (its root unit)
  std::map<std::string, int64_t> per_block;
  const auto block_lists = omni_block_lists(tr);
  auto count_unit = [&](const std::string& name, int64_t n) {
    for (const auto& prefix : block_lists)
      if (const int64_t b = block_index(name, prefix); b >= 0) {
        per_block[prefix + std::to_string(b)] += n;
        return;
      }
    e.root_trainable += n;
  };
  for (const auto& [path, p] : rec.seen) {
    const int64_t n = p.in * p.out;
    if (p.lora) count_unit(path, cfg.lora.rank * (p.in + p.out));
    if (p.nf4) {
      const int64_t nb = n / quant::kNf4BlockSize;
      e.nf4_params += n;
      e.nf4_code_bytes += static_cast<double>(n) / 2;
      e.nf4_const_bytes += static_cast<double>(nb) + 4.0 * static_cast<double>((nb + quant::kAbsmaxBlockSize - 1) /
                                                                             quant::kAbsmaxBlockSize) + 4.0;
      if (p.bias) e.full_params += p.out;
    } else {
      e.full_params += n + (p.bias ? p.out : 0);
      if (trainable_full(path + ".weight")) {
        e.trainable_params += n + (p.bias ? p.out : 0);
        count_unit(path, n + (p.bias ? p.out : 0));
      }
    }
    if (p.lora) e.lora_params += cfg.lora.rank * (p.in + p.out);
  }
  // QLoRA on the CPU keeps a bf16 base's frozen token embedding and LM head in bf16 (OmniStage::setup_model)
  const bool bf16_tables = cfg.lora.enabled && cfg.runtime.device == "cpu";
  double narrowed = 0;
  for (const auto& [name, t] : io::state_tensors(model)) {
    if (rec.is_placeholder(name)) continue;
    e.full_params += t.numel();
    const bool trains = t.requires_grad() && trainable_full(name);
    if (trains) {
      e.trainable_params += t.numel();
      count_unit(name, t.numel());
    } else if (bf16_tables && (name == "text.embed_tokens.weight" || name == "lm_head.weight")) {
      narrowed += static_cast<double>(t.numel());
    }
  }
  for (const auto& [block, n] : per_block) e.layer_trainable = std::max(e.layer_trainable, n);
  e.trainable_params += e.lora_params;
  e.full_bytes = 4.0 * static_cast<double>(e.full_params) - 2.0 * narrowed;
  e.lora_bytes = 4.0 * static_cast<double>(e.lora_params);
  e.grad_bytes = 4.0 * static_cast<double>(e.trainable_params);
  e.adam_bytes = 8.0 * static_cast<double>(e.trainable_params);
}

// Activations (floats) of one micro-batch: per decoder layer, the LM head and the vision tower.
void estimate_activations(const Config& cfg, const RecordingBuilder& rec, MemoryEstimate& e) {
  const auto& m = cfg.model;
  const auto& tr = cfg.train;
  const auto& t = m.text;
  const int64_t D = t.hidden_size, H = t.num_heads, Hk = t.num_kv_heads, Dh = t.head_dim;
  const int64_t E = m.moe.num_experts, K = m.moe.top_k, F = m.moe.expert_hidden, V = t.vocab_size;
  const int64_t mm_rows = tr.caption_batch_size + tr.gen_batch_size;
  const int64_t mm_len = tr.image_seq_len > 0
                             ? tr.image_seq_len
                             : std::max(m.resampler.num_latents, generated_tokens_per_image(m)) + 32;
  // conversation rows: train.sft_seq_len tokens (0 = the longest sample, unknown here: taken as train.seq_len)
  const int64_t sft_len = tr.sft_seq_len > 0 ? tr.sft_seq_len : tr.seq_len;
  const double N = static_cast<double>(tr.batch_size * tr.seq_len + mm_rows * mm_len + tr.sft_batch_size * sft_len);
  // scores per forward of `rows` rows of `len` tokens: [rows, H, len, len], or one chunk of query rows of them
  // when attention_core chunks (modules/attention.h)
  auto score_rows = [H](int64_t rows, int64_t len) {
    if (rows <= 0) return 0.0;
    const int64_t q_rows = std::min(len, attention_chunk_rows(rows, H, len, 4));
    return static_cast<double>(rows) * static_cast<double>(q_rows) * static_cast<double>(len);
  };
  const double TT = score_rows(tr.batch_size, tr.seq_len) + score_rows(mm_rows, mm_len) +
                    score_rows(tr.sft_batch_size, sft_len);
  e.tokens = static_cast<int64_t>(N);
  // LoRA extras of one layer: dropout output and mask (when dropout > 0) plus the rank-r activation, per projection.
  double lora_layer = 0;
  const double drop = cfg.lora.dropout > 0 ? 2.0 : 0.0;
  for (const auto& [path, p] : rec.seen) {
    if (!p.lora || path.rfind("text.layers.0.", 0) != 0) continue;
    const bool expert = path.find(".experts.") != std::string::npos;
    const double rows = expert ? N * static_cast<double>(K) / static_cast<double>(E) : N;  // tokens an expert sees
    lora_layer += rows * (drop * static_cast<double>(p.in) + static_cast<double>(cfg.lora.rank));
  }
  const double attn = N * D * 3                      // residual input, norm output, attention output projection in
                      + N * (H + 2 * Hk) * Dh        // q, k, v
                      + N * (H + Hk) * Dh            // q, k after RoPE
                      + 2.0 * H * TT                 // scores and probabilities [H, T, T] per row (or chunk)
                      + N * H * Dh;                  // attention output before o_proj
  const double moe = N * D * 2                       // residual, norm output
                     + 2.0 * N * E                   // router logits, probabilities
                     + N * K * D * 3                 // gathered inputs, expert outputs, weighted outputs
                     + N * K * F * 4;                // w1, w3, silu(w1), product
  const double layer = attn + moe + lora_layer;
  // final norm in/out, the rows that predict a target and their gradient (and the gradient of all rows); one chunk
  // of logits, probabilities and their gradient, and the logits' gradient when the forward keeps it (clm_loss_sum,
  // modules/losses.h)
  const double ce_rows = std::min(N, static_cast<double>(cross_entropy_chunk_rows(V)));
  const double kept = N * V * 4 <= static_cast<double>(kKeepLogitGradBytes) ? N * V : 0.0;
  const double head = N * D * 5 + 3.0 * ce_rows * V + kept;
  double vision = 0;
  if (tr.caption_batch_size > 0) {
    const auto& v = m.vision;
    const double P = static_cast<double>((v.image_size / v.patch_size) * (v.image_size / v.patch_size) +
                                         (v.class_token ? 1 : 0));  // tokens per image (+ the class token)
    const double block = P * v.width * 8 + 2.0 * v.num_heads * P * P + P * v.mlp_dim * 3;
    vision = static_cast<double>(tr.caption_batch_size) * (v.depth * block + P * v.width * 2);
  }
  const double L = static_cast<double>(t.num_layers);
  e.act_layer_bytes = 4.0 * layer;
  e.act_checkpointed = 4.0 * (L * N * D + 2.0 * layer + head + vision);
  e.act_full = 4.0 * (L * layer + head + vision);
}

}  // namespace

ShardedMemory sharded_memory(const MemoryEstimate& e, int64_t world, int64_t zero) {
  const double W = static_cast<double>(std::max<int64_t>(1, world));
  const double trainable = 4.0 * static_cast<double>(e.trainable_params);
  ShardedMemory m;
  m.trainable_weights = zero >= 3 ? trainable / W : trainable;
  m.frozen_weights = e.nf4_code_bytes + e.nf4_const_bytes + e.full_bytes + e.lora_bytes - trainable;
  m.grads = zero >= 2 ? trainable / W : trainable;
  m.adam = zero >= 1 ? 2.0 * trainable / W : 2.0 * trainable;
  if (zero >= 3 && world > 1) {
    const double root = 4.0 * static_cast<double>(e.root_trainable);
    const double layer = 4.0 * static_cast<double>(e.layer_trainable);
    // a block's backward: root weights and gradients, the block's weights, gradients and packed copy, and the
    // prefetched block; the root's reduce-scatter: root weights, gradients and packed copy
    m.gathered_peak = 2.0 * root + std::max(4.0 * layer, root);
  }
  return m;
}

MemoryEstimate estimate_training_memory(const Config& cfg) {
  MemoryEstimate e;
  e.checkpointing = cfg.train.activation_checkpointing;
  RecordingBuilder rec(cfg.lora);
  OmniLite model(cfg.model, rec);
  estimate_weights(cfg, rec, *model, e);
  estimate_activations(cfg, rec, e);
  return e;
}

}  // namespace omnilite
