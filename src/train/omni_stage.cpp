// Stage "omni": the OMNI-LITE model on packed text and image-caption data (see stage.h for the objective).
#include <algorithm>
#include <chrono>
#include <malloc.h>
#include <memory>
#include <stdexcept>

#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/prefetcher.h"
#include "omnilite/data/sft_batch.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/adapter.h"
#include "omnilite/log.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/moe.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/rfm_head.h"
#include "omnilite/runtime.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/losses.h"
#include "omnilite/train/stage.h"
#include "omnilite/train/zero.h"
#include "stages.h"

namespace omnilite {
namespace {

struct OmniMicro {
  torch::Tensor text;     // [B, T] packed text rows (undefined when train.batch_size = 0)
  int64_t bad_rows = 0;   // token-shard rows skipped for ids outside the vocabulary
  std::vector<int64_t> text_counts;  // rows drawn from each text source (data.mixture)
  MultimodalBatch mm;     // image-caption rows (tokens undefined when none)
  MultimodalBatch sft;    // conversation rows (tokens undefined when none)
};

// Text targets: every real token (never padding or image placeholders).
torch::Tensor target_mask(const torch::Tensor& tokens, const TokenOptions& tk) {
  return tokens.ne(tk.pad_id).logical_and(tokens.ne(tk.image_id)).logical_and(tokens.ne(tk.gen_image_id));
}

class OmniStage : public TrainStage {
 public:
  OmniStage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist)
      : cfg_(cfg), dev_(dev), dist_(std::move(dist)), tok_(cfg.data.tokenizer) {
    tok_.check_compatible(cfg.model);
    if (cfg.train.batch_size > 0) setup_text();
    if (cfg.train.caption_batch_size + cfg.train.gen_batch_size > 0) setup_images();
    if (cfg.train.sft_batch_size > 0) setup_sft();
    setup_model();
    if (!has_valid_data())
      log::info("validation: no held-out data (data.text_valid and data.image_valid give none for this run's "
                "streams); validation is skipped and no valid_* metrics are written");
  }

  torch::nn::Module& module() override { return *model_; }
  std::map<std::string, std::string> data_fingerprints() const override {
    std::map<std::string, std::string> out;
    if (text_)
      for (size_t j = 0; j < text_->parts.size(); ++j)
        if (text_->parts[j]->streamed()) out[text_->keys[j]] = text_->parts[j]->fingerprint();
    for (size_t j = 0; j < images_.size(); ++j)
      if (images_[j]->shards) out[source_key(image_mix_[j], "data.image_train")] = images_[j]->shards->fingerprint();
    return out;
  }
  void save_weights(const std::string& dir, int64_t step) override {
    if (cfg_.lora.enabled) io::save_adapter(*model_, cfg_.lora, dir);
    else TrainStage::save_weights(dir, step);
  }
  void load_weights(const std::string& dir) override {
    if (cfg_.lora.enabled) io::load_adapter(*model_, dir);
    else TrainStage::load_weights(dir);
  }
  std::vector<std::string> block_lists() const override { return omni_block_lists(cfg_.train); }
  void set_block_gate(const std::string& prefix, std::shared_ptr<LayerGate> gate) override {
    if (prefix == "text.layers.") model_->text->gate = std::move(gate);
    else if (prefix == "vision.blocks.") model_->vision->gate = std::move(gate);
    else if (prefix == "resampler.attn_layers.") model_->resampler->attn_gate = std::move(gate);
    else if (prefix == "resampler.ff_layers.") model_->resampler->ff_gate = std::move(gate);
  }
  std::vector<std::string> terms() const override {
    std::vector<std::string> t{"loss_clm", "loss_rf", "loss_aux", "loss_z", "loss_caption", "loss_sft"};
    if (text_ && text_->streamed()) t.insert(t.end(), {"data_bad_rows", "data_bad_shards"});
    if (images_streamed() || images_skipped() > 0) t.insert(t.end(), {"data_bad_images", "data_skipped_images"});
    for (const auto& name : mix_names()) t.push_back("mix_" + name);
    return t;
  }
  std::string unit() const override { return "tokens"; }

