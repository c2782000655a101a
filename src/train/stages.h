// Factories of the training stages (private to src/train; the public entry point is make_stage in stage.h).
#pragma once

#include <memory>

#include "omnilite/train/stage.h"

namespace omnilite {

std::unique_ptr<TrainStage> make_omni_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist);
std::unique_ptr<TrainStage> make_vqvae_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist);
std::unique_ptr<TrainStage> make_classifier_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist);

}  // namespace omnilite
