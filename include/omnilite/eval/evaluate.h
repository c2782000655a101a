// `omnilite eval`: the quality figures of an OMNI-LITE checkpoint.
//   caption_accuracy    held-out labelled images (data.image_valid) captioned greedily; a hit when the first class
//                       name in the caption is the image's class (chance 1/classes)
//   t2i_accuracy        images generated from "a photo of a <class>." (rectified flow + CFG, decoded by the VQ-VAE)
//                       judged by the classifier of data.classifier; classifier_accuracy is its own held-out score
//   text_ppl            exp(mean next-token cross-entropy) on held-out text (data.text_valid, packed rows)
//   unigram_ppl         the same tokens under add-one-smoothed unigram frequencies of the training text
// It also writes a PNG grid of generated images (one row per class) and, when the run folder has metrics.jsonl, a
// PNG of the loss curves.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace omnilite {

struct EvalOptions {
  std::string checkpoint;          // run folder (newest checkpoint) or checkpoint folder of an omni run
  std::string classifier;          // classifier run/checkpoint ("" = data.classifier of the checkpoint's config)
  std::string device;              // "" = runtime.device of the checkpoint's config
  int64_t caption_images = 500;    // held-out images captioned
  int64_t max_caption_tokens = 16; // longest generated caption
  int64_t t2i_per_class = 20;      // images generated per class
  int64_t flow_steps = 25;         // Euler steps of the sampler
  double cfg_scale = 3.0;          // classifier-free guidance weight
  int64_t text_rows = 64;          // held-out text rows (of train.seq_len tokens) for text_ppl
  std::string out_dir;             // where eval.json and the PNGs go ("" = the run folder)
  uint64_t seed = 0;               // sampling seed
};

// Runs every measurement whose data is configured; throws with a clear message for a missing checkpoint or data.
nlohmann::json evaluate(const EvalOptions& opts);

// The run folder of a checkpoint folder (".../run/checkpoints/step_N" -> ".../run").
std::string run_folder_of(const std::string& checkpoint_dir);

// Draws the given metrics.jsonl keys against step into a PNG (atomically). Keys absent from the file are skipped.
void write_loss_curves(const std::string& metrics_jsonl, const std::vector<std::string>& keys, const std::string& png);

}  // namespace omnilite