  // Reads the step's micro-batches ahead and counts their targets, generated latents and real router tokens over
  // every rank: each micro-batch's loss is its share of the step's token-weighted mean (grad_accum = k at batch b
  // takes the step of one micro-batch of k * b).
  void begin_step(int64_t first, int64_t count) override {
    pending_.clear();
    pending_wait_.clear();
    pending_first_ = first;
    for (int64_t m = first; m < first + count; ++m) {
      const auto w0 = std::chrono::steady_clock::now();
      pending_.push_back(loader_->get(m));
      pending_wait_.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count());
    }
    step_counts_ = count_tokens(pending_);
  }

  void start(int64_t first) override {
    loader_ = std::make_unique<Prefetcher<OmniMicro>>([this](int64_t m) {
                                                        return make(m, text_.get(), mm_.get(), sft_.get());
                                                      },
                                                      cfg_.train.loader_threads, 2 * cfg_.train.loader_threads + 1,
                                                      first);
  }

  MicroResult micro_step(int64_t micro) override {
    const int64_t j = micro - pending_first_;
    TORCH_CHECK(j >= 0 && j < static_cast<int64_t>(pending_.size()), "omni stage: micro-batch ", micro,
                " is outside the step begin_step announced (", pending_first_, " + ", pending_.size(),
                "); hint: call begin_step before the micro-batches of each step");
    const size_t i = static_cast<size_t>(j);
    const OmniMicro& batch = pending_[i];
    MicroResult r;
    r.wait_s = pending_wait_[i];
    auto l = losses(batch, step_counts_, i);
    r.loss = l.total;
    r.terms = {{"loss_clm", l.clm.item<double>()}, {"loss_rf", l.rf.item<double>()},
               {"loss_aux", l.aux.item<double>()}, {"loss_z", l.z.item<double>()},
               {"loss_caption", l.clm_mm.item<double>()}, {"loss_sft", l.clm_sft.item<double>()}};
    // a constant of the run is given by one share (rank 0, the step's first micro-batch) so that the sum is it
    const bool first_share = i == 0 && dist_->rank() == 0;
    if (text_ && text_->streamed()) {
      r.terms["data_bad_rows"] = static_cast<double>(batch.bad_rows);  // summed over micro-batches and ranks
      r.terms["data_bad_shards"] = first_share ? static_cast<double>(text_->bad_shards()) : 0.0;
    }
    if (images_streamed() || images_skipped() > 0) {
      r.terms["data_bad_images"] = static_cast<double>(batch.mm.bad_images);  // replaced when gathered
      // samples skipped while the sources were read (bad records, undecodable files, truncated tars)
      r.terms["data_skipped_images"] = first_share ? static_cast<double>(images_skipped()) : 0.0;
    }
    // realised mixture: each source's share of the step's rows of its kind (summed over micro-batches and ranks)
    const double steps_rows = static_cast<double>(cfg_.train.grad_accum * dist_->world());
    if (text_ && text_->parts.size() > 1)
      for (size_t j = 0; j < text_->parts.size(); ++j)
        r.terms["mix_" + text_->names[j]] =
            static_cast<double>(batch.text_counts[j]) / (steps_rows * static_cast<double>(cfg_.train.batch_size));
    if (images_.size() > 1)
      for (size_t j = 0; j < images_.size(); ++j)
        r.terms["mix_" + image_mix_[j].name] =
            static_cast<double>(batch.mm.source_counts[j]) /
            (steps_rows * static_cast<double>(cfg_.train.caption_batch_size + cfg_.train.gen_batch_size));
    if (sft_mix_.size() > 1)
      for (size_t j = 0; j < sft_mix_.size(); ++j)
        r.terms["mix_" + sft_mix_[j].name] = static_cast<double>(batch.sft.source_counts[j]) /
                                             (steps_rows * static_cast<double>(cfg_.train.sft_batch_size));
    r.units = static_cast<double>((batch.text.defined() ? batch.text.numel() : 0) +
                                  (batch.mm.tokens.defined() ? batch.mm.tokens.numel() : 0) +
                                  (batch.sft.tokens.defined() ? batch.sft.tokens.numel() : 0));
    return r;
  }

