// Learning-rate schedule: linear warmup from 0 to the peak over warmup steps, then cosine decay to
// peak * min_ratio at the last step.
#pragma once

#include <cstdint>

namespace omnilite {

// step: 0-based optimizer step -> learning rate for that step.
double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak, double min_ratio);

}  // namespace omnilite
