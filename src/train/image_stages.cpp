// Stages "vqvae" and "classifier": image-only training on the image-caption sources, at model.vqvae.image_size.
#include <chrono>
#include <stdexcept>

#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/prefetcher.h"
#include "omnilite/log.h"
#include "omnilite/modules/image_classifier.h"
#include "omnilite/modules/vqvae.h"
#include "stages.h"

namespace omnilite {
namespace {

struct ImageMicro {
  torch::Tensor images;  // [B, C, S, S] float in [-1, 1]
  torch::Tensor labels;  // [B] int64
};

// Images of the training sources in epoch permutations, batched in background threads.
class ImageStageBase : public TrainStage {
 public:
  ImageStageBase(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist)
      : cfg_(cfg), dev_(dev), dist_(std::move(dist)) {
    const auto io = image_load_options(cfg.data, cfg.model.vqvae.image_size);
    train_ = read_training_images(cfg.data, io.size);
    if (!cfg.data.image_valid.empty()) valid_ = read_image_captions(cfg.data.image_valid, io);
    order_ = std::make_unique<EpochSampler>(train_.size(), cfg.train.seed);
    log::info(log::format("data: %lld training images, %lld held out, %lldx%lld", static_cast<long long>(train_.size()),
                          static_cast<long long>(valid_.size()), static_cast<long long>(io.size),
                          static_cast<long long>(io.size)));
  }
  std::string unit() const override { return "images"; }
  void start(int64_t first) override {
    loader_ = std::make_unique<Prefetcher<ImageMicro>>(
        [this](int64_t m) {
          // this rank's items rank, rank + W, ... of the global micro-batch of W * batch_size images
          const int64_t b = cfg_.train.batch_size, W = dist_->world();
          std::vector<int64_t> idx;
          for (int64_t i = 0; i < b; ++i) idx.push_back(order_->at(m * b * W + dist_->rank() + W * i));
          return batch(train_, torch::tensor(idx, torch::kInt64));
        },
        cfg_.train.loader_threads, 2 * cfg_.train.loader_threads + 1, first);
  }

 protected:
  ImageMicro batch(const ImageCaptionSet& set, const torch::Tensor& idx) const {
    return {to_model_images(set.gather(idx), cfg_.model.vqvae.image_size, cfg_.model.vqvae.in_channels),
            set.labels.index_select(0, idx)};
  }
  // The micro-batch on the device and the seconds spent waiting for it.
  std::pair<ImageMicro, double> next(int64_t micro) {
    const auto w0 = std::chrono::steady_clock::now();
    auto b = loader_->get(micro);
    const double wait = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
    return {{b.images.to(dev_), b.labels.to(dev_)}, wait};
  }
  // This rank's held-out micro-batches: of the first valid_batches * batch_size * W images in file order (all when
  // fewer), items rank, rank + W, ...
  template <class F>
  void for_valid_batches(F&& f) const {
    const int64_t W = dist_->world(), B = cfg_.train.batch_size;
    const int64_t n = std::min(valid_.size(), cfg_.train.valid_batches * B * W);
    for (int64_t s = dist_->rank(); s < n; s += B * W) {
      auto idx = torch::arange(s, std::min(n, s + B * W), W, torch::kInt64);
      auto b = batch(valid_, idx);
      f(ImageMicro{b.images.to(dev_), b.labels.to(dev_)});
    }
  }
  // {sum, count} summed over the ranks -> sum / count (0 when no rank had any).
  double global_mean(double sum, double count) const {
    auto t = torch::tensor({sum, count}, torch::kFloat64).to(dev_);
    dist_->all_reduce_sum(t);
    t = t.cpu();
    return t[0].item<double>() / std::max(1.0, t[1].item<double>());
  }
  // Every rank's micro-batch holds batch_size images: a mean over it, shared out, sums to the global mean.
  void begin_step(int64_t, int64_t count) override { step_micros_ = count; }
  // Every micro-batch holds the same number of images on every rank: a share is 1 / (micro-batches x ranks).
  double share() const { return 1.0 / static_cast<double>(dist_->world() * step_micros_); }

  int64_t step_micros_ = 1;  // micro-batches of the current optimizer step

  Config cfg_;
  torch::Device dev_;
  std::shared_ptr<Dist> dist_;
  ImageCaptionSet train_, valid_;
  std::unique_ptr<EpochSampler> order_;
  std::unique_ptr<Prefetcher<ImageMicro>> loader_;
};

// VQ-VAE: loss = MSE(recon, x) + ||sg(z_e) - e||^2 + beta ||z_e - sg(e)||^2. Codes unused over vq_restart_every
// steps restart at random encoder outputs of the current batch (a fresh run starts with all codes placed so).
class VQVAEStage : public ImageStageBase {
 public:
  VQVAEStage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist)
      : ImageStageBase(cfg, dev, std::move(dist)), vq_(cfg.model.vqvae, cfg.model.flow.latent_channels) {
    vq_->to(dev);
    vq_->train();
    usage_ = torch::zeros({cfg.model.vqvae.codebook_size}, torch::kInt64);
  }
  torch::nn::Module& module() override { return *vq_; }
  std::vector<std::string> terms() const override { return {"loss_recon", "loss_codebook", "loss_commit", "codes_used"}; }

