// Inference with the OMNI-LITE model: greedy text continuation and rectified-flow image sampling.
//
// Captioning feeds [bos, image_begin, image x L, image_end] with the image and continues greedily until eos.
// Image generation feeds [bos, prompt..., image_begin, gen_image x G] and integrates the learnt velocity from noise
// (t = 0) to data (t = 1) with Euler steps; classifier-free guidance mixes the velocity of the prompt and of the
// empty prompt: v = v_uncond + w (v_cond - v_uncond) (w = 1: no guidance).
// Text decoding keeps a KV cache (modules/kv_cache.h): the prompt is processed once, then one token per step.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite {

// prefix: [N, T0] int64 (every row the same length), images: [n_img, C, S, S] for its image placeholders (or
// undefined) -> generated ids [N, max_new]; a row stops at eos (kept) and is padded with pad_id after it.
torch::Tensor greedy_generate(OmniLiteImpl& model, const torch::Tensor& prefix, const torch::Tensor& images,
                              int64_t max_new);

// The ids of one generated row [max_new] before its first eos or pad.
std::vector<int64_t> ids_before_eos(const torch::Tensor& row, const TokenOptions& t);

struct SampleOptions {
  int64_t steps = 25;       // Euler steps from t = 0 (noise) to t = 1
  double cfg_scale = 3.0;   // classifier-free guidance weight w (1 = off)
  uint64_t seed = 0;        // seed of the initial noise
};

// prompts: N token lists (an empty list = unconditional) -> standardised latents [N, C, h, w] (decode with
// model.vqvae->decode_normalized).
torch::Tensor sample_latents(OmniLiteImpl& model, const std::vector<std::vector<int64_t>>& prompts,
                             const SampleOptions& opts);

// One prompt -> standardised latents [1, C, h, w], as sample_latents({prompt}) computes them (same noise for the
// same seed), but the prompt's and the empty prompt's prefixes run once and their KV caches serve every Euler step:
// each step costs the G generated tokens only.
torch::Tensor imagine_latents(OmniLiteImpl& model, const std::vector<int64_t>& prompt, const SampleOptions& opts);

struct TextSampling {
  double temperature = 0.8;  // logits / temperature before sampling; 0 = greedy (argmax)
  int64_t top_k = 0;         // keep the k most probable ids (0 = all; 1 = greedy)
  double top_p = 1.0;        // keep the most probable ids whose mass reaches top_p (1 = all)
  uint64_t seed = 0;         // seed of the sampler's generator: the same seed gives the same text
};

// One id from next-token logits [V] (any dtype/device) under `o`, drawn with `gen`.
int64_t sample_next(const torch::Tensor& logits, const TextSampling& o, at::Generator& gen);

// Continues `prompt` with KV-cached decoding until eos (kept) or max_new ids; on_token (may be empty) sees each id
// as it is chosen. The image placeholders (tokens.image_id, gen_image_id) are never chosen: they stand for images the
// caller supplies. Throws for an empty prompt or one that fills max_position_embeddings.
std::vector<int64_t> generate_text(OmniLiteImpl& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                   const TextSampling& o, const std::function<void(int64_t)>& on_token = {});
// The same after the positions already in `cache`: `ids` (whose image placeholders take `images`, or undefined)
// follow them, and the sampled ids are drawn with `gen`. The cache then holds ids and every sampled id but the last
// (a chat feeds that one first in its next turn), so a conversation continues without recomputing its past.
std::vector<int64_t> continue_text(OmniLiteImpl& model, KVCache& cache, const std::vector<int64_t>& ids,
                                   const torch::Tensor& images, int64_t max_new, const TextSampling& o,
                                   at::Generator& gen, const std::function<void(int64_t)>& on_token = {});

// ids (n >= 2) -> n - 1 values: [i] = log p(ids[i + 1] | ids[0..i]) (fp64 log-softmax of one full forward pass).
std::vector<double> score_tokens(OmniLiteImpl& model, const std::vector<int64_t>& ids);

// A plain OMNI-LITE checkpoint ready for inference: config from its state.json, weights loaded, eval mode, on the
// config's device (or `device` when not empty).
struct LoadedModel {
  Config cfg;                  // the checkpoint's config
  OmniLite model{nullptr};     // weights loaded, eval()
  std::string dir;             // the checkpoint folder read
  int64_t step = 0;            // its training step
};
// run_or_dir: a run folder (newest checkpoint), a checkpoint folder, an `init` or `export` folder. Throws for
// another stage's checkpoint or a QLoRA adapter checkpoint without `adapter`. With `adapter` (a QLoRA run folder),
// run_or_dir is the base ("" = the run's train.base_checkpoint): the run's NF4 bases and adapters, unmerged, as
// they trained; cfg and step are the adapter run's.
LoadedModel load_omni_checkpoint(const std::string& run_or_dir, const std::string& device = "",
                                 const std::string& adapter = "");

// Lower-cased text -> index of the class name that occurs first (as a whole word; the longer name wins a tie,
// so "t-shirt" is not read as "shirt"), or -1 when none occurs.
int64_t find_class_name(const std::string& text, const std::vector<std::string>& names);

}  // namespace omnilite
