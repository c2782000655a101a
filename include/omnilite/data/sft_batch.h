// Micro-batches of conversations for supervised fine-tuning (data.sft_train; formats and template in chat.h).
//
// Every record is tokenized once with its loss mask (train.train_on_input) and its images decoded once, at start.
// Rows of train.sft_seq_len tokens hold one sample each, padded, or, with train.sft_packing, as many whole samples
// as fit (first fit over a permutation fixed by the seed). A packed row carries segment ids: each sample attends
// only to itself and its positions start at 0 (block-diagonal causal attention), so packed training computes the
// losses and gradients of the same samples unpacked. A sample longer than a row, or with an image that does not
// decode, is skipped with a warning naming file:line, and counted. Rows are served in epoch permutations, each rank
// taking items rank, rank + world, ... of a global micro-batch, deterministic in (seed, micro-batch) like
// MultimodalSampler.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/data/chat.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite {

class SftSampler {
 public:
  // what: the config key the records came from (for messages). Throws before step 1 when no sample is usable.
  SftSampler(const ChatSet& records, const std::string& what, const Tokenizer& tok, const ModelConfig& model,
             const TrainOptions& train, uint64_t seed, int64_t rank = 0, int64_t world = 1);
  // A mixture (data.mixture's sft sources): each row comes from set j with probability weights[j] / sum
  // (SourceMixture), within the set from its own epoch permutation of its rows (packing never mixes sets); rows
  // share one length (the longest sample of all sets when train.sft_seq_len = 0). whats[j] names set j in messages.
  // One set of weight 1 serves the rows of the single-set constructor.
  SftSampler(const std::vector<const ChatSet*>& sets, const std::vector<double>& weights,
             const std::vector<std::string>& whats, const Tokenizer& tok, const ModelConfig& model,
             const TrainOptions& train, uint64_t seed, int64_t rank = 0, int64_t world = 1);
  // This rank's part of global micro-batch `micro` (rows in epoch permutations, or in order when `ordered`):
  // tokens, targets, segments (packing), shown images, drawn images with their noise and flow times.
  MultimodalBatch get(int64_t micro, bool ordered = false) const;
  int64_t seq_len() const { return seq_len_; }
  int64_t rows() const { return static_cast<int64_t>(rows_.size()); }
  int64_t samples() const { return static_cast<int64_t>(samples_.size()); }
  int64_t skipped() const { return skipped_; }
  // Whether some conversation draws an image (its flow targets need a VQ-VAE).
  bool draws() const { return draws_; }

 private:
  ModelConfig model_;
  int64_t batch_, seq_len_ = 0, rank_, world_, skipped_ = 0;
  bool packing_, logit_normal_, draws_ = false;
  double time_mean_, time_std_;
  uint64_t seed_;
  std::vector<ChatTokens> samples_;           // tokenized records
  std::vector<std::vector<int64_t>> shown_;   // per sample: rows of images_ it shows
  std::vector<std::vector<int64_t>> drawn_;   // per sample: rows of images_ it draws
  std::vector<std::vector<int64_t>> rows_;    // samples of each row
  torch::Tensor images_;                      // [N, S, S, 3] uint8, every distinct image once
  SourceMixture mix_;                         // the set of each item
  std::vector<int64_t> row_offsets_;          // each set's first row in rows_, and rows() at the end
  std::vector<std::unique_ptr<EpochSampler>> orders_;  // each set's row order
};

}  // namespace omnilite
