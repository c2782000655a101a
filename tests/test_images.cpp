// Image-caption data, multimodal rows, the background loader and the generation helpers, against hand-built
// expectations: pixel round trips through PNG, hand-written row layouts, bad entries counted.
#include "catch_compat.h"

#include <atomic>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/pnm.h"
#include "omnilite/data/prefetcher.h"
#include "omnilite/infer/generate.h"
#include "omnilite/modules/vqvae.h"
#include "omnilite/runtime.h"
#include "omnilite/train/stage.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

// [1, 3, 8, 8] image in [-1, 1] with distinct values per pixel and channel.
torch::Tensor known_image() {
  auto u8 = torch::arange(3 * 8 * 8, torch::kInt64).remainder(251).to(torch::kUInt8).view({1, 3, 8, 8});
  return u8.to(torch::kFloat32) / 127.5 - 1.0;
}

// write_image_grid with one column puts the image at (2, 2) inside a white border: crop it back.
torch::Tensor crop_single(const torch::Tensor& hwc) { return hwc.narrow(0, 2, 8).narrow(1, 2, 8); }

}  // namespace

TEST_CASE("PPM round trip and hand-written PGM/PPM files decode to their pixels (any build)", "[data][image][pnm]") {
  const auto dir = testing::fresh_temp_dir("pnm");
  write_image_grid(known_image(), 1, dir + "/a.ppm");
  auto hwc = decode_image_file(dir + "/a.ppm");
  REQUIRE(hwc.sizes() == torch::IntArrayRef({12, 12, 3}));
  auto expected = ((known_image()[0] + 1.0) * 127.5).round().to(torch::kUInt8).permute({1, 2, 0});
  CHECK(torch::equal(crop_single(hwc), expected));
  // Binary PGM (P5) with a comment, 2 x 2: gray replicated to RGB.
  std::ofstream(dir + "/g.pgm", std::ios::binary) << "P5\n# made by hand\n2 2\n255\n" << std::string("\x00\x40\x80\xff", 4);
  auto g = read_pnm(dir + "/g.pgm");
  REQUIRE(g.sizes() == torch::IntArrayRef({2, 2, 3}));
  CHECK(g[0][1][0].item<uint8_t>() == 0x40);
  CHECK(g[1][1][2].item<uint8_t>() == 0xff);
  // ASCII PPM (P3) with maxval 15: values scaled to 255 (15 -> 255, 5 -> 85).
  std::ofstream(dir + "/c.ppm") << "P3 1 1 15\n15 5 0\n";
  auto c = read_pnm(dir + "/c.ppm");
  CHECK(c[0][0][0].item<uint8_t>() == 255);
  CHECK(c[0][0][1].item<uint8_t>() == 85);
  CHECK(c[0][0][2].item<uint8_t>() == 0);
  // Errors name the file and the problem.
  std::ofstream(dir + "/cut.pgm", std::ios::binary) << "P5 4 4 255\n" << std::string("\x01\x02", 2);
  CHECK_THROWS_WITH(read_pnm(dir + "/cut.pgm"), ContainsText("cut.pgm") && ContainsText("truncated: 2 of 16"));
  std::ofstream(dir + "/deep.pgm") << "P2 1 1 65535\n7\n";
  CHECK_THROWS_WITH(read_pnm(dir + "/deep.pgm"), ContainsText("maxval 65535"));
  std::ofstream(dir + "/x.ppm") << "P7 nonsense";
  CHECK_THROWS_WITH(read_pnm(dir + "/x.ppm"), ContainsText("not a PNM file"));
  // The torch-only resize: area averaging of 2 x 2 blocks, by hand.
  auto big = torch::tensor({0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150}, torch::kUInt8)
                 .view({4, 4, 1}).expand({4, 4, 3}).contiguous();
  auto small = resize_rgb(big, 2);
  CHECK(small[0][0][0].item<uint8_t>() == 25);   // (0 + 10 + 40 + 50) / 4
  CHECK(small[1][1][1].item<uint8_t>() == 125);  // (100 + 110 + 140 + 150) / 4
}

