// Frozen linear layer with NF4 weights (QLoRA's base layer): y = x dequant(W)^T + b.
//
// The weight lives only in its quantised form (include/omnilite/quant/nf4.h), as buffers named
// weight_packed, weight_absmax_q, weight_absmax_scale and weight_absmax_mean (plus "bias" when built with one), so
// it never receives a gradient or optimizer state. forward dequantises row chunks of at most kChunkElements values
// and multiplies them at the input's dtype (fp32 on CPU, bf16 under CUDA autocast); backward does the same for the
// input gradient instead of keeping a full-precision copy of W.
#pragma once

#include <torch/torch.h>

#include "omnilite/modules/linear.h"
#include "omnilite/quant/nf4.h"

namespace omnilite {

struct Nf4LinearImpl : LinearBaseImpl {
  static constexpr int64_t kChunkElements = int64_t{1} << 22;  // 4M weights (16 MiB fp32) dequantised at a time

  Nf4LinearImpl(int64_t in_features, int64_t out_features, bool bias);
  // x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  // Quantises w [out, in] into the buffers (and copies b when given).
  void set_weight(const torch::Tensor& w, const torch::Tensor& b = {});
  // Takes codes quantised elsewhere (a bitsandbytes 4-bit checkpoint) as they are; throws when the shape differs.
  void set_quantized(const quant::Nf4Tensor& q);
  // The quantised weight as a Nf4Tensor view of the buffers.
  quant::Nf4Tensor weight_nf4() const;
  // dequant(W) [out, in] in `dtype`.
  torch::Tensor dequantized_weight(torch::ScalarType dtype = torch::kFloat32) const;

  int64_t in_, out_;
  torch::Tensor weight_packed;        // [out * in / 2] uint8
  torch::Tensor weight_absmax_q;      // [out * in / 64] uint8 (dynamic-map codes)
  torch::Tensor weight_absmax_scale;  // [ceil(out * in / 64 / 256)] float32
  torch::Tensor weight_absmax_mean;   // [] float32
  torch::Tensor bias;                 // [out] float32 buffer (frozen), undefined without bias
  // One-row products without gradients (decoding): exact float32 (the default) or int16 inputs (runtime.
  // nf4_activations; quant/nf4.h). Products with gradients are always exact.
  quant::Nf4Activations activations = quant::Nf4Activations::Float32;
};
TORCH_MODULE(Nf4Linear);

// Sets `activations` of every Nf4Linear in `model`.
void set_nf4_activations(torch::nn::Module& model, quant::Nf4Activations a);

}  // namespace omnilite
