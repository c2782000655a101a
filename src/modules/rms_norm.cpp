#include "omnilite/modules/rms_norm.h"

namespace omnilite {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

// x: [..., D] -> [..., D]; normalised in fp32 then cast back before the weight, as transformers' MixtralRMSNorm.
torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  auto xf = x.scalar_type() == torch::kFloat64 ? x : x.to(torch::kFloat32);
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

}  // namespace omnilite
