#include "omnilite/train/schedule.h"

#include <algorithm>
#include <cmath>

namespace omnilite {

double lr_at(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak, double min_ratio) {
  if (warmup_steps > 0 && step < warmup_steps) return peak * static_cast<double>(step + 1) / warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps - 1);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / decay_steps);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return peak * (min_ratio + (1.0 - min_ratio) * cosine);
}

}  // namespace omnilite