TEST_CASE("PNG round trip: write_image_grid then decode_image_file gives the pixels back", "[data][image]") {
  if (!have_opencv()) {
    OMNILITE_SKIP("skipped: this build has no OpenCV (OMNILITE_WITH_OPENCV=OFF)");
    return;
  }
  const auto dir = testing::fresh_temp_dir("png");
  write_image_grid(known_image(), 1, dir + "/a.png");
  auto hwc = decode_image_file(dir + "/a.png");  // [12, 12, 3] RGB
  REQUIRE(hwc.sizes() == torch::IntArrayRef({12, 12, 3}));
  auto expected = ((known_image()[0] + 1.0) * 127.5).round().to(torch::kUInt8).permute({1, 2, 0});
  CHECK(torch::equal(crop_single(hwc), expected));
  CHECK(hwc[0][0][0].item<uint8_t>() == 255);  // border
}

TEST_CASE("image-caption .jsonl: good lines load, bad images and lines are skipped and counted", "[data][image]") {
  if (!have_opencv()) {
    OMNILITE_SKIP("skipped: this build has no OpenCV (OMNILITE_WITH_OPENCV=OFF) to write and read PNG/JPEG");
    return;
  }
  const auto dir = testing::fresh_temp_dir("jsonl_images");
  write_image_grid(known_image(), 1, dir + "/good.png");
  // truncated PNG: the first half of a good file
  {
    std::ifstream in(dir + "/good.png", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(dir + "/cut.png", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    std::ofstream(dir + "/cut.jpg", std::ios::binary) << std::string("\xFF\xD8\xFF\xE0", 4) << "not the rest";
  }
  std::ofstream(dir + "/text.png") << "this is not an image";
  std::ofstream list(dir + "/list.jsonl");
  list << R"({"image": "good.png", "text": "a known image", "label": 3})" << "\n"
       << R"({"image": "missing.png", "text": "gone"})" << "\n"
       << R"({"image": "cut.png", "text": "half"})" << "\n"
       << R"({"image": "cut.jpg", "text": "half jpeg"})" << "\n"
       << R"({"image": "text.png", "text": "undecodable"})" << "\n"
       << "{not json\n"
       << R"({"text": "no image key"})" << "\n\n";
  list.close();
  ImageLoadOptions o;
  o.size = 12;
  auto set = read_image_captions({dir + "/list.jsonl"}, o);
  REQUIRE(set.size() == 1);
  CHECK(set.skipped == 6);
  CHECK(set.captions[0] == std::vector<std::string>{"a known image"});
  CHECK(set.labels[0].item<int64_t>() == 3);
  CHECK(torch::equal(crop_single(set.images[0]), ((known_image()[0] + 1.0) * 127.5).round().to(torch::kUInt8).permute({1, 2, 0})));

  // Streamed (training): missing files and bad lines are skipped at once, the files that exist are decoded when
  // gathered, each undecodable one replaced by the next sample's and counted.
  o.stream = true;
  auto lazy = read_image_captions({dir + "/list.jsonl"}, o);
  REQUIRE(lazy.size() == 4);  // good, cut.png, cut.jpg, text.png
  CHECK(lazy.in_memory() == 0);
  CHECK(lazy.skipped == 3);
  CHECK(lazy.captions[2] == std::vector<std::string>{"half jpeg"});
  int64_t replaced = 0;
  const auto all = lazy.gather(torch::arange(4, torch::kInt64), &replaced);
  CHECK(replaced == 6);  // item 1 tries 1, 2, 3 before 0; item 2 tries 2, 3; item 3 tries 3
  for (int64_t i = 0; i < 4; ++i) CHECK(torch::equal(all[i], set.images[0]));
  o.stream = false;

  // Each reason is named in the error of decode_image_file.
  CHECK_THROWS_WITH(decode_image_file(dir + "/cut.png"), ContainsText("cut.png") && ContainsText("truncated PNG"));
  CHECK_THROWS_WITH(decode_image_file(dir + "/cut.jpg"), ContainsText("truncated JPEG"));
  CHECK_THROWS_WITH(decode_image_file(dir + "/text.png"), ContainsText("cannot decode"));
  CHECK_THROWS_WITH(decode_image_file(dir + "/missing.png"), ContainsText("missing.png"));
  CHECK_THROWS_WITH(read_image_captions({dir + "/list.txt"}, o), ContainsText("list.txt") && ContainsText("IDX prefix"));
}

TEST_CASE("COCO captions JSON groups the captions of each image", "[data][image]") {
  const auto dir = testing::fresh_temp_dir("coco");
  fs::create_directories(dir + "/imgs");
  write_image_grid(known_image(), 1, dir + "/imgs/1.ppm");  // PPM: read by builds with and without OpenCV
  std::ofstream(dir + "/captions.json") << R"({"images": [{"id": 7, "file_name": "1.ppm"}, {"id": 8, "file_name": "2.ppm"}],
    "annotations": [{"image_id": 7, "caption": "first"}, {"image_id": 7, "caption": "second"},
                    {"image_id": 8, "caption": "image file missing"}]})";
  ImageLoadOptions o;
  o.size = 6;
  o.image_root = dir + "/imgs";
  auto set = read_image_captions({dir + "/captions.json"}, o);
  REQUIRE(set.size() == 1);
  CHECK(set.skipped == 1);
  CHECK(set.captions[0] == std::vector<std::string>{"first", "second"});
  CHECK(set.images.sizes() == torch::IntArrayRef({1, 6, 6, 3}));
  CHECK(set.labels[0].item<int64_t>() == -1);
}

