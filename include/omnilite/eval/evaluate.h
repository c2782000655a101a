// `omnilite eval`: the quality figures of an OMNI-LITE checkpoint, by task (docs/evaluation.md explains each):
//   ppl      text_ppl = exp(mean next-token cross-entropy) on held-out text (data.text_valid, packed rows), beside
//            unigram_ppl (add-one-smoothed unigram frequencies of the training text) and text_tokens
//   caption  caption_accuracy (first class name in the greedy caption = the image's class; chance 1/classes) and
//            caption_bleu4 against each image's reference captions; captions.png
//   t2i      images generated from "a photo of a <class>." judged by the classifier of data.classifier
//            (t2i_accuracy; classifier_accuracy is its own held-out score) and t2i_frechet, the Fréchet distance of
//            the classifier's features of generated and real held-out images, beside t2i_frechet_floor between two
//            halves of the real ones; t2i_grid.png
//   recon    VQ-VAE reconstruction PSNR of held-out images and codebook usage (perplexity, used and dead codes);
//            recon_grid.png (originals above reconstructions)
//   vqa      questions about images (LLaVA-format records of --data or data.sft_valid) answered greedily under the
//            chat template, exact match after normalisation: vqa_accuracy and vqa_by_type (eval/vqa.h)
//   moe      per-layer expert load on held-out text tokens and image tokens (tokens per expert, coefficient of
//            variation, balancing-loss value, top-k set repeats between adjacent tokens); expert_load.png
// Every run also writes loss_curves.png and train_stats.png when the run folder has metrics.jsonl, and eval.json
// with the checkpoint's step, the config hash and the seed.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/data/image_dataset.h"

namespace omnilite {

struct EvalOptions {
  std::string checkpoint;          // run folder (newest checkpoint) or checkpoint folder of an omni run
  std::vector<std::string> tasks = {"ppl", "caption", "t2i", "recon", "moe", "vqa"};  // what to measure
  std::string adapter;             // a QLoRA run folder: its adapters over `checkpoint` ("" = the run's base)
  std::string classifier;          // classifier run/checkpoint ("" = data.classifier of the checkpoint's config)
  std::string device;              // "" = runtime.device of the checkpoint's config
  std::string nf4_activations;     // "" = runtime.nf4_activations of the checkpoint's config; "fp32" or "int16"
  int64_t caption_images = 500;    // held-out images captioned
  int64_t max_caption_tokens = 16; // longest generated caption
  int64_t t2i_per_class = 20;      // images generated per class
  int64_t flow_steps = 25;         // Euler steps of the sampler
  double cfg_scale = 3.0;          // classifier-free guidance weight
  int64_t text_rows = 64;          // held-out text rows (of train.seq_len tokens) for text_ppl
  int64_t recon_images = 500;      // held-out images reconstructed by the VQ-VAE
  int64_t moe_rows = 16;           // held-out text rows and caption rows (with images) routed for `moe`
  std::string out_dir;             // where eval.json and the PNGs go ("" = the run folder)
  uint64_t seed = 0;               // sampling seed
  std::vector<std::string> vqa_data;  // vqa: conversation files (eval/vqa.h; empty = data.sft_valid of the config)
  int64_t vqa_questions = 1000;    // vqa: answers scored at most (0 = all)
  int64_t max_answer_tokens = 16;  // vqa: longest generated answer
};

// Runs the tasks whose data is configured; throws with a clear message for a missing checkpoint or data, or an
// unknown task.
nlohmann::json evaluate(const EvalOptions& opts);
// "ppl,moe" or "all" -> the task list; throws naming an unknown task.
std::vector<std::string> parse_eval_tasks(const std::string& list);

// Held-out images of data.image_valid loaded at `size` (at most `max_images`; empty when unset). Throws naming the
// image and the value when a label lies outside the Fashion-MNIST class names eval scores against.
ImageCaptionSet held_out_images(const Config& cfg, int64_t size, int64_t max_images);

// Reports (PNG, drawn with OpenCV, written atomically). Keys absent from metrics.jsonl are skipped.
// The given metrics.jsonl keys against step: raw per step (thin) and EMA-smoothed (thick).
void write_loss_curves(const std::string& metrics_jsonl, const std::vector<std::string>& keys, const std::string& png);
// Learning rate, gradient norm and tokens/s against step, one panel each.
void write_training_stats(const std::string& metrics_jsonl, const std::string& png);
// Several runs' curves of each key in one panel per key (labels name the runs).
void write_run_comparison(const std::vector<std::string>& metrics_files, const std::vector<std::string>& labels,
                          const std::vector<std::string>& keys, const std::string& png);
// values [R, C] as a colour map (e.g. layer x expert load); col_label is printed under the map.
void write_heatmap(const torch::Tensor& values, const std::string& title, const std::string& row_label,
                   const std::string& col_label, const std::string& png);
// images [N, C, H, W] in [-1, 1] enlarged 4x in a grid of `cols` columns, each with its caption under it.
void write_captioned_grid(const torch::Tensor& images, const std::vector<std::string>& captions, int64_t cols,
                          const std::string& png);

}  // namespace omnilite