  std::map<std::string, double> validate() override {
    if (!has_valid_data()) return {};
    torch::NoGradGuard ng;
    model_->eval();
    std::map<std::string, double> out;
    double text_sum = 0, cap_sum = 0, rf_sum = 0, sft_sum = 0;
    const int64_t n = cfg_.train.valid_batches;
    for (int64_t m = 0; m < n; ++m) {
      std::vector<OmniMicro> b{make(m, text_valid_.get(), mm_valid_.get(), sft_valid_.get(), /*ordered=*/true)};
      auto l = losses(b[0], count_tokens(b), 0);
      text_sum += l.clm_text.item<double>();
      cap_sum += l.clm_mm.item<double>();
      rf_sum += l.rf.item<double>();
      sft_sum += l.clm_sft.item<double>();
    }
    model_->train();
    auto sums = torch::tensor({text_sum, cap_sum, rf_sum, sft_sum}, torch::kFloat64).to(dev_);  // shares of every rank
    dist_->all_reduce_sum(sums);
    sums = sums.cpu();
    text_sum = sums[0].item<double>(), cap_sum = sums[1].item<double>(), rf_sum = sums[2].item<double>();
    sft_sum = sums[3].item<double>();
    if (text_valid_) out["valid_loss_text"] = text_sum / static_cast<double>(n);
    if (sft_valid_) out["valid_loss_sft"] = sft_sum / static_cast<double>(n);
    if (mm_valid_ && cfg_.train.caption_batch_size + cfg_.train.gen_batch_size > 0)
      out["valid_loss_caption"] = cap_sum / static_cast<double>(n);
    if (mm_valid_ && cfg_.train.gen_batch_size > 0) out["valid_loss_rf"] = rf_sum / static_cast<double>(n);
    return out;
  }

 private:
  // data.text_train / text_valid (or data.mixture's text sources): packed rows, held-out ones when any.
  void setup_text() {
    text_ = std::make_unique<TextData>(mixture_of(cfg_.data, "text", cfg_.data.text_train), tok_, cfg_,
                                       cfg_.train.seed);
    if (cfg_.data.text_valid.empty()) return;
    text_valid_ = std::make_unique<TextData>(std::vector<MixtureSource>{{"", "text", cfg_.data.text_valid, 1.0}},
                                             tok_, cfg_, cfg_.train.seed, "data.text_valid", /*required=*/false);
    if (text_valid_->rows() > 0) return;
    log::warn("data.text_valid: no documents in the given files; text validation is skipped");
    text_valid_.reset();
  }

  // data.image_train / image_valid (or data.mixture's image sources): the caption and generation samplers.
  void setup_images() {
    const auto& tr = cfg_.train;
    auto io = image_load_options(cfg_.data, std::max(cfg_.model.vision.image_size, cfg_.model.vqvae.image_size));
    io.stream = true;  // the training images: decoded by the loader threads
    image_mix_ = mixture_of(cfg_.data, "images", cfg_.data.image_train);
    std::vector<const ImageCaptionSet*> sets;
    std::vector<double> weights;
    int64_t n = 0;
    for (const auto& m : image_mix_) {
      images_.push_back(std::make_unique<ImageCaptionSet>(read_image_captions(m.sources, io)));
      if (images_.back()->size() == 0)
        throw std::runtime_error(source_key(m, "data.image_train") +
                                 ": no usable images in the given sources; hint: run scripts/prepare_data.sh");
      sets.push_back(images_.back().get());
      weights.push_back(m.weight);
      n += images_.back()->size();
    }
    mm_ = std::make_unique<MultimodalSampler>(sets, weights, tok_, cfg_.model, tr, tr.seed, dist_->rank(),
                                              dist_->world());
    log::info(log::format("data: %lld images in %zu source(s), %lld caption + %lld generation samples per "
                          "micro-batch, rows of %lld tokens", static_cast<long long>(n), sets.size(),
                          static_cast<long long>(tr.caption_batch_size), static_cast<long long>(tr.gen_batch_size),
                          static_cast<long long>(mm_->seq_len())));
    if (cfg_.data.image_valid.empty()) return;
    io.stream = false;
    images_valid_ = read_image_captions(cfg_.data.image_valid, io);
    if (images_valid_.size() > 0)
      mm_valid_ = std::make_unique<MultimodalSampler>(images_valid_, tok_, cfg_.model, tr, tr.seed + 1, dist_->rank(),
                                                      dist_->world());
  }

