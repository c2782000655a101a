// CPU GEMMs split across the intra-op threads (quant/gemm.h), and the layers that take them for a prompt, against
// a float64 product; bf16 attention of a prompt against the float64 attention of the same values.
#include "catch_compat.h"

#include "helpers.h"
#include "omnilite/modules/attention.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/quant/gemm.h"
#include "omnilite/runtime.h"

using namespace omnilite;

namespace {

// 2 intra-op threads and 1 OpenBLAS thread (configs/omni-lite.json's split) for a scope; the test process's
// setting (1 thread, main.cpp) is put back.
struct TwoPlusOne {
  int blas = blas_threads_in_use();
  TwoPlusOne() { configure_threads(2, 1); }
  ~TwoPlusOne() {
    torch::set_num_threads(1);
    if (blas > 0) configure_threads(1, blas);
  }
};

// |got - ref| within float32 summation error of a K-term dot product, relative to sum |x_k w_k|
void check_product(const torch::Tensor& got, const torch::Tensor& x, const torch::Tensor& w) {
  const auto xd = x.to(torch::kFloat64), wd = w.to(torch::kFloat64);
  const auto ref = torch::mm(xd, wd.t()), mag = torch::mm(xd.abs(), wd.abs().t());
  const double K = static_cast<double>(x.size(1));
  CHECK(((got.to(torch::kFloat64) - ref).abs() <= mag * (K * 6e-8) + 1e-30).all().item<bool>());
}

}  // namespace

TEST_CASE("matmul_by_row_blocks: the float64 product, split over threads or not, any block size",
          "[quant][gemm]") {
  torch::manual_seed(61);
  const auto x = torch::randn({37, 96}), w = torch::randn({203, 96});
  auto rows = [&](int64_t r, int64_t n) { return w.narrow(0, r, n); };
  {
    TwoPlusOne split;
    if (blas_threads_in_use() > 0) CHECK(quant::gemm_column_splits() == 2);
    for (const int64_t max_rows : {int64_t{1}, int64_t{16}, int64_t{50}, int64_t{203}, int64_t{1000}}) {
      const auto y = quant::matmul_by_row_blocks(x, 203, max_rows, rows);
      REQUIRE(y.sizes() == torch::IntArrayRef({37, 203}));
      check_product(y, x, w);
    }
  }
  CHECK(quant::gemm_column_splits() == 1);  // 1 intra-op thread
  check_product(quant::matmul_by_row_blocks(x, 203, 64, rows), x, w);
}

TEST_CASE("Prompt layers under 2 + 1 threads: plain fp32 and NF4 rows equal their float64 products",
          "[quant][gemm]") {
  torch::manual_seed(62);
  TwoPlusOne split;
  torch::NoGradGuard ng;
  PlainLinearImpl plain(128, 72, true);
  plain.bias.normal_(0, 0.1);
  const auto x = torch::randn({3, 11, 128});
  const auto y = plain.forward(x);
  REQUIRE(y.sizes() == torch::IntArrayRef({3, 11, 72}));
  check_product((y - plain.bias).view({-1, 72}), x.view({-1, 128}), plain.weight);

  Nf4LinearImpl q(128, 72, false);
  q.set_weight(torch::randn({72, 128}) * 0.05);
  const auto w = q.dequantized_weight(torch::kFloat32);
  const auto xq = torch::randn({20, 128});  // more rows than the few-row kernel takes
  check_product(q.forward(xq), xq, w);
}

TEST_CASE("Attention: a bf16 prompt on the CPU equals the float64 attention of its values within bf16 rounding",
          "[attention][bf16]") {
  torch::manual_seed(63);
  const auto q = torch::randn({1, 4, 9, 16}).to(torch::kBFloat16);
  const auto k = torch::randn({1, 2, 9, 16}).to(torch::kBFloat16), v = torch::randn({1, 2, 9, 16}).to(torch::kBFloat16);
  torch::NoGradGuard ng;
  const auto got = attention_core(q, k, v, torch::Tensor(), true);
  REQUIRE(got.scalar_type() == torch::kBFloat16);
  const auto ref = attention_reference(q.to(torch::kFloat64), k.to(torch::kFloat64), v.to(torch::kFloat64),
                                       torch::Tensor(), true);
  // one rounding to bf16 (2^-8 relative) of a float32 computation
  CHECK(((got.to(torch::kFloat64) - ref).abs() <= ref.abs() / 256 + 1e-5).all().item<bool>());
}

TEST_CASE("Training under 2 + 1 threads: split plain and NF4 layers give the float64 gradients", "[quant][gemm]") {
  torch::manual_seed(64);
  TwoPlusOne split;
  PlainLinearImpl plain(96, 56, true);
  {
    torch::NoGradGuard ng;
    plain.bias.normal_(0, 0.1);
  }
  const auto x = torch::randn({2, 13, 96}, torch::requires_grad());
  const auto gy = torch::randn({2, 13, 56});
  const auto y = plain.forward(x);
  (y * gy).sum().backward();
  // the float64 reference by autograd of the plain formula
  const auto xd = x.detach().to(torch::kFloat64).requires_grad_();
  const auto wd = plain.weight.detach().to(torch::kFloat64).requires_grad_();
  const auto bd = plain.bias.detach().to(torch::kFloat64).requires_grad_();
  const auto yd = torch::matmul(xd, wd.t()) + bd;
  (yd * gy.to(torch::kFloat64)).sum().backward();
  CHECK(testing::max_rel_err(y, yd) < 1e-5);
  CHECK(testing::max_rel_err(x.grad(), xd.grad()) < 1e-5);
  CHECK(testing::max_rel_err(plain.weight.grad(), wd.grad()) < 1e-5);
  CHECK(testing::max_rel_err(plain.bias.grad(), bd.grad()) < 1e-5);

  PlainLinearImpl nobias(96, 40, false);  // no bias: the autograd function takes x and W alone
  const auto x2 = torch::randn({9, 96}, torch::requires_grad());
  nobias.forward(x2).sum().backward();
  const auto ones = torch::ones({9, 40}, torch::kFloat64);
  CHECK(testing::max_rel_err(x2.grad(), torch::mm(ones, nobias.weight.detach().to(torch::kFloat64))) < 1e-5);
  CHECK(testing::max_rel_err(nobias.weight.grad(), torch::mm(ones.t(), x2.detach().to(torch::kFloat64))) < 1e-5);

  Nf4LinearImpl q(128, 80, false);
  q.set_weight(torch::randn({80, 128}) * 0.05);
  const auto xq = torch::randn({24, 128}, torch::requires_grad());
  const auto gq = torch::randn({24, 80});
  (q.forward(xq) * gq).sum().backward();
  const auto ref = torch::mm(gq.to(torch::kFloat64), q.dequantized_weight(torch::kFloat32).to(torch::kFloat64));
  CHECK(testing::max_rel_err(xq.grad(), ref) < 1e-5);
}
