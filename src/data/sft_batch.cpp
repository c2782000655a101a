#include "omnilite/data/sft_batch.h"

#include <algorithm>
#include <map>
#include <random>
#include <stdexcept>

#include "omnilite/data/image_dataset.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/log.h"

namespace omnilite {

SftSampler::SftSampler(const ChatSet& records, const std::string& what, const Tokenizer& tok,
                       const ModelConfig& model, const TrainOptions& train, uint64_t seed, int64_t rank, int64_t world)
    : SftSampler(std::vector<const ChatSet*>{&records}, {1.0}, {what}, tok, model, train, seed, rank, world) {}

SftSampler::SftSampler(const std::vector<const ChatSet*>& sets, const std::vector<double>& weights,
                       const std::vector<std::string>& whats, const Tokenizer& tok, const ModelConfig& model,
                       const TrainOptions& train, uint64_t seed, int64_t rank, int64_t world)
    : model_(model),
      batch_(train.sft_batch_size),
      rank_(rank),
      world_(world),
      packing_(train.sft_packing),
      logit_normal_(train.flow_time == "logit_normal"),
      time_mean_(train.flow_time_mean),
      time_std_(train.flow_time_std),
      seed_(seed),
      mix_(weights, splitmix64(seed ^ 0x5F7AULL)) {
  if (sets.size() != weights.size() || sets.size() != whats.size())
    throw std::runtime_error("SftSampler: one weight and one name per conversation set");
  const auto layout = chat_layout(model);
  const int64_t S = std::max(model.vision.image_size, model.vqvae.image_size);
  std::map<std::string, int64_t> image_row;  // path -> row of images_ (-1: does not decode)
  std::vector<torch::Tensor> images;
  auto image_of = [&](const std::string& path) {
    auto it = image_row.find(path);
    if (it != image_row.end()) {
      if (it->second < 0) throw std::runtime_error("image \"" + path + "\" does not decode");
      return it->second;
    }
    try {
      images.push_back(load_image(path, S));
    } catch (...) {
      image_row[path] = -1;
      throw;
    }
    return image_row[path] = static_cast<int64_t>(images.size()) - 1;
  };
  const int64_t cap = train.sft_seq_len > 0 ? train.sft_seq_len : model.text.max_position_embeddings;
  std::vector<int64_t> first_sample;  // each set's first sample
  for (size_t j = 0; j < sets.size(); ++j) {
    first_sample.push_back(samples());
    const int64_t skipped_before = skipped_;
    for (const auto& r : sets[j]->records) {
      try {
        auto t = encode_chat(r.messages, tok, layout, train.train_on_input);
        if (static_cast<int64_t>(t.ids.size()) > cap)
          throw std::runtime_error(std::to_string(t.ids.size()) + " tokens, more than a row of " +
                                   std::to_string(cap) + " (train.sft_seq_len); hint: raise train.sft_seq_len");
        std::vector<int64_t> shown, drawn;
        for (const auto& p : t.shown) shown.push_back(image_of(p));
        for (const auto& p : t.drawn) drawn.push_back(image_of(p));
        draws_ = draws_ || !drawn.empty();
        samples_.push_back(std::move(t));
        shown_.push_back(std::move(shown));
        drawn_.push_back(std::move(drawn));
      } catch (const std::exception& e) {
        log::warn(whats[j] + ": " + r.where + ": skipped, " + e.what());
        ++skipped_;
      }
    }
    if (samples() == first_sample.back())
      throw std::runtime_error(whats[j] + ": no usable conversation record (" +
                               std::to_string(sets[j]->records.size()) + " read, " +
                               std::to_string(sets[j]->skipped + skipped_ - skipped_before) + " skipped); hint: "
                               "docs/training.md lists the record formats");
  }
  first_sample.push_back(samples());
  if (!images.empty()) images_ = torch::stack(images);
  int64_t longest = 0;
  for (const auto& t : samples_) longest = std::max<int64_t>(longest, static_cast<int64_t>(t.ids.size()));
  seq_len_ = train.sft_seq_len > 0 ? train.sft_seq_len : longest;
  // Rows per set (a packed row never mixes sets), each set served in its own epoch permutations; set 0 keeps the
  // seeds of a single set.
  for (size_t j = 0; j < sets.size(); ++j) {
    row_offsets_.push_back(rows());
    const int64_t s0 = first_sample[j], n = first_sample[j + 1] - s0;
    if (!packing_) {
      for (int64_t i = 0; i < n; ++i) rows_.push_back({s0 + i});
    } else {
      // First fit over a fixed permutation: each sample goes into the first row with room for it.
      std::vector<int64_t> room;
      const size_t r0 = rows_.size();
      for (int64_t i : epoch_permutation(n, splitmix64(seed ^ 0x5F7ULL) + j, 0)) {
        const int64_t len = static_cast<int64_t>(samples_[static_cast<size_t>(s0 + i)].ids.size());
        size_t r = 0;
        while (r < room.size() && room[r] < len) ++r;
        if (r == room.size()) rows_.emplace_back(), room.push_back(seq_len_);
        rows_[r0 + r].push_back(s0 + i);
        room[r] -= len;
      }
    }
    orders_.push_back(std::make_unique<EpochSampler>(rows() - row_offsets_.back(), splitmix64(seed ^ 0x5F75ULL) + j));
  }
  row_offsets_.push_back(rows());
  for (size_t j = 0; j < sets.size(); ++j)
    log::info(log::format("data: %s: %lld conversations -> %lld rows of %lld tokens%s", whats[j].c_str(),
                          static_cast<long long>(first_sample[j + 1] - first_sample[j]),
                          static_cast<long long>(row_offsets_[j + 1] - row_offsets_[j]),
                          static_cast<long long>(seq_len_), packing_ ? " (packed, one attention block per sample)" : ""));
}

MultimodalBatch SftSampler::get(int64_t micro, bool ordered) const {
  const auto& tk = model_.tokens;
  const int64_t T = seq_len_, G = generated_tokens_per_image(model_);
  auto tokens = torch::full({batch_, T}, tk.pad_id, torch::kInt64);
  auto targets = torch::zeros({batch_, T}, torch::kBool);
  auto segments = torch::zeros({batch_, T}, torch::kInt64);
  auto ta = tokens.accessor<int64_t, 2>();
  auto ga = targets.accessor<bool, 2>();
  auto sa = segments.accessor<int64_t, 2>();
  std::vector<int64_t> shown, drawn, counts(orders_.size(), 0);
  std::vector<torch::Tensor> noise, times;
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t k = micro * batch_ * world_ + rank_ + world_ * b;  // global item index
    const size_t j = mix_.pick(k);  // the conversation set (mixture source) of item k
    const int64_t in_set = row_offsets_[j + 1] - row_offsets_[j];
    const int64_t row = row_offsets_[j] + (ordered ? k % in_set : orders_[j]->at(k));
    ++counts[j];
    int64_t t = 0, seg = 0;
    uint64_t drawn_in_row = 0;
    for (int64_t s : rows_[static_cast<size_t>(row)]) {
      const auto& smp = samples_[static_cast<size_t>(s)];
      ++seg;
      for (size_t j = 0; j < smp.ids.size(); ++j, ++t) ta[b][t] = smp.ids[j], ga[b][t] = smp.target[j] != 0, sa[b][t] = seg;
      for (int64_t i : shown_[static_cast<size_t>(s)]) shown.push_back(i);
      for (size_t d = 0; d < drawn_[static_cast<size_t>(s)].size(); ++d) {
        drawn.push_back(drawn_[static_cast<size_t>(s)][d]);
        // noise and flow time of the row's n-th drawn image, drawn from (seed, item k, n) alone
        std::mt19937_64 rng(splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(k) ^ splitmix64(++drawn_in_row))));
        auto gen = at::make_generator<at::CPUGeneratorImpl>(rng());
        noise.push_back(torch::randn({G, model_.flow_token_dim()}, gen));
        auto time = logit_normal_ ? torch::sigmoid(torch::randn({1}, gen) * time_std_ + time_mean_)
                                  : torch::rand({1}, gen);
        times.push_back(time.expand({G}));
      }
    }
    for (; t < T; ++t) sa[b][t] = seg;  // padding: the row's last sample (never a target, seen by no real token)
  }
  MultimodalBatch out;
  out.source_counts = counts;
  out.tokens = tokens;
  out.targets = targets;
  if (packing_) out.segments = segments;
  if (!shown.empty())
    out.images = to_model_images(images_, model_.vision.image_size, model_.vision.in_channels,
                                 torch::tensor(shown, torch::kInt64));
  if (!drawn.empty()) {
    out.gen_images = to_model_images(images_, model_.vqvae.image_size, model_.vqvae.in_channels,
                                     torch::tensor(drawn, torch::kInt64));
    out.noise = torch::cat(noise, 0);
    out.times = torch::cat(times, 0);
  }
  return out;
}

}  // namespace omnilite