  // data.sft_train / sft_valid (or data.mixture's conversation sources): the conversation samplers.
  void setup_sft() {
    const auto& tr = cfg_.train;
    sft_mix_ = mixture_of(cfg_.data, "sft", cfg_.data.sft_train);
    std::vector<ChatSet> sets;
    std::vector<const ChatSet*> ptrs;
    std::vector<double> weights;
    std::vector<std::string> whats;
    for (const auto& m : sft_mix_) {
      sets.push_back(read_chat_records(m.sources, cfg_.data.image_root));
      weights.push_back(m.weight);
      whats.push_back(source_key(m, "data.sft_train"));
    }
    for (const auto& set : sets) ptrs.push_back(&set);
    sft_ = std::make_unique<SftSampler>(ptrs, weights, whats, tok_, cfg_.model, tr, tr.seed, dist_->rank(),
                                        dist_->world());
    if (cfg_.data.sft_valid.empty()) return;
    auto held_out = read_chat_records(cfg_.data.sft_valid, cfg_.data.image_root);
    if (held_out.records.empty())
      log::warn("data.sft_valid: no conversation records in the given files; its validation is skipped");
    else
      sft_valid_ = std::make_unique<SftSampler>(held_out, "data.sft_valid", tok_, cfg_.model, tr, tr.seed + 1,
                                                dist_->rank(), dist_->world());
  }

  // The model: built by the config's builder, base weights (QLoRA or full fine-tune), VQ-VAE, runtime choices.
  void setup_model() {
    const auto& tr = cfg_.train;
    if (draws() && cfg_.data.vqvae.empty())
      throw std::runtime_error("data.sft_train: some conversations draw images, whose flow targets need a VQ-VAE; "
                               "hint: set data.vqvae to a VQ-VAE run folder (train.stage = \"vqvae\")");
    model_ = OmniLite(cfg_.model, *make_linear_builder(cfg_));
    if (cfg_.lora.enabled) {
      // QLoRA: base weights from a plain checkpoint (NF4 bases quantised tensor by tensor); only adapters train.
      if (tr.base_checkpoint.empty())
        throw std::runtime_error("lora.enabled needs base weights: set train.base_checkpoint or pass --base DIR; "
                                 "hint: `omnilite init --config FILE --out DIR` writes a full-size one");
      io::load_base_weights(*model_, tr.base_checkpoint);
      log::info("qlora: base weights from " + tr.base_checkpoint);
      if (!cfg_.lora.init_adapter.empty()) start_adapter(cfg_.lora);
      train_adapters_only(*model_, cfg_.lora.modules_to_save);
      if (dev_.is_cpu() && narrow_frozen_tables(*model_) > 0) {
        log::info("qlora: the frozen embedding / LM head of the bf16 base kept in bf16 (narrow_frozen_tables)");
        malloc_trim(0);  // the float32 tables' freed pages go back to the OS instead of staying resident as holes
      }
    } else if (!tr.base_checkpoint.empty()) {
      // A full fine-tune: every weight starts from the base and trains (strict: every mismatch is named).
      io::load_base_weights(*model_, tr.base_checkpoint);
      log::info("full fine-tune: every weight starts from " + tr.base_checkpoint);
    }
    if (tr.gen_batch_size > 0 || draws()) io::load_vqvae_weights(*model_->vqvae, cfg_.data.vqvae);
    freeze_parameters(*model_->vqvae, [](const std::string&) { return true; });
    set_moe_dispatch(*model_, parse_moe_dispatch(cfg_.runtime.moe_dispatch));
    model_->text->checkpoint_layers = tr.activation_checkpointing;
    model_->to(dev_);
    model_->train();
  }

