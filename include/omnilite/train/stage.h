// A training stage: what `omnilite train` optimises, chosen by train.stage.
//   "omni"       the OMNI-LITE model: CLM on packed text and image-caption rows + lambda_rf * rectified flow on
//                generated-image latents + alpha * load balancing + beta * router z-loss; the VQ-VAE is frozen.
//   "vqvae"      the VQ-VAE alone: reconstruction MSE + codebook + beta * commitment, dead codes restarted.
//   "classifier" the CNN that judges generated images in eval (cross-entropy on labelled training images).
// The trainer (trainer.cpp) owns the loop, the optimizer, checkpoints and metrics; a stage owns data and losses.
//
// An optimizer step takes train.grad_accum = k micro-batches. Before them the trainer calls begin_step; each
// micro_step returns that micro-batch's share of the step's loss and of every logged term, and the trainer sums the
// shares: normalisers (target tokens, generated latents, router tokens, image counts) are those of the whole step,
// so k micro-batches of b items take the step of one micro-batch of k * b (token-weighted, not a mean of means).
// Data-parallel runs (distributed.h): micro-batch m is a global micro-batch of W times the configured batch sizes;
// a stage reads its rank's items (rank, rank + W, ...), and the normalisers are summed over ranks too, so the
// shares of all ranks and micro-batches add up to the value of the global step's batch.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/layer_gate.h"
#include "omnilite/pattern.h"
#include "omnilite/train/distributed.h"

namespace omnilite {

struct MicroResult {
  torch::Tensor loss;                   // scalar the trainer back-propagates (this micro-batch's and rank's share)
  std::map<std::string, double> terms;  // its shares of the step's logged terms (keys: TrainStage::terms())
  double units = 0;                     // tokens or images processed by this rank (throughput)
  double wait_s = 0;                    // seconds spent waiting for the data loader
};

class TrainStage {
 public:
  virtual ~TrainStage() = default;
  // The module whose parameters are optimised and whose state checkpoints hold (model.safetensors).
  virtual torch::nn::Module& module() = 0;
  // Names of the logged terms, in display order (e.g. loss_clm, loss_rf, loss_aux, loss_z).
  virtual std::vector<std::string> terms() const = 0;
  // "tokens" or "images": the metrics key is <unit>_per_s.
  virtual std::string unit() const = 0;
  // Starts the data loaders at micro-batch `first` (0 for a fresh run, the checkpoint's position on resume).
  virtual void start(int64_t first) = 0;
  // Before the micro-batches first, ..., first + count - 1 of one optimizer step (count = train.grad_accum): the
  // stage learns how many shares the step has, and may read them ahead to count the step's tokens.
  virtual void begin_step(int64_t first, int64_t count) = 0;
  // Forward pass and losses of micro-batch `micro` (the next one after the previous call, within the step that
  // begin_step announced).
  virtual MicroResult micro_step(int64_t micro) = 0;
  // After optimizer step `step` (1-based), e.g. codebook maintenance.
  virtual void after_step(int64_t step) {}
  // Before a checkpoint is written, e.g. statistics that inference needs.
  virtual void before_checkpoint() {}
  // Writes the trained weights into checkpoint folder `dir` (default: model.safetensors of module(); QLoRA runs
  // write the adapters in PEFT's layout) and reads them back on resume.
  virtual void save_weights(const std::string& dir, int64_t step);
  virtual void load_weights(const std::string& dir);
  // ZeRO-3 (train.zero = 3, zero.h): the block lists ("text.layers.", "vision.blocks.") whose blocks every rank runs
  // alike, the same number of times in every micro-batch, so that each block can be gathered around its use (a
  // gather is a collective: a rank that skipped a block would leave the others waiting). Empty: everything that
  // trains is gathered for the whole step.
  virtual std::vector<std::string> block_lists() const { return {}; }
  // The gate that block list `prefix` (one of block_lists()) calls around each of its blocks.
  virtual void set_block_gate(const std::string& prefix, std::shared_ptr<LayerGate> gate) {}
  // Held-out metrics (keys start with "valid_"), the same on every rank (each computes its part, then they are
  // summed); empty when the stage has no held-out data.
  virtual std::map<std::string, double> validate() { return {}; }
  // The identity of each streamed data source (config key -> fingerprint of its shards), kept in state.json beside
  // the data position (micro_batches), so that a resume on changed shards is told it is no exact resume.
  virtual std::map<std::string, std::string> data_fingerprints() const { return {}; }
};

// The stage of cfg.train.stage on `device`; reads its data and reports an empty dataset before step 1. `dist`: the
// data-parallel group (null = one process).
std::unique_ptr<TrainStage> make_stage(const Config& cfg, torch::Device device, std::shared_ptr<Dist> dist = nullptr);

}  // namespace omnilite
