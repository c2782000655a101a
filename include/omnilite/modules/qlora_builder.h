// The builder of QLoRA models: for every projection the blocks ask for, a frozen base (NF4, or fp32 where
// lora.base_dtype = "fp32", the path matches lora.full_precision, or in_features is not a multiple of 64) wrapped
// in a LoRA adapter when the path matches lora.target_modules. Blocks never know which variant they hold.
#pragma once

#include <memory>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

// What QLoRA makes of the projection at `path` with `in` input features (QLoRABuilder builds it, RecordingBuilder
// counts it).
struct QLoRAChoice {
  bool nf4 = false;    // frozen NF4 base (else fp32)
  bool lora = false;   // wrapped in an adapter (lora.target_modules)
  bool saved = false;  // trained in full and saved with the adapters (lora.modules_to_save): fp32, no adapter
};
QLoRAChoice qlora_choice(const LoRAOptions& o, const std::string& path, int64_t in);

struct QLoRABuilder : LinearBuilder {
  explicit QLoRABuilder(LoRAOptions opts) : opts(std::move(opts)) {}
  std::shared_ptr<LinearBaseImpl> make(const std::string& path, int64_t in_features, int64_t out_features,
                                       bool bias) const override;
  LoRAOptions opts;
};

// The builder a config asks for: QLoRABuilder when lora.enabled, the plain builder otherwise.
std::unique_ptr<LinearBuilder> make_linear_builder(const Config& cfg);

struct OmniLiteImpl;
// QLoRA on the CPU (after train_adapters_only): a bf16 base's frozen token embedding and LM head (0.25 GiB each in
// float32 for the full model) are stored in bf16 when every value is a bf16 value; rows and products widen them
// exactly (OmniLite's embedding input, linear_cross_entropy_sum), so losses and gradients are those of the float32
// tables. Trainable or non-bf16 tables stay as they are. Returns how many of the two it narrowed.
int narrow_frozen_tables(OmniLiteImpl& model);

}  // namespace omnilite
