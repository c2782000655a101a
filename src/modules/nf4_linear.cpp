#include "omnilite/modules/nf4_linear.h"

#include "omnilite/quant/gemm.h"
#include "omnilite/runtime.h"

namespace omnilite {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = x W^T with W dequantised chunk by chunk in forward and again in backward (nothing but x's shape is saved).
struct Nf4Matmul : torch::autograd::Function<Nf4Matmul> {
  // x: [N, in] -> [N, out]
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, Nf4LinearImpl* layer) {
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    const auto q = layer->weight_nf4();
    // Decoding (a few rows on the CPU): products straight from the codes, W never materialised.
    if (x.device().is_cpu() && x.size(0) <= quant::kNf4FewRows && x.scalar_type() == torch::kFloat32)
      return quant::nf4_matmul_few_rows_cpu(x, q);
    // W dequantised a block of rows at a time; on the CPU the blocks are spread over the intra-op threads when
    // OpenBLAS has fewer (quant/gemm.h).
    const int64_t rows = std::max<int64_t>(1, Nf4LinearImpl::kChunkElements / layer->in_);
    return quant::matmul_by_row_blocks(x, layer->out_, rows, [&](int64_t r, int64_t n) {
      return quant::nf4_dequantize_rows(q, r, n, x.scalar_type());
    });
  }
  // grad_y: [N, out] -> grad_x: [N, in]
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* layer = reinterpret_cast<Nf4LinearImpl*>(ctx->saved_data["layer"].toInt());
    const auto& g = grads[0];
    const auto q = layer->weight_nf4();
    // the blocks' products [N, in] summed in block order, on the intra-op threads as in forward
    const int64_t rows = std::max<int64_t>(1, Nf4LinearImpl::kChunkElements / layer->in_);
    const auto gx = quant::sum_by_row_blocks(layer->out_, rows, g.device().is_cpu(), [&](int64_t r, int64_t n) {
      return torch::matmul(g.narrow(1, r, n), quant::nf4_dequantize_rows(q, r, n, g.scalar_type()));
    });
    return {gx, torch::Tensor()};
  }
};

}  // namespace

Nf4LinearImpl::Nf4LinearImpl(int64_t in, int64_t out, bool with_bias) : in_(in), out_(out) {
  TORCH_CHECK(in > 0 && out > 0 && in % quant::kNf4BlockSize == 0, "Nf4Linear: in_features must be a positive "
              "multiple of ", quant::kNf4BlockSize, ", got in=", in, ", out=", out,
              "; hint: keep this projection in full precision");
  const int64_t n = in * out, nb = n / quant::kNf4BlockSize;
  weight_packed = register_buffer("weight_packed", torch::zeros({n / 2}, torch::kUInt8));
  weight_absmax_q = register_buffer("weight_absmax_q", torch::zeros({nb}, torch::kUInt8));
  weight_absmax_scale = register_buffer("weight_absmax_scale",
                                        torch::zeros({(nb + quant::kAbsmaxBlockSize - 1) / quant::kAbsmaxBlockSize}));
  weight_absmax_mean = register_buffer("weight_absmax_mean", torch::zeros({}));
  if (with_bias) bias = register_buffer("bias", torch::zeros({out}));
}

void Nf4LinearImpl::set_quantized(const quant::Nf4Tensor& q) {
  TORCH_CHECK(q.shape == std::vector<int64_t>({out_, in_}) && q.packed.numel() == weight_packed.numel() &&
                  q.absmax_q.numel() == weight_absmax_q.numel() && q.absmax_scale.numel() == weight_absmax_scale.numel(),
              "Nf4Linear: expected 4-bit codes of a [", out_, ", ", in_, "] weight, got shape ",
              c10::IntArrayRef(q.shape));
  torch::NoGradGuard ng;
  weight_packed.copy_(q.packed);
  weight_absmax_q.copy_(q.absmax_q);
  weight_absmax_scale.copy_(q.absmax_scale);
  weight_absmax_mean.copy_(q.absmax_mean);
}

void Nf4LinearImpl::set_weight(const torch::Tensor& w, const torch::Tensor& b) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == out_ && w.size(1) == in_, "Nf4Linear: expected a weight [", out_, ", ",
              in_, "], got ", w.sizes());
  auto q = quant::nf4_quantize(w);
  torch::NoGradGuard ng;
  weight_packed.copy_(q.packed);
  weight_absmax_q.copy_(q.absmax_q);
  weight_absmax_scale.copy_(q.absmax_scale);
  weight_absmax_mean.copy_(q.absmax_mean);
  if (b.defined()) {
    TORCH_CHECK(bias.defined() && b.numel() == out_, "Nf4Linear: bias of ", b.numel(), " values for ", out_, " outputs");
    bias.copy_(b);
  }
}

quant::Nf4Tensor Nf4LinearImpl::weight_nf4() const {
  return {weight_packed, weight_absmax_q, weight_absmax_scale, weight_absmax_mean, {out_, in_}};
}

torch::Tensor Nf4LinearImpl::dequantized_weight(torch::ScalarType dtype) const {
  return quant::nf4_dequantize(weight_nf4(), dtype);
}

// x: [..., in] -> [..., out]
torch::Tensor Nf4LinearImpl::forward(const torch::Tensor& x) {
  auto flat = x.reshape({-1, in_});  // [N, in]
  if (flat.is_cuda()) {
    // Under CUDA autocast the weight is dequantised straight to the autocast dtype (bf16) and multiplied there.
    if (const auto dt = cuda_autocast_dtype()) flat = flat.to(*dt);
  }
  // Decoding without gradients skips the autograd node (its bookkeeping weighs on a one-row product).
  const bool direct = !(torch::GradMode::is_enabled() && flat.requires_grad()) && flat.device().is_cpu() &&
                      flat.size(0) <= quant::kNf4FewRows && flat.scalar_type() == torch::kFloat32;
  auto y = direct ? quant::nf4_matmul_few_rows_cpu(flat, weight_nf4(), 2, activations) : Nf4Matmul::apply(flat, this);
  if (bias.defined()) y = y + bias.to(y.scalar_type());
  auto sizes = x.sizes().vec();
  sizes.back() = out_;
  return y.view(sizes);
}

void set_nf4_activations(torch::nn::Module& model, quant::Nf4Activations a) {
  for (const auto& m : model.modules())
    if (auto* q = dynamic_cast<Nf4LinearImpl*>(m.get())) q->activations = a;
}

}  // namespace omnilite
