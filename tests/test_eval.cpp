// Eval's numbers against formulas and hand computations: perplexity of a known distribution, BLEU-4 of hand-made
// sentence pairs, the Fréchet distance of Gaussians with closed forms, PSNR and codebook usage, expert-load
// statistics of a hand-made routing; and the PNG reports of a fixture metrics.jsonl decode.
#include "catch_compat.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/eval/evaluate.h"
#include "omnilite/eval/metrics.h"

using namespace omnilite;

TEST_CASE("perplexity of known distributions", "[eval]") {
  // Uniform over 7 symbols: every target has log p = -log 7 -> perplexity 7.
  CHECK(perplexity(torch::full({5, 3}, -std::log(7.0), torch::kFloat64)) == Approx(7.0).epsilon(1e-12));
  // Targets with p = 1/2, 1/4, 1/4: exp(-(ln 1/2 + 2 ln 1/4) / 3) = 2^(5/3).
  CHECK(perplexity(torch::tensor({std::log(0.5), std::log(0.25), std::log(0.25)}, torch::kFloat64)) ==
        Approx(std::pow(2.0, 5.0 / 3.0)).epsilon(1e-12));
  // A model that predicts the source distribution q of a long sample: perplexity -> exp(H(q)).
  torch::manual_seed(1);
  auto q = torch::tensor({0.5, 0.3, 0.15, 0.05}, torch::kFloat64);
  auto x = torch::multinomial(q, 200000, true);
  const double h = -(q * q.log()).sum().item<double>();
  CHECK(perplexity(q.log().index_select(0, x)) == Approx(std::exp(h)).epsilon(0.01));
  CHECK_THROWS(perplexity(torch::empty({0})));
}

TEST_CASE("BLEU-4 of hand-made sentence pairs", "[eval]") {
  const auto t = bleu_tokens;
  CHECK(t("A photo of a Coat.") == std::vector<std::string>{"a", "photo", "of", "a", "coat", "."});
  // Identical: 1.
  CHECK(corpus_bleu4({t("a photo of a coat.")}, {{t("a photo of a coat.")}}).bleu == Approx(1.0));
  // "the cat sat on the red mat" vs "the cat sat on the mat": p = 6/7, 4/6, 3/5, 2/4; c = 7 > r = 6: BP = 1.
  auto s = corpus_bleu4({t("the cat sat on the red mat")}, {{t("the cat sat on the mat")}});
  CHECK(s.precision[0] == Approx(6.0 / 7));
  CHECK(s.precision[1] == Approx(4.0 / 6));
  CHECK(s.precision[2] == Approx(3.0 / 5));
  CHECK(s.precision[3] == Approx(2.0 / 4));
  CHECK(s.brevity_penalty == 1.0);
  CHECK(s.bleu == Approx(std::pow(6.0 / 7 * 4.0 / 6 * 3.0 / 5 * 2.0 / 4, 0.25)));
  // Too short: every precision 1, BP = exp(1 - 6/4).
  s = corpus_bleu4({t("the cat sat on")}, {{t("the cat sat on the mat")}});
  CHECK(s.bleu == Approx(std::exp(1.0 - 6.0 / 4.0)));
  // Clipping: "the" seven times against a reference holding it twice: p1 = 2/7, no bigram matches -> 0.
  s = corpus_bleu4({t("the the the the the the the")}, {{t("the cat is on the mat")}});
  CHECK(s.precision[0] == Approx(2.0 / 7));
  CHECK(s.bleu == 0.0);
  // Several references: the closest length (5, not 3 or 8) sets r; n-grams count against the best reference.
  s = corpus_bleu4({t("a b c d e")}, {{t("a b c"), t("a b c d x"), t("a b c d e f g h")}});
  CHECK(s.ref_length == 5);
  CHECK(s.bleu == Approx(1.0));
  // Corpus level: counts are summed before dividing. Sentence 1 matches fully (4 unigrams ... 1 four-gram), sentence
  // 2 has 4 tokens, unigrams 2/4 and no higher matches: p1 = 6/8, p2 = 3/6 + ..., computed by hand below.
  s = corpus_bleu4({t("w x y z"), t("p q r s")}, {{t("w x y z")}, {t("p u r v")}});
  CHECK(s.precision[0] == Approx(6.0 / 8));  // 4 + 2 of 8
  CHECK(s.precision[1] == Approx(3.0 / 6));  // 3 + 0 of 6
  CHECK(s.precision[2] == Approx(2.0 / 4));  // 2 + 0 of 4
  CHECK(s.precision[3] == Approx(1.0 / 2));  // 1 + 0 of 2
  CHECK(s.bleu == Approx(std::pow(6.0 / 8 * 3.0 / 6 * 2.0 / 4 * 1.0 / 2, 0.25)));
  CHECK_THROWS_WITH(corpus_bleu4({t("a")}, {}), ContainsText("1 hypotheses but 0"));
}