  // The mixture sources of `kind` in data.mixture, or else the one unnamed source `entries`.
  static std::vector<MixtureSource> mixture_of(const DataOptions& data, const std::string& kind,
                                               const std::vector<std::string>& entries) {
    std::vector<MixtureSource> out;
    for (const auto& m : data.mixture)
      if (m.kind == kind) out.push_back(m);
    if (out.empty()) out.push_back({"", kind, entries, 1.0});
    return out;
  }
  // The config key a source is known by in messages and state.json: data.mixture.NAME, or `plain`.
  static std::string source_key(const MixtureSource& m, const std::string& plain) {
    return m.name.empty() ? plain : "data.mixture." + m.name;
  }

  // Packed text rows of one or more weighted sources (data.mixture's text sources, or data.text_train).
  struct TextData {
    // `required`: a source without documents is an error (training data) rather than rows() = 0 (held-out data)
    TextData(const std::vector<MixtureSource>& sources, const Tokenizer& tok, const Config& cfg, uint64_t seed,
             const std::string& plain_key = "data.text_train", bool required = true)
        : mix(weights_of(sources), splitmix64(seed ^ 0x7E77ULL)) {
      for (const auto& m : sources) {
        keys.push_back(source_key(m, plain_key));
        names.push_back(m.name);
        parts.push_back(std::make_unique<PackedText>(m.sources, keys.back(), tok, cfg.model, cfg.train.seq_len,
                                                     seed + parts.size()));
        if (parts.back()->rows() > 0) log::info("data: " + parts.back()->describe());
        else if (required)
          throw std::runtime_error(keys.back() + ": no documents in the given files; hint: run "
                                   "scripts/prepare_data.sh");
      }
    }
    static std::vector<double> weights_of(const std::vector<MixtureSource>& sources) {
      std::vector<double> w;
      for (const auto& m : sources) w.push_back(m.weight);
      return w;
    }
    int64_t rows() const {
      int64_t n = 0;
      for (const auto& p : parts) n += p->rows();
      return n;
    }
    bool streamed() const {
      return std::any_of(parts.begin(), parts.end(), [](const auto& p) { return p->streamed(); });
    }
    int64_t bad_shards() const {
      int64_t n = 0;
      for (const auto& p : parts) n += p->bad_shards();
      return n;
    }
    // rows [B, T] of global micro-batch m: this rank's items rank, rank + world, ... of its batch * world rows,
    // each from the source SourceMixture picks for it; `bad` counts shard rows skipped for ids outside the
    // vocabulary, `counts` (resized to the sources) the rows from each source
    torch::Tensor get(int64_t m, int64_t batch, bool ordered, int64_t rank, int64_t world, int64_t* bad,
                      std::vector<int64_t>* counts = nullptr) const {
      std::vector<std::vector<int64_t>> idx(parts.size()), pos(parts.size());
      for (int64_t i = 0; i < batch; ++i) {
        const int64_t k = m * batch * world + rank + world * i;
        const size_t j = mix.pick(k);
        idx[j].push_back(ordered ? k % parts[j]->rows() : parts[j]->shuffled(k));
        pos[j].push_back(i);
      }
      if (counts) counts->assign(parts.size(), 0);
      if (parts.size() == 1) {
        if (counts) (*counts)[0] = batch;
        return parts[0]->gather(idx[0], bad);
      }
      torch::Tensor out;
      for (size_t j = 0; j < parts.size(); ++j) {
        if (counts) (*counts)[j] = static_cast<int64_t>(idx[j].size());
        if (idx[j].empty()) continue;
        const auto rows = parts[j]->gather(idx[j], bad);  // [n_j, T]
        if (!out.defined()) out = torch::empty({batch, rows.size(1)}, rows.options());
        out.index_copy_(0, torch::tensor(pos[j], torch::kInt64), rows);
      }
      return out;
    }
    std::vector<std::unique_ptr<PackedText>> parts;
    std::vector<std::string> keys, names;  // each source's config key and mixture name ("" without a mixture)
    SourceMixture mix;
  };

