#include "omnilite/eval/metrics.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>
#include <stdexcept>

#include "omnilite/modules/losses.h"

namespace omnilite {

double perplexity(const torch::Tensor& target_logprobs) {
  if (target_logprobs.numel() == 0) throw std::runtime_error("perplexity of no tokens");
  return std::exp(-target_logprobs.to(torch::kFloat64).mean().item<double>());
}

std::vector<std::string> bleu_tokens(const std::string& text) {
  std::vector<std::string> out;
  std::string word;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c == '\'' || c >= 0x80) {
      word.push_back(static_cast<char>(std::tolower(c)));
      continue;
    }
    if (!word.empty()) out.push_back(word), word.clear();
    if (!std::isspace(c)) out.emplace_back(1, ch);
  }
  if (!word.empty()) out.push_back(word);
  return out;
}

BleuScore corpus_bleu4(const std::vector<std::vector<std::string>>& hyps,
                       const std::vector<std::vector<std::vector<std::string>>>& refs) {
  if (hyps.size() != refs.size())
    throw std::runtime_error("BLEU: " + std::to_string(hyps.size()) + " hypotheses but " +
                             std::to_string(refs.size()) + " reference lists");
  using Gram = std::vector<std::string>;
  std::array<double, 4> matched{}, total{};
  BleuScore s;
  for (size_t i = 0; i < hyps.size(); ++i) {
    const auto& h = hyps[i];
    s.hyp_length += static_cast<int64_t>(h.size());
    // Closest reference length (ties: the shorter).
    int64_t best = -1;
    for (const auto& r : refs[i]) {
      const int64_t len = static_cast<int64_t>(r.size()), hl = static_cast<int64_t>(h.size());
      if (best < 0 || std::llabs(len - hl) < std::llabs(best - hl) || (std::llabs(len - hl) == std::llabs(best - hl) && len < best))
        best = len;
    }
    s.ref_length += std::max<int64_t>(best, 0);
    for (size_t n = 1; n <= 4; ++n) {
      std::map<Gram, int64_t> hc, maxref;
      for (size_t k = 0; k + n <= h.size(); ++k) ++hc[Gram(h.begin() + k, h.begin() + k + n)];
      for (const auto& r : refs[i]) {
        std::map<Gram, int64_t> rc;
        for (size_t k = 0; k + n <= r.size(); ++k) ++rc[Gram(r.begin() + k, r.begin() + k + n)];
        for (const auto& [g, c] : rc) maxref[g] = std::max(maxref[g], c);
      }
      for (const auto& [g, c] : hc) {
        matched[n - 1] += static_cast<double>(std::min(c, maxref.count(g) ? maxref[g] : 0));
        total[n - 1] += static_cast<double>(c);
      }
    }
  }
  double log_sum = 0;
  bool zero = false;
  for (size_t n = 0; n < 4; ++n) {
    s.precision[n] = total[n] > 0 ? matched[n] / total[n] : 0.0;
    if (s.precision[n] == 0) zero = true;
    else log_sum += std::log(s.precision[n]) / 4.0;
  }
  const double c = static_cast<double>(s.hyp_length), r = static_cast<double>(s.ref_length);
  s.brevity_penalty = c == 0 ? 0.0 : (c < r ? std::exp(1.0 - r / c) : 1.0);
  s.bleu = zero ? 0.0 : s.brevity_penalty * std::exp(log_sum);
  return s;
}

Gaussian fit_gaussian(const torch::Tensor& features) {
  if (features.dim() != 2 || features.size(0) < 2)
    throw std::runtime_error("fit_gaussian: expected [N >= 2, F] features, got " + c10::str(features.sizes()));
  auto x = features.to(torch::kFloat64).cpu();
  auto mean = x.mean(0);
  auto c = x - mean;
  return {mean, torch::matmul(c.t(), c) / static_cast<double>(x.size(0) - 1)};
}