  MicroResult micro_step(int64_t micro) override {
    auto [b, wait] = next(micro);
    if (micro == 0) restart_codes(b.images, torch::ones_like(usage_).to(torch::kBool));  // data-dependent init
    auto out = vq_->forward(b.images);
    auto recon = torch::mse_loss(out.recon, b.images);
    MicroResult r;
    const double w = share();
    r.loss = (recon + out.q.codebook_loss + cfg_.model.vqvae.commitment_beta * out.q.commit_loss) * w;
    auto counts = torch::bincount(out.q.indices.reshape(-1).cpu(), {}, cfg_.model.vqvae.codebook_size);
    usage_ += counts;
    // codes_used: the mean over ranks of the fraction each rank's micro-batch used
    r.terms = {{"loss_recon", recon.item<double>() * w}, {"loss_codebook", out.q.codebook_loss.item<double>() * w},
               {"loss_commit", out.q.commit_loss.item<double>() * w},
               {"codes_used", counts.gt(0).sum().item<double>() / static_cast<double>(counts.numel()) * w}};
    r.units = static_cast<double>(b.images.size(0));
    r.wait_s = wait;
    last_images_ = b.images;
    return r;
  }

  void after_step(int64_t step) override {
    const int64_t every = cfg_.train.vq_restart_every;
    if (every <= 0 || step % every != 0) return;
    auto used = usage_.to(torch::kFloat64).to(dev_);  // code uses on every rank
    dist_->all_reduce_sum(used);
    auto dead = used.cpu().eq(0);
    const int64_t n = dead.sum().item<int64_t>();
    if (n > 0) {
      restart_codes(last_images_, dead);
      log::info(log::format("vqvae: restarted %lld unused codes of %lld", static_cast<long long>(n),
                            static_cast<long long>(usage_.numel())));
    }
    usage_.zero_();
  }

  void before_checkpoint() override {
    // Latent statistics over (up to) 1024 training images: the flow works on standardised latents.
    const int64_t n = std::min<int64_t>(1024, train_.size());
    torch::NoGradGuard ng;
    vq_->eval();
    vq_->fit_latent_stats(batch(train_, torch::arange(n, torch::kInt64)).images.to(dev_));
    vq_->train();
  }

  std::map<std::string, double> validate() override {
    if (valid_.size() == 0) return {};
    torch::NoGradGuard ng;
    vq_->eval();
    double sum = 0, n = 0;
    for_valid_batches([&](const ImageMicro& b) {
      sum += torch::mse_loss(vq_->forward(b.images).recon, b.images).item<double>() * b.images.size(0);
      n += b.images.size(0);
    });
    vq_->train();
    return {{"valid_loss_recon", global_mean(sum, n)}};
  }

 private:
  // Codes where `which` is true move to random encoder outputs of `images` (plus a little noise); in a data-parallel
  // run rank 0's choice, from its micro-batch, goes to every rank.
  void restart_codes(const torch::Tensor& images, const torch::Tensor& which) {
    torch::NoGradGuard ng;
    auto z = vq_->encoder->forward(images);                                      // [N, C, h, w]
    auto flat = z.permute({0, 2, 3, 1}).reshape({-1, z.size(1)});               // [M, C]
    auto idx = which.nonzero().squeeze(1).to(dev_);                              // [k]
    auto pick = torch::randint(flat.size(0), {idx.size(0)}, torch::TensorOptions().dtype(torch::kInt64)).to(dev_);
    auto chosen = flat.index_select(0, pick);
    vq_->quantizer->codebook.index_copy_(0, idx, chosen + 0.01 * chosen.std() * torch::randn_like(chosen));
    std::vector<torch::Tensor> codebook{vq_->quantizer->codebook};
    dist_->broadcast(codebook, 0);
  }

  VQVAE vq_;
  torch::Tensor usage_;        // [K] code uses since the last restart check
  torch::Tensor last_images_;  // the last micro-batch (restart candidates)
};

// Classifier: cross-entropy on the labelled training images.
class ClassifierStage : public ImageStageBase {
 public:
  ClassifierStage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist)
      : ImageStageBase(cfg, dev, std::move(dist)) {
    const int64_t classes = train_.labels.max().item<int64_t>() + 1;
    if (train_.labels.min().item<int64_t>() < 0 || classes < 2)
      throw std::runtime_error("train.stage = \"classifier\" needs labelled images (IDX sources or .jsonl lines with "
                               "\"label\"); data.image_train has unlabelled ones");
    net_ = ImageClassifier(cfg.model.vqvae.in_channels, cfg.model.vqvae.image_size, classes);
    net_->to(dev);
    net_->train();
  }
  torch::nn::Module& module() override { return *net_; }
  std::vector<std::string> terms() const override { return {"loss_ce", "accuracy"}; }

  MicroResult micro_step(int64_t micro) override {
    auto [b, wait] = next(micro);
    auto logits = net_->forward(b.images);
    MicroResult r;
    const double w = share();
    r.loss = torch::cross_entropy_loss(logits, b.labels) * w;
    r.terms = {{"loss_ce", r.loss.item<double>()},
               {"accuracy", logits.argmax(1).eq(b.labels).to(torch::kFloat64).mean().item<double>() * w}};
    r.units = static_cast<double>(b.images.size(0));
    r.wait_s = wait;
    return r;
  }

  std::map<std::string, double> validate() override {
    if (valid_.size() == 0) return {};
    torch::NoGradGuard ng;
    net_->eval();
    double correct = 0, n = 0;
    for_valid_batches([&](const ImageMicro& b) {
      correct += net_->forward(b.images).argmax(1).eq(b.labels).sum().item<double>();
      n += b.images.size(0);
    });
    net_->train();
    return {{"valid_accuracy", global_mean(correct, n)}};
  }

 private:
  ImageClassifier net_{nullptr};
};

}  // namespace

std::unique_ptr<TrainStage> make_vqvae_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist) {
  return std::make_unique<VQVAEStage>(cfg, dev, std::move(dist));
}
std::unique_ptr<TrainStage> make_classifier_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist) {
  return std::make_unique<ClassifierStage>(cfg, dev, std::move(dist));
}

}  // namespace omnilite
