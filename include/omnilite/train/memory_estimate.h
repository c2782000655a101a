// `omnilite memory`: what training a config's omni model holds in memory, from its shapes alone.
//
// Weights: NF4 codes (4 bits) and their double-quantised constants (8-bit absmax per 64 values, an fp32 scale per
// 256 absmax values, one mean) for the projections the QLoRA builder quantises; every other tensor at 4 bytes (the
// model is kept in fp32; CUDA autocast computes in bf16 from fp32 weights). LoRA parameters, their gradients and
// AdamW's two moments (4 bytes each) for what trains. Activations of one micro-batch (train.batch_size text rows of
// train.seq_len, plus the image-caption rows), counted as the tensors autograd keeps for backward:
//   - per decoder layer: norm inputs/outputs, q/k/v before and after RoPE, attention scores and probabilities
//     [H, T, T] (the LibTorch 1.13 path materialises them; rows whose [B, H, T, T] scores pass 32 MiB are computed
//     a chunk of query rows at a time, attention_chunk_rows in modules/attention.h), the attention output, router
//     logits and probabilities, the top-k gathered expert inputs and SwiGLU intermediates, and for each LoRA
//     projection its dropout output and mask and its rank-r activation;
//   - with activation checkpointing: each layer's input plus one layer's activations twice (recomputation and its
//     backward's temporaries); without: every layer's activations;
//   - the LM head: the CLM loss is computed from the hidden states a chunk of rows at a time (clm_loss_sum in
//     modules/losses.h): one chunk's logits, probabilities and gradient (3 x chunk x V), the logits' gradient
//     (rows x V) when it fits the 128 MiB the forward keeps, the rows that predict a target and their gradients;
//   - the ViT and resampler for caption images (not checkpointed).
// The process itself (LibTorch, OpenBLAS, the CLI) is added as measured at the start of `omnilite memory`.
// Data parallelism (sharded_memory): what one of W ranks holds at ZeRO stage 0-3 (zero.h): the AdamW moments /W
// from stage 1, the gradients /W from 2, the trainable weights /W at 3, plus at 3 what is gathered at the peak of a
// step (the root unit's weights and gradients, and the larger of a block's weights, gradients and
// reduce-scatter buffer with the prefetched next block, or the root's buffer).
// docs/benchmarks.md compares the estimate with the peak resident memory measured by /usr/bin/time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "omnilite/config.h"

namespace omnilite {

struct MemoryEstimate {
  int64_t nf4_params = 0;        // weights stored as NF4
  int64_t full_params = 0;       // weights and buffers held at 4 bytes (embeddings, LM head, norms, routers, ...)
  int64_t lora_params = 0;       // LoRA A and B values
  int64_t trainable_params = 0;  // values that get gradients and AdamW state
  double nf4_code_bytes = 0;     // 4-bit codes
  double nf4_const_bytes = 0;    // absmax codes, scales and means
  double full_bytes = 0;         // full_params * 4, less 2 per value of QLoRA's frozen bf16 tables on the CPU
  double lora_bytes = 0;         // lora_params * 4
  double grad_bytes = 0;         // trainable_params * 4
  double adam_bytes = 0;         // trainable_params * 8 (two moments)
  int64_t tokens = 0;            // tokens of one micro-batch
  double act_layer_bytes = 0;    // activations of one decoder layer
  double act_checkpointed = 0;   // all activations with activation checkpointing
  double act_full = 0;           // all activations without
  double process_bytes = 0;      // resident memory of the process before any model exists (set by the caller)
  bool checkpointing = false;    // train.activation_checkpointing of the config
  int64_t root_trainable = 0;    // trainable values outside the decoder layers and ViT blocks (ZeRO-3's root unit)
  int64_t layer_trainable = 0;   // trainable values of the largest decoder layer or ViT block

  double state_bytes() const {   // weights + adapters + gradients + optimizer
    return nf4_code_bytes + nf4_const_bytes + full_bytes + lora_bytes + grad_bytes + adam_bytes;
  }
  double total(bool with_checkpointing) const {
    return state_bytes() + (with_checkpointing ? act_checkpointed : act_full) + process_bytes;
  }
};

// One rank's share at `world` ranks and ZeRO `zero` (bytes; the trainable tensors are fp32).
struct ShardedMemory {
  double trainable_weights = 0;  // the trainable weights it keeps (/W at stage 3)
  double frozen_weights = 0;     // NF4 codes and constants, frozen and non-trainable tensors (never sharded)
  double grads = 0;              // gradients it keeps between steps (/W from stage 2)
  double adam = 0;               // AdamW moments (/W from stage 1)
  double gathered_peak = 0;      // stage 3: gathered during a step on top of the above
  // what training measures as held (mem_*_mib): trainable weights, gradients, moments
  double state() const { return trainable_weights + grads + adam; }
};
ShardedMemory sharded_memory(const MemoryEstimate& e, int64_t world, int64_t zero);

// Estimates the omni stage of `cfg` (lora on or off). Builds the model with placeholder projections to enumerate
// what the builder makes, so it allocates only the non-projection tensors (~0.6 GB for the full model).
MemoryEstimate estimate_training_memory(const Config& cfg);

}  // namespace omnilite
