// The builder of QLoRA models: for every projection the blocks ask for, a frozen base (NF4, or fp32 where
// lora.base_dtype = "fp32", the path matches lora.full_precision, or in_features is not a multiple of 64) wrapped
// in a LoRA adapter when the path matches lora.target_modules. Blocks never know which variant they hold.
#pragma once

#include <memory>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

struct QLoRABuilder : LinearBuilder {
  explicit QLoRABuilder(LoRAOptions opts) : opts(std::move(opts)) {}
  std::shared_ptr<LinearBaseImpl> make(const std::string& path, int64_t in_features, int64_t out_features,
                                       bool bias) const override;
  LoRAOptions opts;
};

// The builder a config asks for: QLoRABuilder when lora.enabled, the plain builder otherwise.
std::unique_ptr<LinearBuilder> make_linear_builder(const Config& cfg);

}  // namespace omnilite