TEST_CASE("IDX sources give labelled images with the class captions, to_model_images maps bytes to -1..1",
          "[data][image]") {
  const auto dir = testing::fresh_temp_dir("idx_source");
  const auto prefix = testing::write_synthetic_fashion(dir, "train", 12, 4, 1);
  ImageLoadOptions o;
  o.size = 28;
  o.max_images = 10;
  auto set = read_image_captions({prefix}, o);
  REQUIRE(set.size() == 10);
  CHECK(set.labels[5].item<int64_t>() == 1);
  CHECK(set.captions[5][0] == fashion_caption(1, 0));
  CHECK(set.captions[5].size() == static_cast<size_t>(fashion_caption_templates()));
  auto raw = read_idx(prefix + "-images-idx3-ubyte");
  CHECK(torch::equal(set.images[3].select(2, 1), raw[3]));  // grey replicated into every channel

  auto u8 = torch::tensor({0, 255, 51, 102}, torch::kUInt8).view({1, 2, 2, 1}).expand({1, 2, 2, 3}).contiguous();
  auto x = to_model_images(u8, 2, 3);
  REQUIRE(x.sizes() == torch::IntArrayRef({1, 3, 2, 2}));
  CHECK(x[0][2][0][0].item<float>() == Approx(-1.0));
  CHECK(x[0][2][0][1].item<float>() == Approx(1.0));
  CHECK(x[0][0][1][0].item<float>() == Approx(51 / 127.5 - 1.0));
  CHECK(to_model_images(u8, 2, 1).sizes() == torch::IntArrayRef({1, 1, 2, 2}));
  CHECK(to_model_images(u8, 4, 3).sizes() == torch::IntArrayRef({1, 3, 4, 4}));
  CHECK_THROWS_WITH(read_image_captions({dir + "/nothing"}, o), ContainsText("nothing"));
}

