// The whole OMNI-LITE model over one mixed sequence.
//
// A row of `tokens` holds text ids and two kinds of placeholders:
//  - image understanding: a run of num_latents `tokens.image_id`; the resampled features of the next image of
//    `images` (in row-major order of the batch) replace their embeddings;
//  - image generation: a run of `tokens.gen_image_id`, one per latent token; their embeddings are the flow head's
//    input embedding of the next rows of `gen_latents` (noisy latents x_t at times `gen_times`).
// Attention is causal, except that the tokens of one generated-image run see each other (Transfusion); with
// `segments`, packed samples see only themselves.
// Module names (the checkpoint keys): vision, resampler, text, lm_head, flow, vqvae.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/lm_head.h"
#include "omnilite/modules/perceiver_resampler.h"
#include "omnilite/modules/rfm_head.h"
#include "omnilite/modules/text_decoder.h"
#include "omnilite/modules/vision_encoder.h"
#include "omnilite/modules/vqvae.h"

namespace omnilite {

struct OmniInput {
  torch::Tensor tokens = {};       // [B, T] int64
  torch::Tensor images = {};       // [N_img, C, H, W] float, one per image_id run; undefined when none
  torch::Tensor gen_latents = {};  // [n_gen, P] noisy latent tokens, one per gen_image_id token; undefined when none
  torch::Tensor gen_times = {};    // [n_gen] flow time of each generated token's image, in [0, 1]
  torch::Tensor segments = {};     // [B, T] int64 packed samples: a position attends only to earlier positions of its
                                   // own segment (a run of equal ids), and positions restart at 0 in each; undefined =
                                   // one sample per row. Not with a cache.
  bool compute_logits = true; // false skips the LM head (e.g. flow-only steps)
  bool last_logits = false;   // logits of the last position only ([B, 1, V]): a prompt's prefill needs no more
  KVCache* cache = nullptr;   // inference: tokens continue the cached positions (see kv_cache.h); every row of the
                              // batch shares the cache's length
};

struct OmniOutput {
  torch::Tensor hidden;                      // [B, T, D] final hidden states
  torch::Tensor logits;                      // [B, T, V] next-token logits (undefined if not requested)
  torch::Tensor velocity;                    // [n_gen, P] predicted velocities at the gen_image_id tokens
  std::vector<torch::Tensor> router_logits;  // num_layers x [B*T, E]
};

// Generated-image block id of every position: 0 for other tokens, k >= 1 for the k-th run of gen_image_id in its
// row. tokens: [B, T] -> [B, T] int64.
torch::Tensor generated_block_ids(const torch::Tensor& tokens, int64_t gen_image_id);
// Attention mask of a mixed sequence: allowed[b, 0, i, j] = j <= i or (i, j in the same generated block).
// tokens: [B, T] -> bool [B, 1, T, T]
torch::Tensor mixed_attention_mask(const torch::Tensor& tokens, int64_t gen_image_id);

// segments [B, T] int64 -> positions [B, T] int64: the index of each position within its segment (a run of equal
// ids).
torch::Tensor segment_positions(const torch::Tensor& segments);
// tokens [B, T] -> segments [B, T] int64: a new segment at every bos_id (packed documents each start with BOS).
torch::Tensor segments_from_bos(const torch::Tensor& tokens, int64_t bos_id);

struct OmniLiteImpl : torch::nn::Module {
  explicit OmniLiteImpl(const ModelConfig& cfg, const LinearBuilder& builder = LinearBuilder());
  OmniOutput forward(const OmniInput& in);
  // images: [N, C, H, W] -> [N, num_latents, D] tokens in the text space
  torch::Tensor encode_images(const torch::Tensor& images);

  ModelConfig cfg;
  VisionEncoder vision{nullptr};          // patch embedding + ViT
  PerceiverResampler resampler{nullptr};  // vision features -> num_latents text-space tokens
  TextDecoder text{nullptr};              // embedding + GQA/MoE decoder layers + final norm
  LMHead lm_head{nullptr};                // D -> V
  RFMHead flow{nullptr};                  // rectified-flow input embedding and velocity head
  VQVAE vqvae{nullptr};                   // image <-> latent (trained in its own stage)
};
TORCH_MODULE(OmniLite);

// One top-level piece of the model, constructed on its own: its tensors are those of the whole model under
// "prefix." (e.g. "text.layers.7"). Used to write a full-size checkpoint piece by piece (`omnilite init`).
struct ModelPart {
  std::string prefix;                                        // checkpoint-key prefix of the piece
  std::function<std::shared_ptr<torch::nn::Module>()> make;  // builds the piece with its own initialisation
};
// The pieces in the whole model's registration order: vision, resampler, text.embed_tokens, text.layers.0 ..
// text.layers.{L-1}, text.norm, lm_head (absent when tied), flow, vqvae. Together they hold exactly the tensors of
// OmniLite(cfg, builder) (a test checks names, shapes and dtypes), and no piece is larger than one ViT or decoder
// layer or the embedding table. The parts refer to `cfg` and `builder`, which must outlive them.
std::vector<ModelPart> model_parts(const ModelConfig& cfg, const LinearBuilder& builder);

}  // namespace omnilite
