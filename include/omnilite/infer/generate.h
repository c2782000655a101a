// Inference with the OMNI-LITE model: greedy text continuation and rectified-flow image sampling.
//
// Captioning feeds [bos, image_begin, image x L, image_end] with the image and continues greedily until eos.
// Image generation feeds [bos, prompt..., image_begin, gen_image x G] and integrates the learnt velocity from noise
// (t = 0) to data (t = 1) with Euler steps; classifier-free guidance mixes the velocity of the prompt and of the
// empty prompt: v = v_uncond + w (v_cond - v_uncond) (w = 1: no guidance). Both re-run the full sequence at every
// step (no KV cache yet).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/modules/omnilite.h"

namespace omnilite {

// prefix: [N, T0] int64 (every row the same length), images: [n_img, C, S, S] for its image placeholders (or
// undefined) -> generated ids [N, max_new]; a row stops at eos (kept) and is padded with pad_id after it.
torch::Tensor greedy_generate(OmniLiteImpl& model, const torch::Tensor& prefix, const torch::Tensor& images,
                              int64_t max_new);

struct SampleOptions {
  int64_t steps = 25;       // Euler steps from t = 0 (noise) to t = 1
  double cfg_scale = 3.0;   // classifier-free guidance weight w (1 = off)
  uint64_t seed = 0;        // seed of the initial noise
};

// prompts: N token lists (an empty list = unconditional) -> standardised latents [N, C, h, w] (decode with
// model.vqvae->decode_normalized).
torch::Tensor sample_latents(OmniLiteImpl& model, const std::vector<std::vector<int64_t>>& prompts,
                             const SampleOptions& opts);

// Lower-cased text -> index of the class name that occurs first (as a whole word; the longer name wins a tie,
// so "t-shirt" is not read as "shirt"), or -1 when none occurs.
int64_t find_class_name(const std::string& text, const std::vector<std::string>& names);

}  // namespace omnilite