  int64_t images_skipped() const {
    int64_t n = 0;
    for (const auto& set : images_) n += set->skipped;
    return n;
  }
  bool images_streamed() const {
    return std::any_of(images_.begin(), images_.end(), [](const auto& s) { return s->shards != nullptr; });
  }
  // The mixture names with mix_<name> metrics: text, image and conversation mixtures of more than one source.
  std::vector<std::string> mix_names() const {
    std::vector<std::string> out;
    if (text_ && text_->parts.size() > 1) out.insert(out.end(), text_->names.begin(), text_->names.end());
    for (const auto* mix : {&image_mix_, &sft_mix_})
      if (mix->size() > 1)
        for (const auto& m : *mix) out.push_back(m.name);
    return out;
  }

  // lora.init_adapter: the factors a run starts from, an OMNI-LITE adapter or a PEFT one (which must imply the
  // run's own rank, alpha and adapted projections; every LoRA parameter of the model is filled).
  void start_adapter(const LoRAOptions& lora) {
    const std::string& dir = lora.init_adapter;
    if (!io::is_peft_adapter(dir)) {
      io::load_adapter(*model_, io::latest_checkpoint(dir));
      log::info("qlora: adapters start from " + dir);
      return;
    }
    const auto peft = io::read_peft_adapter(dir, cfg_.model);
    if (peft.lora.rank != lora.rank || peft.lora.alpha != lora.alpha)
      throw std::runtime_error(log::format("lora.init_adapter \"%s\" is a PEFT adapter of r = %lld, lora_alpha = %g, "
                                           "the run has lora.rank = %lld, lora.alpha = %g; hint: set them alike",
                                           dir.c_str(), static_cast<long long>(peft.lora.rank), peft.lora.alpha,
                                           static_cast<long long>(lora.rank), lora.alpha));
    const auto fresh = io::load_adapter_tensors(*model_, peft.tensors, "lora.init_adapter \"" + dir + "\"");
    log::info(log::format("qlora: adapters start from the PEFT adapter %s (%zu LoRA tensors it does not hold, e.g. "
                          "of the vision encoder, start afresh)", dir.c_str(), fresh.size()));
  }

  OmniMicro make(int64_t m, const TextData* text, const MultimodalSampler* mm, const SftSampler* sft,
                 bool ordered = false) const {
    OmniMicro b;
    if (text && cfg_.train.batch_size > 0)
      b.text = text->get(m, cfg_.train.batch_size, ordered, dist_->rank(), dist_->world(), &b.bad_rows,
                         &b.text_counts);
    if (mm) b.mm = mm->get(m);
    if (sft) b.sft = sft->get(m, ordered);
    return b;
  }

  // Whether validation has a batch to read: text rows (train.batch_size > 0), caption/generation samples or
  // conversation rows.
  bool has_valid_data() const {
    return (text_valid_ && cfg_.train.batch_size > 0) ||
           (mm_valid_ && cfg_.train.caption_batch_size + cfg_.train.gen_batch_size > 0) || sft_valid_;
  }

  // Whether the conversations draw images (their flow targets need the VQ-VAE).
  bool draws() const { return sft_ && sft_->draws(); }

  // The counts a step's losses are normalised by, summed over its micro-batches and every rank.
  struct StepCounts {
    double text = 0, mm = 0, sft = 0;  // CLM targets of text rows / caption rows / conversation rows
    double gen = 0;                    // generated latent tokens (caption -> image rows and drawing turns)
    double router = 0;                 // real tokens that enter the router losses (no padding, no placeholders)
    std::vector<double> router_micro;  // the same per micro-batch (over every rank)
  };

  // Real tokens (never padding or image placeholders): the rows of the router statistics.
  torch::Tensor real_tokens(const torch::Tensor& tokens) const { return target_mask(tokens, cfg_.model.tokens); }
  // The CLM targets of rows: their own (conversations), else every real token.
  torch::Tensor targets_of(const torch::Tensor& tokens, const torch::Tensor& targets) const {
    return targets.defined() ? targets : real_tokens(tokens);
  }
  static double target_count(const torch::Tensor& mask) {
    return mask.narrow(1, 1, mask.size(1) - 1).sum().item<double>();  // position 0 is predicted from nothing
  }

