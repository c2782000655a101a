// `omnilite init`: a full-size, randomly initialised OMNI-LITE checkpoint, written piece by piece.
//
// The model is never built whole: each piece of model_parts() (a ViT, a decoder layer, the embedding table, ...)
// is constructed with the model's own initialisation, streamed into one safetensors file and freed, so the peak
// memory is about one piece (~0.4 GB fp32 for a full-size decoder layer) instead of the checkpoint's size. The folder
// (model.safetensors + state.json with the config) is a base for QLoRA (`--base`), and a checkpoint that `eval` and
// `export` read.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/io/part_import.h"

namespace omnilite::io {

struct InitCheckpointOptions {
  std::string out_dir;                          // folder to create (refused if it already holds model.safetensors)
  torch::ScalarType dtype = torch::kBFloat16;   // storage type of floating tensors (bf16 or fp32)
  uint64_t seed = 0;                            // piece k is initialised after torch::manual_seed(seed + k)
  std::vector<PartSource> from;                 // parts taken from pretrained checkpoints (io/part_import.h)
};

struct InitCheckpointResult {
  int64_t tensors = 0;  // tensors written
  int64_t params = 0;   // values written (parameters and buffers)
  uint64_t bytes = 0;   // size of model.safetensors
  int64_t imported = 0; // tensors taken from the --from sources
  Config config;        // the config the checkpoint is of (a tokenizer part sets its vocabulary, ids and tokenizer)
};

// Writes out_dir/model.safetensors, out_dir/state.json and out_dir/config.json (the whole config, to train with)
// atomically; `progress` (may be empty) is called after each piece with (pieces done, pieces in all). With a
// tokenizer part, out_dir/tokenizer.model is the extended tokenizer. A text part whose folder holds a tokenizer.model
// brings it as the tokenizer part unless one is named.
InitCheckpointResult write_init_checkpoint(const Config& cfg, const InitCheckpointOptions& opts,
                                           const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace omnilite::io
