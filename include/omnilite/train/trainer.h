// `omnilite train`: a recipe of setup steps, one per config section, then the step loop.
//
// Each optimizer step: grad_accum micro-batches of packed text -> loss = CLM + alpha * aux + beta * z
// (+ lambda_rf * RF once image-generation data is wired in) -> backward -> clip -> AdamW with the warmup + cosine
// learning rate. A NaN/Inf loss skips the step; max_bad_steps in a row stop the run with the last checkpoint intact.
//
// Run folder: metrics.jsonl (one object per optimizer step), config.json, checkpoints/step_NNNNNNN/ with
// model.safetensors, optimizer.pt, state.json. A checkpoint is written into a temporary folder and renamed into
// place; the last train.keep_last are kept. --resume continues from the newest one exactly.
#pragma once

#include <memory>
#include <string>

#include "omnilite/config.h"

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

// The newest checkpoint folder under a run folder (or the folder itself if it is a checkpoint); throws if none.
std::string latest_checkpoint(const std::string& dir);

}  // namespace omnilite
