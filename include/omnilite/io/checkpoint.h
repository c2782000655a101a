// Model weights <-> safetensors. Tensor names are the registered module paths (the checkpoint keys).
// Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/files.h"
#include "omnilite/io/safetensors.h"

namespace omnilite::io {

// Parameters and buffers of `m` in registration order, named by their module paths.
std::vector<std::pair<std::string, torch::Tensor>> state_tensors(const torch::nn::Module& m);

// Writes the state of `m` to `path` atomically (dtype as held, or converted to `dtype` when given).
void save_module(const torch::nn::Module& m, const std::string& path,
                 const std::map<std::string, std::string>& metadata = {},
                 c10::optional<torch::ScalarType> dtype = c10::nullopt);

// Copies every tensor of `path` (a .safetensors file, a checkpoint folder or a sharded / Hugging Face export folder:
// see WeightsReader) into `m`, converted to each parameter's dtype and device. Throws naming the checkpoint and the
// tensor for a missing, unexpected or mis-shaped one; checks the CRC first when `verify`.
void load_module(torch::nn::Module& m, const std::string& path, bool verify = true);

// Checkpoint folders hold state.json: {"version", "stage", "step", "config", ...}; version of the layout:
constexpr int kCheckpointVersion = 1;
// state.json of a checkpoint folder (for an `export --format hf` folder, the "omnilite" section of its config.json,
// with data.tokenizer pointing at the folder's tokenizer.model); throws naming the folder when it is missing, unreadable, lacks the config or
// is of another version.
nlohmann::json read_checkpoint_state(const std::string& dir);
// The run folder a checkpoint path belongs to: RUN for RUN/checkpoints/step_N, the path itself otherwise (a run
// folder, an init or export folder). `train --resume` without --out continues there; eval writes there.
std::string run_folder_of(const std::string& path);

// The newest checkpoint folder under a run folder (or the folder itself if it is a checkpoint); throws if none.
std::string latest_checkpoint(const std::string& dir);
// A config (JSON, as read from a file) without a "model" section trains the model of its base, as from_pretrained
// takes the architecture from the checkpoint: `config` with the model section, and data.tokenizer unless it names
// one, of the base (a run, checkpoint, init or export folder). Throws naming the base when it has no config.
nlohmann::json with_base_model(nlohmann::json config, const std::string& base);
// Weights of a VQ-VAE stage run (run folder or checkpoint folder) into `vqvae`; throws naming the folder.
void load_vqvae_weights(torch::nn::Module& vqvae, const std::string& run_or_checkpoint);

}  // namespace omnilite::io