  StepCounts count_tokens(const std::vector<OmniMicro>& micros) const {
    const int64_t k = static_cast<int64_t>(micros.size());
    std::vector<double> v(static_cast<size_t>(4 + k), 0.0);  // text, mm, sft, gen, router per micro-batch
    for (int64_t j = 0; j < k; ++j) {
      const auto& b = micros[static_cast<size_t>(j)];
      if (b.text.defined()) {
        v[0] += target_count(real_tokens(b.text));
        v[static_cast<size_t>(4 + j)] += real_tokens(b.text).sum().item<double>();
      }
      for (const MultimodalBatch* r : {&b.mm, &b.sft}) {
        if (!r->tokens.defined()) continue;
        v[r == &b.mm ? 1 : 2] += target_count(targets_of(r->tokens, r->targets));
        v[static_cast<size_t>(4 + j)] += real_tokens(r->tokens).sum().item<double>();
        if (r->gen_images.defined()) v[3] += r->tokens.eq(cfg_.model.tokens.gen_image_id).sum().item<double>();
      }
    }
    auto t = torch::tensor(v, torch::kFloat64).to(dev_);
    if (const auto reduce = reducer()) reduce(t);
    t = t.cpu();
    StepCounts c;
    c.text = t[0].item<double>(), c.mm = t[1].item<double>(), c.sft = t[2].item<double>(), c.gen = t[3].item<double>();
    for (int64_t j = 0; j < k; ++j) c.router_micro.push_back(t[4 + j].item<double>());
    for (double r : c.router_micro) c.router += r;
    return c;
  }

  // This rank's shares of the step's values (see stage.h), micro-batch j of the step counted by `n`.
  struct Losses {
    torch::Tensor total, clm, clm_text, clm_mm, clm_sft, rf, aux, z;
  };

  // Summed losses of one forward over rows, and what the router losses need of it.
  struct RowSums {
    torch::Tensor ce, se;                      // summed CLM cross-entropy, summed RF squared error
    std::vector<torch::Tensor> router_logits;  // num_layers x [B*T, E]
    torch::Tensor router_mask;                 // [B*T] real tokens
  };

  // Rows of text (`tokens` alone) or of images and conversations (MultimodalBatch).
  RowSums row_sums(const MultimodalBatch& b, bool document_masks) {
    OmniInput in;
    in.tokens = b.tokens.to(dev_);
    if (b.segments.defined()) in.segments = b.segments.to(dev_);
    else if (document_masks) in.segments = segments_from_bos(in.tokens, cfg_.model.tokens.bos_id);
    torch::Tensor x0, x1;
    const auto fdt = model_->text->norm->weight.scalar_type();  // the model's float type (fp32; f64 in tests)
    if (b.images.defined()) in.images = b.images.to(dev_, fdt);
    if (b.gen_images.defined()) {
      torch::NoGradGuard ng;
      auto lat = model_->vqvae->encode_normalized(b.gen_images.to(dev_, fdt));  // [Bg, C, h, w]
      x1 = patchify(lat, cfg_.model.flow.patch_size).reshape({-1, cfg_.model.flow_token_dim()});
      x0 = b.noise.to(dev_, fdt);
      in.gen_times = b.times.to(dev_, fdt);
      in.gen_latents = flow_interpolate(x0, x1, in.gen_times);
    }
    in.compute_logits = false;  // the loss is computed from the hidden states a chunk of rows at a time
    auto out = model_->forward(in);
    const auto targets = targets_of(in.tokens, b.targets.defined() ? b.targets.to(dev_) : torch::Tensor());
    RowSums r;
    r.ce = clm_loss_sum(out.hidden, model_->lm_head->table(), in.tokens, targets);
    r.se = x1.defined() ? rf_loss(upcast(out.velocity), x0, x1) * static_cast<double>(x1.size(0))
                        : torch::zeros({}, torch::TensorOptions().device(dev_));
    r.router_logits = std::move(out.router_logits);
    r.router_mask = real_tokens(in.tokens).reshape(-1);
    return r;
  }