TEST_CASE("multimodal rows have the documented layout", "[data][mm]") {
  TokenOptions t;  // bos 1, eos 2, image 3, begin 4, end 5, gen 6, pad 0
  CHECK(caption_row({40, 41}, 3, t) == std::vector<int64_t>{1, 4, 3, 3, 3, 5, 40, 41, 2});
  CHECK(generation_row({40}, 2, t) == std::vector<int64_t>{1, 40, 4, 6, 6, 5, 2});
  CHECK(generation_row({}, 2, t) == std::vector<int64_t>{1, 4, 6, 6, 5, 2});
  auto rows = pad_rows({{1, 2}, {3}}, 3, 0);
  CHECK(torch::equal(rows, torch::tensor({1, 2, 0, 3, 0, 0}, torch::kInt64).view({2, 3})));
  CHECK_THROWS_WITH(pad_rows({{1, 2, 3, 4}}, 3, 0), ContainsText("4 tokens") && ContainsText("image_seq_len"));
  ModelConfig m;
  m.vqvae.image_size = 256;  // 32x32 latent, 4x4 patches -> 8x8 tokens
  CHECK(generated_tokens_per_image(m) == 64);
}

TEST_CASE("the background loader yields exactly make(m) in order, with any number of threads", "[data][loader]") {
  auto make = [](int64_t m) { return torch::full({3}, static_cast<double>(m * m)); };
  for (int64_t threads : {0, 1, 3}) {
    Prefetcher<torch::Tensor> p(make, threads, 4, 5);
    for (int64_t m = 5; m < 40; ++m) CHECK(torch::equal(p.get(m), make(m)));
  }
  Prefetcher<int> bad([](int64_t m) -> int { if (m == 2) throw std::runtime_error("item 2 is broken"); return 0; }, 2, 2, 0);
  CHECK(bad.get(0) == 0);
  CHECK(bad.get(1) == 0);
  CHECK_THROWS_WITH(bad.get(2), ContainsText("item 2 is broken"));
}

TEST_CASE("freeze patterns: '*' matches any run of characters", "[train]") {
  CHECK(matches_pattern("vision.blocks.0.qkv.weight", "vision.*"));
  CHECK(matches_pattern("text.layers.3.moe.gate.weight", "text.layers.*.moe.gate.*"));
  CHECK_FALSE(matches_pattern("text.layers.3.moe.experts.0.w1.weight", "text.layers.*.moe.gate.*"));
  CHECK(matches_pattern("lm_head.weight", "lm_head.weight"));
  CHECK_FALSE(matches_pattern("lm_head.weight", "lm_head"));
  CHECK(matches_pattern("anything", "*"));
  CHECK(matches_pattern("a.b", "*b"));
  CHECK_FALSE(matches_pattern("a.bc", "*b"));
}

TEST_CASE("class names in captions: the first whole-word name, the longer one on a tie", "[eval]") {
  const auto& names = fashion_mnist_classes();
  CHECK(find_class_name("a photo of a t-shirt.", names) == 0);
  CHECK(find_class_name("this is a Shirt", names) == 6);
  CHECK(find_class_name("an image of a ankle boot.", names) == 9);
  CHECK(find_class_name("a coat, not a dress", names) == 4);
  CHECK(find_class_name("two sneakers", names) == -1);  // not a whole word
  CHECK(find_class_name("", names) == -1);
}

TEST_CASE("VQ-VAE standardised latents decode like the plain quantised path", "[model][vqvae]") {
  torch::manual_seed(3);
  VQVAEOptions o;
  o.base_channels = 8;
  o.codebook_size = 16;
  VQVAE vq(o, 4);
  auto x = torch::rand({6, 3, 16, 16}) * 2 - 1;
  vq->fit_latent_stats(x);
  torch::NoGradGuard ng;
  auto zq = vq->quantizer->forward(vq->encoder->forward(x)).z_q;
  // the statistics are those of the quantised latents
  CHECK(testing::max_rel_err(vq->latent_mean, zq.mean({0, 2, 3})) < 1e-6);
  auto zn = vq->encode_normalized(x);
  CHECK(testing::max_rel_err(zn.mean({0, 2, 3}), torch::zeros({4})) < 1e-5);
  CHECK(testing::max_rel_err(zn.std({0, 2, 3}), torch::ones({4})) < 1e-4);
  // decoding the standardised latent snaps back to the same codes: identical images
  CHECK(testing::max_rel_err(vq->decode_normalized(zn), vq->decoder->forward(zq)) < 1e-5);
}

