// Whole-model behaviour on the tiny config: causality of text, bidirectionality inside a generated-image block,
// image placeholders, and the shape utilities against hand-written index formulas.
#include "catch_compat.h"

#include "helpers.h"
#include "omnilite/modules/omnilite.h"

using namespace omnilite;

namespace {

struct Tiny {
  ModelConfig cfg = testing::load("configs/tiny.json").model;
  OmniLite model{nullptr};
  Tiny() {
    torch::manual_seed(5);
    model = OmniLite(cfg);
    model->to(torch::kFloat64);
    model->eval();
  }
};

// Largest |a - b| over positions [from, to) of dim 1. "Unchanged" below means < kSame: in float64 the only
// differences left are last-bit effects of BLAS blocking when an expert's batch of tokens changes size.
constexpr double kSame = 1e-12;

double diff_range(const torch::Tensor& a, const torch::Tensor& b, int64_t from, int64_t to) {
  return (a.narrow(1, from, to - from) - b.narrow(1, from, to - from)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("changing a later text token never changes an earlier output", "[model][causal]") {
  Tiny t;
  torch::NoGradGuard ng;
  auto tokens = torch::randint(10, 64, {2, 12}, torch::kInt64);
  auto base = t.model->forward({tokens}).logits;
  for (int64_t pos : {11, 6, 1}) {
    auto changed = tokens.clone();
    changed[0][pos] = (changed[0][pos].item<int64_t>() + 1 - 10) % 54 + 10;
    auto out = t.model->forward({changed}).logits;
    INFO("changed position " << pos);
    CHECK(diff_range(out[0].unsqueeze(0), base[0].unsqueeze(0), 0, pos) < kSame);
    CHECK(diff_range(out[0].unsqueeze(0), base[0].unsqueeze(0), pos, 12) > 1e-6);
    CHECK(diff_range(out[1].unsqueeze(0), base[1].unsqueeze(0), 0, 12) < kSame);  // other row untouched
  }
}

TEST_CASE("inside a generated-image block tokens see each other", "[model][causal]") {
  Tiny t;
  torch::NoGradGuard ng;
  const auto& k = t.cfg.tokens;
  const int64_t P = t.cfg.flow_token_dim();
  // text(3) <boi> gen x4 <eoi> text(2): block at positions 4..7
  const std::vector<int64_t> ids = {20, 21, 22, k.image_begin_id, k.gen_image_id, k.gen_image_id,
                                    k.gen_image_id, k.gen_image_id, k.image_end_id, 23, 24};
  auto tokens = torch::tensor(ids, torch::kInt64).view({1, 11});
  OmniInput in{tokens, {}, torch::randn({4, P}, torch::kFloat64), torch::full({4}, 0.3, torch::kFloat64)};
  auto base = t.model->forward(in);
  REQUIRE(base.velocity.sizes() == torch::IntArrayRef({4, P}));

  // Change the last latent token of the block: the block's first token changes, the text before does not.
  auto in2 = in;
  in2.gen_latents = in.gen_latents.clone();
  in2.gen_latents[3] += 1.0;
  auto out = t.model->forward(in2);
  CHECK(diff_range(out.hidden, base.hidden, 0, 4) < kSame);
  CHECK((out.velocity[0] - base.velocity[0]).abs().max().item<double>() > 1e-6);
  CHECK(diff_range(out.hidden, base.hidden, 8, 11) > 1e-6);

  // Change the text after the block: nothing in the block changes.
  auto in3 = in;
  in3.tokens = tokens.clone();
  in3.tokens[0][10] = 30;
  CHECK((t.model->forward(in3).velocity - base.velocity).abs().max().item<double>() < kSame);

  // The same positions as plain text tokens are causal: the first one ignores the last.
  auto plain = tokens.clone();
  plain.narrow(1, 4, 4).fill_(40);
  auto plain2 = plain.clone();
  plain2[0][7] = 41;
  CHECK(diff_range(t.model->forward({plain}).hidden, t.model->forward({plain2}).hidden, 0, 7) < kSame);
}

TEST_CASE("image placeholders take resampled image features", "[model][vision]") {
  Tiny t;
  torch::NoGradGuard ng;
  const auto& k = t.cfg.tokens;
  const int64_t L = t.cfg.resampler.num_latents;
  std::vector<int64_t> ids = {20, k.image_begin_id};
  for (int64_t i = 0; i < L; ++i) ids.push_back(k.image_id);
  ids.push_back(k.image_end_id);
  ids.push_back(25);
  auto tokens = torch::tensor(ids, torch::kInt64).view({1, -1});
  auto img = torch::rand({1, 3, 28, 28}, torch::kFloat64);
  auto a = t.model->forward({tokens, img}).hidden;
  auto b = t.model->forward({tokens, img + 0.5}).hidden;
  CHECK(diff_range(a, b, 0, 2) < kSame);
  CHECK(diff_range(a, b, 2, tokens.size(1)) > 1e-6);
  // Placeholder count must match the images given.
  REQUIRE_THROWS_WITH(t.model->forward({tokens}), ContainsText("image placeholders") && ContainsText("0 images"));
}

TEST_CASE("patchify follows the index formula and unpatchify inverts it", "[model][flow]") {
  const int64_t N = 2, C = 4, h = 8, w = 4, p = 2;
  auto z = torch::randn({N, C, h, w});
  auto tok = patchify(z, p);
  REQUIRE(tok.sizes() == torch::IntArrayRef({N, (h / p) * (w / p), C * p * p}));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t gy = 0; gy < h / p; ++gy)
      for (int64_t gx = 0; gx < w / p; ++gx)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t dy = 0; dy < p; ++dy)
            for (int64_t dx = 0; dx < p; ++dx)
              REQUIRE(tok[n][gy * (w / p) + gx][(c * p + dy) * p + dx].item<float>() ==
                      z[n][c][gy * p + dy][gx * p + dx].item<float>());
  CHECK(torch::equal(unpatchify(tok, C, h, w, p), z));
}

TEST_CASE("patch embedding: position table interpolates for other image sizes", "[model][vision]") {
  VisionOptions o;
  o.image_size = 28; o.patch_size = 14; o.width = 8; o.num_heads = 2;
  PatchEmbed pe(o);
  CHECK(torch::equal(pe->positions(2, 2), pe->pos_embed));
  {
    torch::NoGradGuard ng;
    pe->pos_embed.fill_(0.25);  // bicubic interpolation of a constant field is that constant
  }
  auto pos = pe->positions(3, 5);
  REQUIRE(pos.sizes() == torch::IntArrayRef({1, 15, 8}));
  CHECK((pos - 0.25).abs().max().item<double>() < 1e-6);
  auto out = pe->forward(torch::rand({1, 3, 42, 70}));
  CHECK(out.sizes() == torch::IntArrayRef({1, 15, 8}));
  REQUIRE_THROWS_WITH(pe->forward(torch::rand({1, 3, 30, 28})), ContainsText("not a multiple of patch_size"));
}

TEST_CASE("VQ-VAE: 8x downsampling, nearest codes, card's output conv", "[model][vqvae]") {
  Tiny t;
  auto& vq = *t.model->vqvae;
  auto img = torch::rand({2, 3, 32, 16}, torch::kFloat64);
  auto z = vq.encoder->forward(img);
  REQUIRE(z.sizes() == torch::IntArrayRef({2, 4, 4, 2}));
  auto q = vq.quantizer->forward(z);
  // Nearest code by an explicit search over the codebook.
  auto cb = vq.quantizer->codebook;
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t y = 0; y < 4; ++y)
      for (int64_t x = 0; x < 2; ++x) {
        auto v = z[n].select(1, y).select(1, x);  // [C]
        int64_t best = -1;
        double bd = 1e300;
        for (int64_t k = 0; k < cb.size(0); ++k) {
          const double d = (cb[k] - v).pow(2).sum().item<double>();
          if (d < bd) { bd = d; best = k; }
        }
        CHECK(q.indices[n][y][x].item<int64_t>() == best);
      }
  CHECK(torch::allclose(q.z_q, vq.quantizer->lookup(q.indices)));
  CHECK(vq.decoder->forward(q.z_q).sizes() == img.sizes());
  CHECK(vq.decoder->conv_out->weight.sizes() == torch::IntArrayRef({3, 4, 3, 3}));  // Conv2d(4 -> 3, kernel 3)
}

TEST_CASE("too long a sequence is a clear error", "[model][errors]") {
  Tiny t;
  torch::NoGradGuard ng;
  auto tokens = torch::full({1, 257}, 20, torch::kInt64);
  REQUIRE_THROWS_WITH(t.model->forward({tokens}), ContainsText("257 tokens exceeds") &&
                                                      ContainsText("max_position_embeddings = 256"));
  REQUIRE_THROWS_WITH(t.model->forward({torch::full({1, 3}, 64, torch::kInt64)}), ContainsText("[0, 64)"));
}