  Losses losses(const OmniMicro& b, const StepCounts& n, size_t j) {
    AutocastGuard autocast(dev_.is_cuda() && cfg_.runtime.dtype == "bf16");
    auto zero = torch::zeros({}, torch::TensorOptions().device(dev_));
    Losses l{zero, zero, zero, zero, zero, zero, zero, zero};
    std::vector<std::vector<torch::Tensor>> routers;
    std::vector<torch::Tensor> router_masks;                                 // real tokens of each forward, [B*T]
    torch::Tensor ce_text = zero, ce_mm = zero, ce_sft = zero, se_rf = zero;  // summed losses of this micro-batch
    auto run = [&](const MultimodalBatch& rows, torch::Tensor& ce, bool document_masks) {
      if (!rows.tokens.defined()) return;
      auto r = row_sums(rows, document_masks);
      ce = r.ce;
      se_rf = se_rf + r.se;
      routers.push_back(std::move(r.router_logits));
      router_masks.push_back(r.router_mask);
    };
    MultimodalBatch text;
    text.tokens = b.text;
    run(text, ce_text, cfg_.train.document_masks);
    run(b.mm, ce_mm, false);
    run(b.sft, ce_sft, false);
    // CLM = mean over every target token of the step (text, image-caption and conversation rows together, all
    // micro-batches and ranks); RF = mean over its generated latent tokens.
    l.clm = (ce_text + ce_mm + ce_sft) / std::max(1.0, n.text + n.mm + n.sft);
    l.clm_text = ce_text / std::max(1.0, n.text);
    l.clm_mm = ce_mm / std::max(1.0, n.mm);
    l.clm_sft = ce_sft / std::max(1.0, n.sft);
    l.rf = se_rf / std::max(1.0, n.gen);
    if (!routers.empty()) {
      std::vector<torch::Tensor> per_layer;
      for (size_t i = 0; i < routers.front().size(); ++i) {
        std::vector<torch::Tensor> parts;
        for (const auto& r : routers) parts.push_back(upcast(r[i]));
        per_layer.push_back(torch::cat(parts, 0));
      }
      const auto mask = torch::cat(router_masks, 0);
      const auto reduce = reducer();
      // The z-loss is a mean over the step's real tokens; the balancing loss of this micro-batch (its routing
      // fractions f over every rank) weighted by its share of them. See docs/training.md on what that leaves open.
      const double weight = n.router_micro.at(j) / std::max(1.0, n.router);
      l.aux = load_balancing_loss(per_layer, cfg_.model.moe.top_k, reduce, mask) * weight;
      l.z = router_z_loss(per_layer, reduce, mask) * weight;
    }
    const auto& tr = cfg_.train;
    l.total = l.clm + tr.rf_weight * l.rf + tr.aux_coef * l.aux + tr.z_coef * l.z;
    return l;
  }

  // Sums over the ranks; empty in one process.
  AllReduceSum reducer() const {
    if (dist_->world() == 1) return nullptr;
    return [d = dist_](torch::Tensor& t) { d->all_reduce_sum(t); };
  }

  Config cfg_;
  torch::Device dev_;
  std::shared_ptr<Dist> dist_;
  Tokenizer tok_;
  std::unique_ptr<TextData> text_, text_valid_;
  std::vector<MixtureSource> image_mix_;                 // the image sources (data.mixture's, or data.image_train)
  std::vector<MixtureSource> sft_mix_;                   // the conversation sources (data.mixture's, or data.sft_train)
  std::vector<std::unique_ptr<ImageCaptionSet>> images_;  // their samples, one set per source
  ImageCaptionSet images_valid_;
  std::unique_ptr<MultimodalSampler> mm_, mm_valid_;
  std::unique_ptr<SftSampler> sft_, sft_valid_;
  OmniLite model_{nullptr};
  std::unique_ptr<Prefetcher<OmniMicro>> loader_;
  std::vector<OmniMicro> pending_;    // the current step's micro-batches, read ahead by begin_step
  std::vector<double> pending_wait_;  // seconds spent waiting for each of them
  int64_t pending_first_ = 0;         // the global index of pending_[0]
  StepCounts step_counts_;            // their counts over every rank
};

}  // namespace

std::unique_ptr<TrainStage> make_omni_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist) {
  return std::make_unique<OmniStage>(cfg, dev, std::move(dist));
}

}  // namespace omnilite