namespace {
// Square root of a symmetric positive semi-definite matrix through its eigendecomposition (negative round-off
// eigenvalues clamped to 0). at::linalg_eigh rather than torch::linalg::eigh: some LibTorch 2.x packages (Debian's
// 2.6) ship without torch/linalg.h.
torch::Tensor sqrtm_psd(const torch::Tensor& s) {
  auto [vals, vecs] = at::linalg_eigh(s, "L");
  return torch::matmul(vecs * vals.clamp_min(0).sqrt().unsqueeze(0), vecs.t());
}
}  // namespace

double frechet_distance(const Gaussian& a, const Gaussian& b) {
  auto d = a.mean - b.mean;
  auto sa = sqrtm_psd(a.cov);
  auto m = torch::matmul(torch::matmul(sa, b.cov), sa);
  m = (m + m.t()) / 2;  // symmetric up to round-off
  auto tr_sqrt = std::get<0>(at::linalg_eigh(m, "L")).clamp_min(0).sqrt().sum();
  return (d.dot(d) + a.cov.trace() + b.cov.trace() - 2 * tr_sqrt).item<double>();
}

double psnr(const torch::Tensor& x, const torch::Tensor& y, double peak) {
  const double mse = (x.to(torch::kFloat64) - y.to(torch::kFloat64)).pow(2).mean().item<double>();
  return 10.0 * std::log10(peak * peak / std::max(mse, 1e-20));
}

CodebookUsage codebook_usage(const torch::Tensor& indices, int64_t codebook_size) {
  auto counts = torch::bincount(indices.reshape(-1).to(torch::kInt64).cpu(), {}, codebook_size).to(torch::kFloat64);
  auto p = counts / counts.sum().clamp_min(1);
  auto nz = p.masked_select(p > 0);
  CodebookUsage u;
  u.perplexity = std::exp(-(nz * nz.log()).sum().item<double>());
  u.used = (counts > 0).sum().item<int64_t>();
  u.dead = codebook_size - u.used;
  return u;
}

ExpertLoad expert_load(const torch::Tensor& router_logits, const torch::Tensor& selected, int64_t top_k) {
  const int64_t T = router_logits.size(1), E = router_logits.size(2);
  auto logits = router_logits.to(torch::kFloat64).cpu();
  auto sel = selected.to(torch::kBool).cpu();
  auto ids = std::get<1>(logits.topk(top_k, -1));  // [B, T, K]
  ids = std::get<0>(ids.sort(-1));                  // as sets
  ExpertLoad r;
  r.tokens_per_expert.assign(static_cast<size_t>(E), 0);
  auto flat_sel = sel.reshape(-1);
  r.tokens = flat_sel.sum().item<int64_t>();
  if (r.tokens == 0) return r;
  auto chosen = ids.reshape({-1, top_k}).index({flat_sel});  // [n, K]
  auto counts = torch::bincount(chosen.reshape(-1), {}, E);
  for (int64_t e = 0; e < E; ++e) r.tokens_per_expert[static_cast<size_t>(e)] = counts[e].item<int64_t>();
  auto cf = counts.to(torch::kFloat64);
  r.cv = (cf.std(/*unbiased=*/false) / cf.mean()).item<double>();
  r.balance_loss = load_balancing_loss({logits.reshape({-1, E}).index({flat_sel})}, top_k).item<double>();
  const int64_t pairs = T > 1 ? (sel.narrow(1, 1, T - 1) & sel.narrow(1, 0, T - 1)).sum().item<int64_t>() : 0;
  const int64_t same = T > 1 ? (ids.narrow(1, 1, T - 1).eq(ids.narrow(1, 0, T - 1)).all(-1) & sel.narrow(1, 1, T - 1) &
                                sel.narrow(1, 0, T - 1)).sum().item<int64_t>()
                             : 0;
  r.pair_repeat = pairs ? static_cast<double>(same) / static_cast<double>(pairs) : 0.0;
  return r;
}

}  // namespace omnilite
