// `omnilite train`: a recipe of setup steps, one per config section, then the step loop.
//
// train.stage chooses the module and its losses (include/omnilite/train/stage.h); each optimizer step: grad_accum
// micro-batches -> loss (omni: CLM + lambda_rf * RF + alpha * aux + beta * z) -> backward -> clip -> AdamW with the
// warmup + cosine learning rate. A NaN/Inf loss or gradient norm skips the step; train.max_bad_steps in a row stop
// the run with the last checkpoint intact.
//
// Run folder: metrics.jsonl (one object per optimizer step), config.json, checkpoints/step_NNNNNNN/ with
// model.safetensors, optimizer.pt, state.json. A checkpoint is written into a temporary folder and renamed into
// place; the last train.keep_last are kept. --resume continues from the newest one exactly.
#pragma once

#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/moe.h"

namespace omnilite {

struct TrainRunOptions {
  std::string out_dir = "runs/default";  // run folder
  std::string resume_dir;                // run folder or checkpoint folder to continue from ("" = fresh run)
  int64_t max_steps = -1;                // stop after this many steps in total when >= 0 (default train.steps); the
                                         // learning-rate schedule always spans train.steps
};

struct TrainResult {
  int64_t steps_done = 0;       // optimizer steps completed in total (including resumed ones)
  double last_loss = 0.0;       // total loss of the last step
  double first_loss = 0.0;      // total loss of the first step of this invocation
  std::string last_checkpoint;  // folder of the newest checkpoint
};

// Runs training; throws std::runtime_error with a clear message on bad input.
TrainResult train(const Config& cfg, const TrainRunOptions& run);

// Timing of whole optimizer steps of a config's stage on its data (no checkpoints, no metrics file): `warmup`
// untimed steps, then `steps` timed ones. Used by `omnilite bench train`. With `profile` set, the timed steps'
// LibTorch ops are written to that path as a Chrome trace (chrome://tracing, Perfetto).
struct TrainBenchResult {
  double seconds_per_step = 0;  // mean wall time of a timed step (data wait included)
  double units_per_s = 0;       // tokens/s (images/s for image stages)
  double units_per_step = 0;    // tokens (images) per optimizer step
  double data_wait_frac = 0;    // share of timed step time spent waiting for data
  MoEPathCounts moe_forwards;   // MoE layer forwards of the whole run (warm-up included), by path
};
TrainBenchResult bench_train_steps(const Config& cfg, int64_t steps, int64_t warmup, const std::string& profile = "");

// The gate of one optimizer step. A finite loss can still back-propagate NaN/Inf (an op's backward at a singular
// point), so the step is taken only when the loss and the gradient norm are both finite; a skipped step leaves the
// weights as they were.
struct GradCheck {
  double grad_norm = 0;  // 2-norm of all gradients before clipping (0 when the loss is NaN/Inf: not measured)
  bool finite = false;   // loss and gradient norm finite: the optimizer may step
};
// Measures the gradients of `params` and clips them to max_norm (<= 0: measured only) when the loss is finite, as
// torch.nn.utils.clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6) when below 1), with the norm summed in
// float64 (clip_grad_norm_'s float32 sums err by ~1e-5 relative on tensors of a million elements; ZeRO-2/3 measure
// the same float64 sum from their shards, so every ZeRO stage logs the same norm).
GradCheck clip_and_check(const std::vector<torch::Tensor>& params, double loss, double max_norm);
// The same over ZeRO-2/3's shards (the norm from every rank's chunks: one scalar all-reduce).
class ZeroShards;
GradCheck clip_and_check(ZeroShards& shards, double loss, double max_norm);
// Σ t² accumulated in float64 (never a float64 copy of the whole tensor), as a float64 scalar on t's device. On the
// CPU for contiguous float32/float64 tensors, one pass over the values in fixed pieces of 2^16 elements on the
// intra-op threads, the pieces' sums added in order (the same sum at any thread count); otherwise in pieces of 2^20
// elements with LibTorch ops.
torch::Tensor sum_of_squares_fp64(const torch::Tensor& t);

// One AdamW step of `opt`, as torch::optim::AdamW::step() computes it (decoupled weight decay, bias-corrected
// moments, the same state objects, so checkpoints and ZeRO shards see no difference), with the update of each CPU
// float32/float64 parameter fused into one pass over its values (on the intra-op threads) instead of eight tensor
// ops. When any parameter with a gradient is not such (CUDA, bf16, non-contiguous) or amsgrad is on, LibTorch's own
// step runs instead.
void adamw_step(torch::optim::AdamW& opt);

// The optimizer's state key of a parameter: LibTorch 1.13 keys by the TensorImpl address printed as a string,
// 2.x by the address itself.
template <class Map>
typename Map::key_type optimizer_state_key(const Map&, const torch::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << p.unsafeGetTensorImpl();
    return s.str();
  } else {
    return static_cast<Key>(static_cast<void*>(p.unsafeGetTensorImpl()));
  }
}

}  // namespace omnilite