TEST_CASE("Frechet distance of Gaussians with closed forms", "[eval]") {
  // Diagonal covariances: |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  auto m1 = torch::tensor({0.0, 1.0, -2.0}, torch::kFloat64), m2 = torch::tensor({1.0, 1.0, 0.5}, torch::kFloat64);
  auto a = torch::tensor({1.0, 4.0, 0.25}, torch::kFloat64), b = torch::tensor({9.0, 1.0, 0.25}, torch::kFloat64);
  const double expect = (m1 - m2).pow(2).sum().item<double>() + (a.sqrt() - b.sqrt()).pow(2).sum().item<double>();
  CHECK(frechet_distance({m1, torch::diag(a)}, {m2, torch::diag(b)}) == Approx(expect).epsilon(1e-10));
  // S2 = c^2 S1 for a full (non-diagonal) S1: (1 - c)^2 tr(S1).
  torch::manual_seed(2);
  auto r = torch::randn({6, 6}, torch::kFloat64);
  auto s1 = torch::matmul(r, r.t()) + 0.1 * torch::eye(6, torch::kFloat64);
  auto zero = torch::zeros({6}, torch::kFloat64);
  CHECK(frechet_distance({zero, s1}, {zero, 2.25 * s1}) == Approx(0.25 * s1.trace().item<double>()).epsilon(1e-9));
  CHECK(std::abs(frechet_distance({zero, s1}, {zero, s1})) < 1e-9);
  // fit_gaussian against a naive loop.
  auto f = torch::randn({50, 3}, torch::kFloat64);
  auto g = fit_gaussian(f);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      double mi = 0, mj = 0, c = 0;
      for (int n = 0; n < 50; ++n) mi += f[n][i].item<double>() / 50, mj += f[n][j].item<double>() / 50;
      for (int n = 0; n < 50; ++n) c += (f[n][i].item<double>() - mi) * (f[n][j].item<double>() - mj) / 49;
      CHECK(g.cov[i][j].item<double>() == Approx(c).epsilon(1e-10));
    }
}

TEST_CASE("PSNR and codebook usage by hand", "[eval]") {
  auto y = torch::rand({2, 3, 4, 4}) * 2 - 1;
  // MSE 0.01 with values spanning 2: 10 log10(4 / 0.01).
  CHECK(psnr(y + 0.1, y, 2.0) == Approx(10 * std::log10(400.0)).epsilon(1e-5));
  auto u = codebook_usage(torch::tensor({0, 0, 1, 1}, torch::kInt64), 4);
  CHECK(u.perplexity == Approx(2.0));
  CHECK(u.used == 2);
  CHECK(u.dead == 2);
  // Frequencies 1/2, 1/4, 1/4: exp(H) = 2^(3/2).
  u = codebook_usage(torch::tensor({3, 3, 1, 2}, torch::kInt64), 8);
  CHECK(u.perplexity == Approx(std::pow(2.0, 1.5)));
  CHECK(u.dead == 5);
}

