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

SourceMixture::SourceMixture(const std::vector<double>& weights, uint64_t seed) : seed_(seed) {
  double total = 0;
  for (double w : weights) total += w;
  if (weights.empty() || !(total > 0)) throw std::runtime_error("SourceMixture: needs positive weights");
  double run = 0;
  for (double w : weights) cumulative_.push_back((run += w) / total);
  cumulative_.back() = 1.0;
}

size_t SourceMixture::pick(int64_t k) const {
  if (cumulative_.size() == 1) return 0;
  const double u = static_cast<double>(splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(k))) >> 11) * 0x1.0p-53;
  size_t j = 0;
  while (j + 1 < cumulative_.size() && u >= cumulative_[j]) ++j;
  return j;
}

MultimodalSampler::MultimodalSampler(const ImageCaptionSet& data, const Tokenizer& tok, const ModelConfig& model,
                                     const TrainOptions& train, uint64_t seed, int64_t rank, int64_t world)
    : MultimodalSampler(std::vector<const ImageCaptionSet*>{&data}, {1.0}, tok, model, train, seed, rank, world) {}

MultimodalSampler::MultimodalSampler(const std::vector<const ImageCaptionSet*>& sets,
                                     const std::vector<double>& weights, const Tokenizer& tok,
                                     const ModelConfig& model, const TrainOptions& train, uint64_t seed, int64_t rank,
                                     int64_t world)
    : sets_(sets),
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
      caption_mix_(weights, splitmix64(seed ^ 0x313ULL)),
      gen_mix_(weights, splitmix64(seed ^ 0x717ULL)) {
  if (sets.size() != weights.size()) throw std::runtime_error("MultimodalSampler: one weight per image set");
  std::unordered_map<std::string, int32_t> cache;  // caption -> its index in caption_pool_
  int64_t longest = 0;
  for (size_t j = 0; j < sets.size(); ++j) {
    const ImageCaptionSet& data = *sets[j];
    if (data.size() == 0) throw std::runtime_error("image-caption data: no images; hint: run scripts/prepare_data.sh");
    offsets_.push_back(static_cast<int64_t>(caption_ids_.size()));
    // set 0 keeps the single-set seeds, so that a one-source mixture draws what data.image_train draws
    caption_order_.push_back(std::make_unique<EpochSampler>(data.size(), splitmix64(seed ^ 0xC0FFEEULL) + j));
    gen_order_.push_back(std::make_unique<EpochSampler>(data.size(), splitmix64(seed ^ 0xBEEFULL) + j));
    for (const auto& caps : data.captions) {
      caption_ids_.emplace_back();
      for (const auto& c : caps) {
        auto it = cache.find(c);
        if (it == cache.end()) {
          it = cache.emplace(c, static_cast<int32_t>(caption_pool_.size())).first;
          caption_pool_.push_back(tok.encode(c));
          longest = std::max<int64_t>(longest, static_cast<int64_t>(caption_pool_.back().size()));
        }
        caption_ids_.back().push_back(it->second);
      }
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

std::pair<torch::Tensor, torch::Tensor> MultimodalSampler::gather(
    const std::vector<std::pair<size_t, int64_t>>& items, int64_t* bad) const {
  if (sets_.size() == 1) {  // one set: one gather
    std::vector<int64_t> idx;
    for (const auto& it : items) idx.push_back(it.second);
    const auto t = torch::tensor(idx, torch::kInt64);
    return {sets_[0]->gather(t, bad), sets_[0]->labels.index_select(0, t)};
  }
  // one gather per set, copied into the asked order
  torch::Tensor images, labels = torch::empty({static_cast<int64_t>(items.size())}, torch::kInt64);
  for (size_t j = 0; j < sets_.size(); ++j) {
    std::vector<int64_t> idx, pos;
    for (size_t p = 0; p < items.size(); ++p)
      if (items[p].first == j) idx.push_back(items[p].second), pos.push_back(static_cast<int64_t>(p));
    if (idx.empty()) continue;
    const auto t = torch::tensor(idx, torch::kInt64), at = torch::tensor(pos, torch::kInt64);
    const auto im = sets_[j]->gather(t, bad);  // [n_j, S, S, 3]
    if (!images.defined())
      images = torch::empty({static_cast<int64_t>(items.size()), im.size(1), im.size(2), 3}, im.options());
    images.index_copy_(0, at, im);
    labels.index_copy_(0, at, sets_[j]->labels.index_select(0, t));
  }
  return {images, labels};
}

MultimodalBatch MultimodalSampler::get(int64_t micro) const {
  // The generator of global item `index` (micro-batch times global batch plus position) of stream 1 (captions) or
  // 2 (generation): independent of how micro-batches and ranks split the stream.
  auto item_rng = [&](uint64_t stream, int64_t index) {
    return std::mt19937_64(splitmix64(seed_ ^ splitmix64(stream ^ splitmix64(static_cast<uint64_t>(index)))));
  };
  MultimodalBatch b;
  b.source_counts.assign(sets_.size(), 0);
  std::vector<std::vector<int64_t>> rows;
  std::vector<std::pair<size_t, int64_t>> cap_items, gen_items;  // (set, index in the set)
  const auto& tk = model_.tokens;
  auto pick = [&](const std::pair<size_t, int64_t>& item, std::mt19937_64& rng) -> const std::vector<int64_t>& {
    const auto& v = caption_ids_[static_cast<size_t>(offsets_[item.first] + item.second)];
    return caption_pool_[static_cast<size_t>(v[static_cast<size_t>(rng() % v.size())])];
  };
  for (int64_t i = 0; i < caption_batch_; ++i) {
    const int64_t k = micro * caption_batch_ * world_ + rank_ + world_ * i;  // global item index
    const size_t j = caption_mix_.pick(k);
    cap_items.emplace_back(j, caption_order_[j]->at(k));
    ++b.source_counts[j];
    auto rng = item_rng(1, k);
    rows.push_back(caption_row(pick(cap_items.back(), rng), model_.resampler.num_latents, tk));
  }
  const int64_t G = generated_tokens_per_image(model_), P = model_.flow_token_dim();
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<torch::Tensor> noise, times;
  for (int64_t i = 0; i < gen_batch_; ++i) {
    const int64_t k = micro * gen_batch_ * world_ + rank_ + world_ * i;
    const size_t j = gen_mix_.pick(k);
    gen_items.emplace_back(j, gen_order_[j]->at(k));
    ++b.source_counts[j];
    auto rng = item_rng(2, k);
    const auto& prompt = pick(gen_items.back(), rng);
    rows.push_back(generation_row(u(rng) < cfg_dropout_ ? std::vector<int64_t>{} : prompt, G, tk));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rng());
    noise.push_back(torch::randn({G, P}, gen));
    auto t = logit_normal_ ? torch::sigmoid(torch::randn({1}, gen) * time_std_ + time_mean_) : torch::rand({1}, gen);
    times.push_back(t.expand({G}));
  }
  b.tokens = pad_rows(rows, seq_len_, tk.pad_id);
  std::vector<torch::Tensor> labels;
  if (!cap_items.empty()) {
    auto [images, lab] = gather(cap_items, &b.bad_images);
    b.images = to_model_images(images, model_.vision.image_size, model_.vision.in_channels);
    labels.push_back(lab);
  }
  if (!gen_items.empty()) {
    auto [images, lab] = gather(gen_items, &b.bad_images);
    b.gen_images = to_model_images(images, model_.vqvae.image_size, model_.vqvae.in_channels);
    b.noise = torch::cat(noise, 0);
    b.times = torch::cat(times, 0);
    labels.push_back(lab);
  }
  b.labels = labels.empty() ? torch::empty({0}, torch::kInt64) : torch::cat(labels);
  return b;
}

}  // namespace omnilite
