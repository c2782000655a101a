// One decoded token of the text decoder on the CPU, without LibTorch's per-op dispatch (batch-1 decoding).
//
// The module path (OmniLite::forward with a KVCache) runs about a hundred small LibTorch ops per layer for one
// token; on two cores they and the fork/join around them took ~40% of a decoded token (docs/benchmarks.md). TextStep
// runs the same arithmetic on raw buffers: the projections with the kernels the modules call (one-row NF4,
// quant/nf4.h; float32 / bf16 matrix-vector, quant/gemv.h), a layer's q, k and v in one parallel region, the routed
// experts' w1 and w3 in one, their w2 in one; the norms, RoPE (with rope_tables' own tables), the cache write, the
// router and SiLU in plain loops; attention with the module path's one-query kernel. Outputs equal the module
// path's within float32 rounding (summation order only; tests/test_text_step.cpp compares both).
//
// It takes models on the CPU whose projections are plain, NF4 or LoRA over either (a QLoRA base with its adapter)
// and whose weights are float32 or bf16: a bf16 model's weights are widened exactly as they are read, and its
// activations and cache are float32 (as llama.cpp's are), so its logits are those of the float32 model holding the
// same values, within float32 rounding; the bf16 cache of a bf16 model's prompt is widened on the first step.
// text_step_obstacle names what else stops it. Prompts (several tokens) and image placeholders keep the module path.
#pragma once

#include <memory>
#include <string>

#include <torch/torch.h>

#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite {

// Why `model` cannot decode through TextStep, or "" when it can.
std::string text_step_obstacle(OmniLiteImpl& model);

class TextStep {
 public:
  // Reads the model's buffers (it must outlive the step and keep its weights); throws naming the obstacle.
  explicit TextStep(OmniLiteImpl& model);
  ~TextStep();
  TextStep(TextStep&&) noexcept;
  TextStep& operator=(TextStep&&) noexcept;

  // Whether `token` can take the step after `cache`: a text id (no image placeholder), a batch-1 float32 or bf16
  // CPU cache that appends (or an empty one), and room in the context.
  bool accepts(int64_t token, const KVCache& cache) const;
  // `token` at position cache.length() -> its next-token logits [V] float32; its keys and values are appended.
  torch::Tensor logits(int64_t token, KVCache& cache);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace omnilite