TEST_CASE("expert-load statistics of a hand-made routing", "[eval][moe]") {
  // 4 tokens, 4 experts, top-2: {0,1}, {0,1}, {2,3}, {0,2}.
  auto logits = torch::tensor({{3.0, 2.0, 0.0, -1.0}, {2.5, 2.0, 1.0, 0.0}, {0.0, -1.0, 2.0, 1.0}, {2.0, 0.0, 1.5, -2.0}},
                              torch::kFloat64).view({1, 4, 4});
  auto all = torch::ones({1, 4}, torch::kBool);
  auto load = expert_load(logits, all, 2);
  CHECK(load.tokens == 4);
  CHECK(load.tokens_per_expert == std::vector<int64_t>{3, 2, 2, 1});
  // mean 2, population std sqrt((1 + 0 + 0 + 1) / 4).
  CHECK(load.cv == Approx(std::sqrt(0.5) / 2));
  // Adjacent pairs: (0,1) same set, (1,2) and (2,3) not.
  CHECK(load.pair_repeat == Approx(1.0 / 3));
  // E * sum_e f_e P_e with f = counts / 8 and P the mean softmax, by hand.
  double expect = 0;
  for (int e = 0; e < 4; ++e) {
    double p = 0;
    for (int t = 0; t < 4; ++t) {
      double z = 0;
      for (int k = 0; k < 4; ++k) z += std::exp(logits[0][t][k].item<double>());
      p += std::exp(logits[0][t][e].item<double>()) / z / 4;
    }
    expect += 4 * (static_cast<double>(load.tokens_per_expert[static_cast<size_t>(e)]) / 8) * p;
  }
  CHECK(load.balance_loss == Approx(expect).epsilon(1e-5));
  // Only tokens 0, 1 and 3 selected: counts {3, 2, 1, 0}; the only adjacent selected pair (0, 1) repeats.
  auto some = torch::tensor({true, true, false, true}).view({1, 4});
  load = expert_load(logits, some, 2);
  CHECK(load.tokens_per_expert == std::vector<int64_t>{3, 2, 1, 0});
  CHECK(load.pair_repeat == 1.0);
}

TEST_CASE("reports: loss curves, training stats, run comparison, heatmap and captioned grid decode as PNG",
          "[eval][reports]") {
  CHECK(parse_eval_tasks("ppl,moe") == std::vector<std::string>{"ppl", "moe"});
  CHECK(parse_eval_tasks("all") == std::vector<std::string>{"ppl", "caption", "t2i", "recon", "moe", "vqa"});
  CHECK_THROWS_WITH(parse_eval_tasks("ppl,fid"), ContainsText("\"fid\""));
  if (!have_opencv()) {
    WARN("skipped: this build has no OpenCV (OMNILITE_WITH_OPENCV=OFF) to draw reports");
    return;
  }
  const auto dir = testing::fresh_temp_dir("reports");
  for (const char* run : {"a", "b"}) {
    std::filesystem::create_directories(dir + "/" + run);
    std::ofstream f(dir + "/" + run + "/metrics.jsonl");
    for (int s = 1; s <= 30; ++s)
      f << "{\"step\": " << s << ", \"loss\": " << 5.0 / s + (run[0] == 'b') << ", \"loss_clm\": " << 4.0 / s
        << ", \"lr\": " << 1e-4 * s / 30 << ", \"grad_norm\": " << 1.0 + (s % 3) << ", \"tokens_per_s\": " << 1000 + s
        << "}\n";
  }
  const std::string m = dir + "/a/metrics.jsonl";
  write_loss_curves(m, {"loss", "loss_clm", "loss_rf"}, dir + "/curves.png");
  write_training_stats(m, dir + "/stats.png");
  write_run_comparison({m, dir + "/b/metrics.jsonl"}, {"a", "b"}, {"loss", "tokens_per_s"}, dir + "/compare.png");
  write_heatmap(torch::rand({24, 16}), "load", "layer", "expert", dir + "/heat.png");
  write_captioned_grid(torch::rand({7, 3, 28, 28}) * 2 - 1, {"a photo of a coat.", "x"}, 4, dir + "/captions.png");
  for (const char* png : {"curves.png", "stats.png", "compare.png", "heat.png", "captions.png"}) {
    INFO(png);
    const auto img = decode_image_file(dir + "/" + png);  // [H, W, 3] uint8
    CHECK(img.size(1) >= 200);
    CHECK(img.lt(250).sum().item<int64_t>() > 100);  // something was drawn on the white page
  }
}