namespace {

// conv2d(x, w, stride, pad) backward by loops in float64: {input gradient, weight gradient}.
std::pair<torch::Tensor, torch::Tensor> conv_grads_by_loops(const torch::Tensor& x, const torch::Tensor& w,
                                                            const torch::Tensor& gy, int64_t stride, int64_t pad) {
  auto X = x.to(torch::kFloat64), W = w.to(torch::kFloat64), GY = gy.to(torch::kFloat64);
  auto gx = torch::zeros_like(X), gw = torch::zeros_like(W);
  auto xa = X.accessor<double, 4>(), wa = W.accessor<double, 4>(), ga = GY.accessor<double, 4>();
  auto gxa = gx.accessor<double, 4>(), gwa = gw.accessor<double, 4>();
  const int64_t S = X.size(2);
  for (int64_t n = 0; n < GY.size(0); ++n)
    for (int64_t o = 0; o < W.size(0); ++o)
      for (int64_t i = 0; i < GY.size(2); ++i)
        for (int64_t j = 0; j < GY.size(3); ++j)
          for (int64_t c = 0; c < W.size(1); ++c)
            for (int64_t ki = 0; ki < W.size(2); ++ki)
              for (int64_t kj = 0; kj < W.size(3); ++kj) {
                const int64_t ii = i * stride + ki - pad, jj = j * stride + kj - pad;
                if (ii < 0 || jj < 0 || ii >= S || jj >= S) continue;
                gxa[n][c][ii][jj] += ga[n][o][i][j] * wa[o][c][ki][kj];
                gwa[o][c][ki][kj] += ga[n][o][i][j] * xa[n][c][ii][jj];
              }
  return {gx, gw};
}

}  // namespace

TEST_CASE("CPU convolution gradients equal float64 loops once the runtime has checked the backend", "[images][conv]") {
  // Debian 13's LibTorch 2.6 (oneDNN 3.6) got the input gradient of such shapes wrong on an AMD EPYC; the runtime's
  // check then switches oneDNN off. Whatever the build, the gradients training uses must match the loops.
  const auto check = check_cpu_conv_backward();
  INFO("probe error " << check.error << ", oneDNN switched off " << check.onednn_disabled << ", error after "
                      << check.error_after);
  if (check.onednn_disabled) CHECK(check.error_after <= 1e-4);
  struct Shape { int64_t ci, co, size, batch, k, stride, pad; };
  // VQ-VAE convolutions (3x3, the 4x4 stride-2 downsampling), the shapes the faulty build failed, a patch embedding
  for (const auto& s : {Shape{3, 3, 4, 2, 3, 1, 1}, Shape{8, 8, 8, 2, 3, 1, 1}, Shape{16, 8, 32, 2, 3, 1, 1},
                        Shape{8, 3, 16, 4, 3, 1, 1}, Shape{3, 8, 8, 4, 4, 2, 1}, Shape{32, 16, 16, 2, 3, 1, 1},
                        Shape{3, 32, 28, 2, 14, 14, 0}}) {
    torch::manual_seed(s.ci * 100 + s.size);
    auto w = torch::randn({s.co, s.ci, s.k, s.k}) * 0.1;
    auto x = torch::randn({s.batch, s.ci, s.size, s.size}).requires_grad_();
    auto wv = w.clone().requires_grad_();
    auto y = torch::conv2d(x, wv, {}, s.stride, s.pad);
    auto gy = torch::randn_like(y);
    y.backward(gy);
    const auto [gx, gw] = conv_grads_by_loops(x.detach(), w, gy, s.stride, s.pad);
    INFO(s.ci << " -> " << s.co << " channels, " << s.size << "x" << s.size << ", batch " << s.batch << ", kernel "
              << s.k << " stride " << s.stride);
    const double ex = (x.grad().to(torch::kFloat64) - gx).abs().max().item<double>() / gx.abs().max().item<double>();
    const double ew = (wv.grad().to(torch::kFloat64) - gw).abs().max().item<double>() / gw.abs().max().item<double>();
    CHECK(ex < 1e-5);
    CHECK(ew < 1e-5);
  }
}
