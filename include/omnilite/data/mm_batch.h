// Multimodal training rows and the deterministic sampler that builds micro-batches from image-caption data.
//
// Row layouts (L = resampler.num_latents, G = generated latent tokens per image):
//   image -> caption (understanding): [bos, image_begin, image x L, image_end, caption..., eos]
//   caption -> image (generation):    [bos, prompt..., image_begin, gen_image x G, image_end, eos]
// A generation sample's prompt is dropped (empty) with probability train.cfg_dropout, so that the model also learns
// the unconditional velocity that classifier-free guidance needs. Every draw (sample order, caption variant,
// prompt drop, noise, flow time) depends only on the seed and the micro-batch index, so a resumed run and any
// number of loader threads see the same batches.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite {

std::vector<int64_t> caption_row(const std::vector<int64_t>& caption, int64_t num_latents, const TokenOptions& t);
std::vector<int64_t> generation_row(const std::vector<int64_t>& prompt, int64_t gen_tokens, const TokenOptions& t);
// rows -> [n, T] int64 right-padded with pad_id; throws naming the row when one is longer than T.
torch::Tensor pad_rows(const std::vector<std::vector<int64_t>>& rows, int64_t T, int64_t pad_id);
// Latent tokens of one generated image: (image_size / 2^n / p)^2.
int64_t generated_tokens_per_image(const ModelConfig& m);

// splitmix64: a well-mixed 64-bit function, for independent seeds of (seed, stream, item).
uint64_t splitmix64(uint64_t x);

// Sample k of an endless sequence of epochs, each a fresh permutation of [0, n) (epoch_permutation); thread-safe.
class EpochSampler {
 public:
  EpochSampler(int64_t n, uint64_t seed) : n_(n), seed_(seed) {}
  int64_t at(int64_t k) const;
  int64_t size() const { return n_; }

 private:
  int64_t n_;
  uint64_t seed_;
  mutable std::mutex mu_;
  mutable std::map<int64_t, std::vector<int64_t>> cache_;  // epoch -> permutation (the last two kept)
};

// The source of global item k of a stream that mixes sources by weight (data.mixture): source j with probability
// w_j / sum(w), drawn from (seed, k) alone, so that any split over ranks, loader threads and resumes draws alike.
class SourceMixture {
 public:
  SourceMixture(const std::vector<double>& weights, uint64_t seed);
  size_t pick(int64_t k) const;
  size_t size() const { return cumulative_.size(); }

 private:
  std::vector<double> cumulative_;  // running sums of the normalised weights (the last is 1)
  uint64_t seed_;
};

// A micro-batch of image-caption samples: caption rows first, then generation rows.
struct MultimodalBatch {
  torch::Tensor tokens;      // [Bc + Bg, T] int64
  torch::Tensor images;      // [Bc, C, Sv, Sv] float in [-1, 1] for the understanding rows (undefined if Bc = 0)
  torch::Tensor gen_images;  // [Bg, C, Sq, Sq] float in [-1, 1], to be encoded by the VQ-VAE (undefined if Bg = 0)
  torch::Tensor noise;       // [Bg * G, P] x0 ~ N(0, I)
  torch::Tensor times;       // [Bg * G] flow time of each latent token (one draw per image)
  torch::Tensor labels;      // [Bc + Bg] int64 class labels (-1 unknown); undefined for conversation rows
  torch::Tensor targets;     // [B, T] bool: the loss targets (conversation rows); undefined = every real token
  torch::Tensor segments;    // [B, T] int64 sample of each position in a packed row (attention and positions stay
                             // within a sample); undefined = one sample per row
  int64_t bad_images = 0;    // streamed images that did not decode and were replaced by the next sample's
  std::vector<int64_t> source_counts;  // samples drawn from each image set of the sampler (mixture sources)
};

class MultimodalSampler {
 public:
  // Tokenizes every distinct caption once. T = train.image_seq_len, or the longest row when 0. In a data-parallel
  // run of `world` ranks, this rank (`rank`) serves items rank, rank + world, ... of each global micro-batch (the
  // caption and generation batch sizes times world).
  MultimodalSampler(const ImageCaptionSet& data, const Tokenizer& tok, const ModelConfig& model,
                    const TrainOptions& train, uint64_t seed, int64_t rank = 0, int64_t world = 1);
  // A mixture: each caption and generation sample comes from set j with probability weights[j] / sum (SourceMixture),
  // and within the set from its own epoch permutation at the item's global index. One set of weight 1 draws the
  // samples of the single-set constructor.
  MultimodalSampler(const std::vector<const ImageCaptionSet*>& sets, const std::vector<double>& weights,
                    const Tokenizer& tok, const ModelConfig& model, const TrainOptions& train, uint64_t seed,
                    int64_t rank = 0, int64_t world = 1);
  // This rank's part of global micro-batch `micro`; thread-safe and deterministic in (seed, micro). Every random
  // choice of an item (caption variant, prompt dropout, noise, flow time) comes from a generator seeded by the
  // item's global index, so any split of a global micro-batch over ranks draws the same values.
  MultimodalBatch get(int64_t micro) const;
  int64_t seq_len() const { return seq_len_; }

 private:
  // [n, S, S, 3] uint8 images and [n] labels of samples (set, index in the set), in that order
  std::pair<torch::Tensor, torch::Tensor> gather(const std::vector<std::pair<size_t, int64_t>>& items,
                                                 int64_t* bad) const;

  std::vector<const ImageCaptionSet*> sets_;
  std::vector<int64_t> offsets_;  // index of each set's first sample in caption_ids_
  ModelConfig model_;
  int64_t caption_batch_, gen_batch_, seq_len_ = 0;
  int64_t rank_, world_;
  double cfg_dropout_;
  bool logit_normal_;
  double time_mean_, time_std_;
  uint64_t seed_;
  std::vector<std::vector<int64_t>> caption_pool_;  // the token ids of every distinct caption, once
  std::vector<std::vector<int32_t>> caption_ids_;   // [image over all sets][variant] -> index into caption_pool_
  SourceMixture caption_mix_, gen_mix_;
  std::vector<std::unique_ptr<EpochSampler>> caption_order_, gen_order_;  // per set
};

}  // namespace omnilite
