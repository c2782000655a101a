#include "omnilite/data/mm_batch.h"

#include <random>
#include <stdexcept>
#include <unordered_map>

#include "omnilite/data/text_dataset.h"

namespace omnilite {

std::vector<int64_t> caption_row(const std::vector<int64_t>& caption, int64_t num_latents, const TokenOptions& t) {
  std::vector<int64_t> row = {t.bos_id, t.image_begin_id};
  row.insert(row.end(), static_cast<size_t>(num_latents), t.image_id);
  row.push_back(t.image_end_id);
  row.insert(row.end(), caption.begin(), caption.end());
  row.push_back(t.eos_id);
  return row;
}

std::vector<int64_t> generation_row(const std::vector<int64_t>& prompt, int64_t gen_tokens, const TokenOptions& t) {
  std::vector<int64_t> row = {t.bos_id};
  row.insert(row.end(), prompt.begin(), prompt.end());
  row.push_back(t.image_begin_id);
  row.insert(row.end(), static_cast<size_t>(gen_tokens), t.gen_image_id);
  row.push_back(t.image_end_id);
  row.push_back(t.eos_id);
  return row;
}

torch::Tensor pad_rows(const std::vector<std::vector<int64_t>>& rows, int64_t T, int64_t pad_id) {
  auto out = torch::full({static_cast<int64_t>(rows.size()), T}, pad_id, torch::kInt64);
  auto a = out.accessor<int64_t, 2>();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (static_cast<int64_t>(rows[i].size()) > T)
      throw std::runtime_error("multimodal row " + std::to_string(i) + " has " + std::to_string(rows[i].size()) +
                               " tokens, more than train.image_seq_len = " + std::to_string(T) +
                               "; hint: raise train.image_seq_len or set it to 0 (automatic)");
    for (size_t j = 0; j < rows[i].size(); ++j) a[static_cast<int64_t>(i)][static_cast<int64_t>(j)] = rows[i][j];
  }
  return out;
}

int64_t generated_tokens_per_image(const ModelConfig& m) {
  const int64_t side = m.vqvae.image_size / m.vq_downsample() / m.flow.patch_size;
  return side * side;
}

int64_t EpochSampler::at(int64_t k) const {
  const int64_t epoch = k / n_;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = cache_.find(epoch);
  if (it == cache_.end()) {
    if (cache_.size() >= 2) cache_.erase(cache_.begin());  // the oldest epoch; epochs are asked for in order
    it = cache_.emplace(epoch, epoch_permutation(n_, seed_, epoch)).first;
  }
  return it->second[static_cast<size_t>(k % n_)];
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

MultimodalSampler::MultimodalSampler(const ImageCaptionSet& data, const Tokenizer& tok, const ModelConfig& model,
                                     const TrainOptions& train, uint64_t seed, int64_t rank, int64_t world)
    : data_(data),
      model_(model),
      caption_batch_(train.caption_batch_size),
      gen_batch_(train.gen_batch_size),
      rank_(rank),
      world_(world),
      cfg_dropout_(train.cfg_dropout),
      logit_normal_(train.flow_time == "logit_normal"),
      time_mean_(train.flow_time_mean),
      time_std_(train.flow_time_std),
      seed_(seed),
      caption_order_(data.size(), splitmix64(seed ^ 0xC0FFEEULL)),
      gen_order_(data.size(), splitmix64(seed ^ 0xBEEFULL)) {
  if (data.size() == 0) throw std::runtime_error("image-caption data: no images; hint: run scripts/prepare_data.sh");
  std::unordered_map<std::string, std::vector<int64_t>> cache;
  int64_t longest = 0;
  for (const auto& caps : data.captions) {
    caption_ids_.emplace_back();
    for (const auto& c : caps) {
      auto it = cache.find(c);
      if (it == cache.end()) it = cache.emplace(c, tok.encode(c)).first;
      caption_ids_.back().push_back(it->second);
      longest = std::max<int64_t>(longest, static_cast<int64_t>(it->second.size()));
    }
  }
  const int64_t need = std::max(4 + model.resampler.num_latents + longest,
                                5 + longest + generated_tokens_per_image(model));
  seq_len_ = train.image_seq_len > 0 ? train.image_seq_len : need;
  if (seq_len_ > model.text.max_position_embeddings)
    throw std::runtime_error("image-caption rows need " + std::to_string(seq_len_) +
                             " tokens, more than model.text.max_position_embeddings = " +
                             std::to_string(model.text.max_position_embeddings));
}

MultimodalBatch MultimodalSampler::get(int64_t micro) const {
  // The generator of global item `index` (micro-batch times global batch plus position) of stream 1 (captions) or
  // 2 (generation): independent of how micro-batches and ranks split the stream.
  auto item_rng = [&](uint64_t stream, int64_t index) {
    return std::mt19937_64(splitmix64(seed_ ^ splitmix64(stream ^ splitmix64(static_cast<uint64_t>(index)))));
  };
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> cap_idx, gen_idx;
  const auto& tk = model_.tokens;
  auto pick = [&](int64_t img, std::mt19937_64& rng) -> const std::vector<int64_t>& {
    const auto& v = caption_ids_[static_cast<size_t>(img)];
    return v[static_cast<size_t>(rng() % v.size())];
  };
  for (int64_t i = 0; i < caption_batch_; ++i) {
    const int64_t k = micro * caption_batch_ * world_ + rank_ + world_ * i;  // global item index
    const int64_t img = caption_order_.at(k);
    auto rng = item_rng(1, k);
    cap_idx.push_back(img);
    rows.push_back(caption_row(pick(img, rng), model_.resampler.num_latents, tk));
  }
  const int64_t G = generated_tokens_per_image(model_), P = model_.flow_token_dim();
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<torch::Tensor> noise, times;
  for (int64_t i = 0; i < gen_batch_; ++i) {
    const int64_t k = micro * gen_batch_ * world_ + rank_ + world_ * i;
    const int64_t img = gen_order_.at(k);
    auto rng = item_rng(2, k);
    gen_idx.push_back(img);
    const auto& prompt = pick(img, rng);
    rows.push_back(generation_row(u(rng) < cfg_dropout_ ? std::vector<int64_t>{} : prompt, G, tk));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rng());
    noise.push_back(torch::randn({G, P}, gen));
    auto t = logit_normal_ ? torch::sigmoid(torch::randn({1}, gen) * time_std_ + time_mean_) : torch::rand({1}, gen);
    times.push_back(t.expand({G}));
  }
  MultimodalBatch b;
  b.tokens = pad_rows(rows, seq_len_, tk.pad_id);
  const auto cap_t = torch::tensor(cap_idx, torch::kInt64), gen_t = torch::tensor(gen_idx, torch::kInt64);
  b.labels = data_.labels.index_select(0, torch::cat({cap_t, gen_t}));  // one gather, no per-sample item()
  if (!cap_idx.empty())
    b.images = to_model_images(data_.gather(cap_t, &b.bad_images), model_.vision.image_size,
                               model_.vision.in_channels);
  if (!gen_idx.empty()) {
    b.gen_images = to_model_images(data_.gather(gen_t, &b.bad_images), model_.vqvae.image_size,
                                   model_.vqvae.in_channels);
    b.noise = torch::cat(noise, 0);
    b.times = torch::cat(times, 0);
  }
  return b;
}

}  // namespace omnilite
