// GGUF: llama.cpp's reference quantisers, the file format, the export of the text backbone (a llama-architecture
// forward written from llama.cpp's conventions reads it), the import back, and llama.cpp's SPM tokeniser.
// The real llama.cpp is the referee in tests/interop/check_gguf.py.
#include <cmath>
#include <filesystem>
#include <fstream>

#include "catch_compat.h"
#include "helpers.h"
#include "omnilite/config.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/gguf.h"
#include "omnilite/io/gguf_export.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/spm_model.h"
#include "omnilite/modules/omnilite.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// A llama-architecture forward as llama.cpp defines it, in float64, from the GGUF alone: its llama.* keys and its
// tensors under GGUF names (ne innermost first), RoPE over adjacent pairs (x[2i], x[2i+1]) as LLAMA_ROPE_TYPE_NORM
// rotates them, experts from the stacked ffn_*_exps tensors, output.weight or the embedding when it is absent.
torch::Tensor llama_reference_logits(const std::string& path, const std::vector<int64_t>& ids) {
  io::GgufReader r(path);
  auto W = [&](const std::string& n) { return r.load(n).to(torch::kFloat64); };
  auto K = [&](const std::string& k) { return r.at("llama." + k).get<int64_t>(); };
  const int64_t H = K("attention.head_count"), KV = K("attention.head_count_kv"), L = K("block_count");
  const int64_t Dh = K("attention.key_length"), topk = K("expert_used_count");
  const double eps = r.at("llama.attention.layer_norm_rms_epsilon").get<double>();
  const double theta = r.at("llama.rope.freq_base").get<double>();
  const int64_t T = static_cast<int64_t>(ids.size());
  auto rms = [&](const torch::Tensor& x, const torch::Tensor& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
  };
  auto inv_freq = torch::pow(theta, -torch::arange(0, Dh, 2, torch::kFloat64) / static_cast<double>(Dh));
  auto ang = torch::arange(T, torch::kFloat64).unsqueeze(1) * inv_freq.unsqueeze(0);  // [T, Dh/2]
  auto cos = ang.cos(), sin = ang.sin();
  auto rope = [&](const torch::Tensor& t) {  // [heads, T, Dh], pairs (2i, 2i+1)
    auto p = t.view({t.size(0), T, Dh / 2, 2});
    auto a = p.select(-1, 0), b = p.select(-1, 1);
    return torch::stack({a * cos - b * sin, a * sin + b * cos}, -1).view(t.sizes());
  };
  auto mask = torch::full({T, T}, -INFINITY, torch::kFloat64).triu(1);
  auto x = W("token_embd.weight").index_select(0, torch::tensor(ids, torch::kInt64));
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    auto h = rms(x, W(p + "attn_norm.weight"));
    auto q = rope(torch::matmul(h, W(p + "attn_q.weight").t()).view({T, H, Dh}).transpose(0, 1));
    auto k = rope(torch::matmul(h, W(p + "attn_k.weight").t()).view({T, KV, Dh}).transpose(0, 1));
    auto v = torch::matmul(h, W(p + "attn_v.weight").t()).view({T, KV, Dh}).transpose(0, 1);
    k = k.repeat_interleave(H / KV, 0);
    v = v.repeat_interleave(H / KV, 0);
    auto att = torch::softmax(torch::matmul(q, k.transpose(1, 2)) / std::sqrt(static_cast<double>(Dh)) + mask, -1);
    x = x + torch::matmul(torch::matmul(att, v).transpose(0, 1).reshape({T, H * Dh}), W(p + "attn_output.weight").t());
    h = rms(x, W(p + "ffn_norm.weight"));
    auto probs = torch::softmax(torch::matmul(h, W(p + "ffn_gate_inp.weight").t()), -1);
    auto top = probs.topk(topk, -1);
    auto weights = std::get<0>(top) / std::get<0>(top).sum(-1, true);
    auto gate = W(p + "ffn_gate_exps.weight"), up = W(p + "ffn_up_exps.weight"), down = W(p + "ffn_down_exps.weight");
    auto out = torch::zeros_like(x);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t e = std::get<1>(top)[t][j].item<int64_t>();
        out[t] += weights[t][j] * torch::matmul(down[e], torch::silu(torch::matmul(gate[e], h[t])) * torch::matmul(up[e], h[t]));
      }
    x = x + out;
  }
  x = rms(x, W("output_norm.weight"));
  return torch::matmul(x, (r.tensor("output.weight") ? W("output.weight") : W("token_embd.weight")).t());
}

// configs/tiny.json with the word corpus and its tokenizer, a model of it saved under dir/src.safetensors.
Config tiny_saved(const std::string& dir, bool tied, uint64_t seed) {
  Config c = testing::tiny_text_config(dir);
  c.model.text.tie_word_embeddings = tied;
  torch::manual_seed(seed);
  OmniLite model(c.model);
  io::save_module(*model, dir + "/src.safetensors");
  return c;
}

}  // namespace

TEST_CASE("gguf quantisers: llama.cpp's Q8_0 and Q4_0 reference blocks by hand", "[gguf]") {
  // Q8_0: d = amax / 127 as fp16, q = round(x / d) half away from zero.
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = 0.25f * static_cast<float>(i - 16);  // -4 .. 3.75; amax 4
  const auto q8 = io::quantize_q8_0(x.data(), 32);
  REQUIRE(q8.size() == 34);
  CHECK(half_to_float(q8.data()) == static_cast<float>(c10::Half(4.0f / 127.0f)));
  const float id8 = 1.0f / (4.0f / 127.0f);
  for (int i = 0; i < 32; ++i) CHECK(static_cast<int8_t>(q8[2 + i]) == static_cast<int>(std::lround(x[i] * id8)));
  CHECK(static_cast<int8_t>(q8[2]) == -127);
  // Q4_0: d = (the value of largest magnitude, sign kept) / -8; nibble = min(15, trunc(x / d + 8.5)), low nibbles
  // for the first 16 values, high for the last 16. Here that value is -4: d = 0.5, so -4 -> 0 and 3.75 -> 15 (16
  // clamped).
  const auto q4 = io::quantize_q4_0(x.data(), 32);
  REQUIRE(q4.size() == 18);
  CHECK(half_to_float(q4.data()) == 0.5f);
  for (int j = 0; j < 16; ++j) {
    const int lo = std::min(15, static_cast<int>(x[j] / 0.5f + 8.5f));
    const int hi = std::min(15, static_cast<int>(x[j + 16] / 0.5f + 8.5f));
    CHECK(q4[2 + j] == (lo | (hi << 4)));
  }
  CHECK((q4[2] & 0x0F) == 0);
  CHECK((q4[2 + 15] >> 4) == 15);
  // An all-zero block: d = 0 and every code the zero point.
  std::vector<float> z(32, 0.0f);
  const auto qz = io::quantize_q4_0(z.data(), 32);
  for (int j = 0; j < 16; ++j) CHECK(qz[2 + j] == 0x88);
  // Dequantisation error: at most d/2 for Q8_0, d for Q4_0 (its clamp at +8), d as stored in fp16 (within 2^-11
  // of the exact scale, times up to 127 or 8 codes), on random data.
  torch::manual_seed(1);
  auto v = torch::randn({8, 64});
  for (auto t : {io::GgmlType::Q8_0, io::GgmlType::Q4_0}) {
    const auto bytes = io::to_ggml(t, v);
    CHECK(bytes.size() == io::ggml_nbytes(t, v.numel()));
    const auto back = io::from_ggml(t, bytes.data(), {8, 64});
    auto blocks = v.view({-1, 32}).abs().amax(1, true);
    const double scale = t == io::GgmlType::Q8_0 ? (0.5 + 127.0 / 2048) / 127.0 : (1.0 + 8.0 / 2048) / 8.0;
    CHECK(((back - v).view({-1, 32}).abs() <= blocks * scale * 1.001 + 1e-7).all().item<bool>());
  }
}

TEST_CASE("gguf file: metadata and tensors of every type round-trip and broken files are refused by name", "[gguf]") {
  const auto dir = testing::fresh_temp_dir("gguf_file");
  torch::manual_seed(2);
  auto a = torch::randn({3, 64}), b = torch::randn({5, 32});
  io::GgufMetadata meta = {{"general.architecture", io::gguf_string("llama")},
                           {"x.u32", io::gguf_u32(7)},
                           {"x.f32", io::gguf_f32(0.5)},
                           {"x.flag", io::gguf_bool(true)},
                           {"x.names", io::gguf_array(io::GgufValueType::STRING, {"a", "b\xe2\x96\x81"})},
                           {"x.scores", io::gguf_array(io::GgufValueType::F32, {1.5, -2.0})}};
  const std::vector<io::GgmlType> types = {io::GgmlType::F32, io::GgmlType::F16, io::GgmlType::BF16,
                                           io::GgmlType::Q8_0, io::GgmlType::Q4_0};
  std::vector<io::GgufTensorInfo> infos;
  for (auto t : types) infos.push_back({"a." + io::ggml_type_name(t), {64, 3}, t});
  infos.push_back({"b", {32, 5}, io::GgmlType::F32});
  {
    io::GgufWriter w(dir + "/m.gguf", meta, infos);
    for (auto t : types) w.write("a." + io::ggml_type_name(t), io::to_ggml(t, a));
    w.write("b", io::to_ggml(io::GgmlType::F32, b));
    CHECK(!fs::exists(dir + "/m.gguf"));  // nothing visible before commit
    w.commit();
  }
  REQUIRE(io::is_gguf_file(dir + "/m.gguf"));
  io::GgufReader r(dir + "/m.gguf");
  CHECK(r.at("x.u32") == 7);
  CHECK(r.at("x.f32") == 0.5);
  CHECK(r.at("x.flag") == true);
  CHECK(r.at("x.names")[1] == "b\xe2\x96\x81");
  CHECK(r.at("x.scores")[1] == -2.0);
  CHECK(r.find("x.absent") == nullptr);
  REQUIRE(r.tensors().size() == 6);
  for (const auto& t : r.tensors()) CHECK(t.offset % 32 == 0);
  CHECK(torch::equal(r.load("a.f32"), a));
  CHECK(torch::equal(r.load("b"), b));
  CHECK(torch::equal(r.load("a.f16"), a.to(torch::kHalf).to(torch::kFloat32)));
  CHECK(torch::equal(r.load("a.bf16"), a.to(torch::kBFloat16).to(torch::kFloat32)));  // both round to nearest even
  for (auto t : {io::GgmlType::Q8_0, io::GgmlType::Q4_0}) {
    const auto bytes = io::to_ggml(t, a);
    CHECK(std::equal(bytes.begin(), bytes.end(), r.data(*r.tensor("a." + io::ggml_type_name(t)))));
  }
  // A row that does not fill Q8_0 blocks is refused when laid out, before anything is written.
  REQUIRE_THROWS_WITH(io::GgufWriter(dir + "/bad.gguf", meta, {{"odd", {48, 2}, io::GgmlType::Q8_0}}),
                      ContainsText("\"odd\" has rows of 48 values"));
  // Truncated, not GGUF.
  const auto size = fs::file_size(dir + "/m.gguf");
  fs::copy_file(dir + "/m.gguf", dir + "/cut.gguf");
  fs::resize_file(dir + "/cut.gguf", size - 40);
  REQUIRE_THROWS_WITH(io::GgufReader(dir + "/cut.gguf"), ContainsText("past the end of the file"));
  { std::ofstream(dir + "/not.gguf") << "this is not a gguf file at all, just text"; }
  REQUIRE_THROWS_WITH(io::GgufReader(dir + "/not.gguf"), ContainsText("not a GGUF file"));
  REQUIRE_THROWS_WITH(io::parse_ggml_type("--type", "q5_k"), ContainsText("--type \"q5_k\": expected f32"));
}

TEST_CASE("gguf permutation: q/k rows go from rotate-half to adjacent pairs per head and back", "[gguf]") {
  // head_dim 4, 2 heads: each head's rows [0 1 2 3] become [0 2 1 3] (convert_hf_to_gguf.py's LlamaModel.permute).
  auto w = torch::arange(8, torch::kFloat32).unsqueeze(1).expand({8, 3}).contiguous();
  auto p = io::permute_for_gguf(w, 2);
  CHECK(torch::equal(p.select(1, 0), torch::tensor({0.f, 2.f, 1.f, 3.f, 4.f, 6.f, 5.f, 7.f})));
  auto big = torch::randn({64, 16});
  CHECK(torch::equal(io::unpermute_from_gguf(io::permute_for_gguf(big, 4), 4), big));
}

TEST_CASE("gguf export: a llama-architecture forward of the file gives OMNI-LITE's logits (tied and untied)",
          "[gguf][export]") {
  for (bool tied : {false, true}) {
    const auto dir = testing::fresh_temp_dir(std::string("gguf_export_") + (tied ? "tied" : "untied"));
    const Config c = tiny_saved(dir, tied, tied ? 12 : 11);
    OmniLite model(c.model);
    io::load_module(*model, dir + "/src.safetensors");
    model->eval();
    const std::vector<int64_t> ids = {1, 17, 33, 9, 60, 41, 8, 25, 12, 50, 7, 19};
    torch::NoGradGuard ng;
    const auto ours = model->forward({torch::tensor(ids, torch::kInt64).view({1, -1})}).logits[0];
    for (auto type : {io::GgmlType::F32, io::GgmlType::Q8_0}) {
      io::GgufExportOptions o;
      o.out_file = dir + "/m-" + io::ggml_type_name(type) + ".gguf";
      o.type = type;
      o.tokenizer = c.data.tokenizer;
      const auto res = io::write_gguf_export(dir + "/src.safetensors", c, 3, o);
      io::GgufReader r(o.out_file);
      INFO("tied " << tied << " type " << io::ggml_type_name(type));
      CHECK((r.tensor("output.weight") == nullptr) == tied);
      CHECK(res.tensors == 2 + 10 * c.model.text.num_layers + (tied ? 0 : 1));
      CHECK(r.tensor("blk.0.ffn_gate_exps.weight")->ne == std::vector<int64_t>{64, 32, 4});
      CHECK(r.tensor("blk.0.ffn_down_exps.weight")->ne == std::vector<int64_t>{32, 64, 4});
      CHECK(r.tensor("blk.0.ffn_gate_inp.weight")->type == io::GgmlType::F32);
      CHECK(r.tensor("blk.1.attn_norm.weight")->type == io::GgmlType::F32);
      CHECK(r.tensor("blk.1.attn_q.weight")->type == type);
      CHECK(r.at("general.file_type") == io::llama_file_type(type));
      CHECK(r.at("llama.expert_used_count") == 2);
      CHECK(r.at("tokenizer.ggml.tokens").size() == 320);  // 280 pieces padded to vocab_size
      CHECK(r.at("tokenizer.ggml.tokens")[300] == "[PAD300]");
      CHECK(r.at("tokenizer.ggml.token_type")[1] == 3);  // <s> is a control token
      const auto ref = llama_reference_logits(o.out_file, ids);
      if (type == io::GgmlType::F32) {
        CHECK(testing::max_rel_err(ours, ref) < 1e-5);
      } else {
        CHECK(testing::max_rel_err(ours, ref) < 5e-2);  // 8-bit weights
        CHECK(testing::max_rel_err(ours, ref) > 1e-6);
      }
    }
  }
}

TEST_CASE("gguf import: f32 is lossless and q8_0 gives the dequantised weights with the config and tokenizer back",
          "[gguf][export]") {
  const auto dir = testing::fresh_temp_dir("gguf_import");
  const Config c = tiny_saved(dir, false, 13);
  OmniLite model(c.model);
  io::load_module(*model, dir + "/src.safetensors");
  model->eval();
  for (auto type : {io::GgmlType::F32, io::GgmlType::Q8_0}) {
    io::GgufExportOptions o;
    o.out_file = dir + "/m.gguf";
    o.type = type;
    o.tokenizer = c.data.tokenizer;
    io::write_gguf_export(dir + "/src.safetensors", c, 9, o);
    const std::string out = dir + "/imported-" + io::ggml_type_name(type);
    const auto res = io::import_gguf(o.out_file, out, dir + "/src.safetensors");
    CHECK(!res.multimodal_initialised);
    const json state = io::read_checkpoint_state(out);
    CHECK(state["step"] == 9);
    const Config back = parse_config(state["config"]);
    CHECK(to_json(back)["model"] == to_json(c)["model"]);
    OmniLite imported(back.model);
    io::load_module(*imported, out);
    io::GgufReader r(o.out_file);
    auto theirs = io::state_tensors(*imported);
    int64_t checked = 0;
    for (const auto& [name, t] : io::state_tensors(*model)) {
      INFO(name);
      const auto& other = std::find_if(theirs.begin(), theirs.end(), [&](auto& p) { return p.first == name; })->second;
      if (type == io::GgmlType::F32 || t.dim() < 2 || name.find("moe.gate") != std::string::npos) {
        CHECK(torch::equal(t, other));
      } else if (name.find("experts") == std::string::npos && name.find("q_proj") == std::string::npos &&
                 name.find("k_proj") == std::string::npos && io::is_mixtral_tensor(name)) {
        // a plain matrix: exactly llama.cpp's dequantisation of its Q8_0 blocks
        const auto q = io::to_ggml(io::GgmlType::Q8_0, t);
        CHECK(torch::equal(other, io::from_ggml(io::GgmlType::Q8_0, q.data(), t.sizes().vec())));
        ++checked;
      } else if (io::is_mixtral_tensor(name)) {
        CHECK(testing::max_rel_err(other, t) < 2e-2);
      }
    }
    if (type == io::GgmlType::Q8_0) CHECK(checked > 0);
    // The tokenizer written from the GGUF's vocabulary encodes as the original on the corpus.
    const Tokenizer orig(c.data.tokenizer), rebuilt(back.data.tokenizer);
    std::ifstream f(c.data.text_valid[0]);
    int64_t lines = 0;
    for (std::string line; std::getline(f, line) && lines < 50;)
      if (line != "%") {
        CHECK(orig.encode(line) == rebuilt.encode(line));
        ++lines;
      }
    CHECK(lines == 50);
  }
  // Without --multimodal the vision side is initialised, and the import says so; a second import into the same
  // folder is refused.
  const auto res = io::import_gguf(dir + "/m.gguf", dir + "/text-only", "");
  CHECK(res.multimodal_initialised);
  CHECK(res.other_tensors > 0);
  REQUIRE_THROWS_WITH(io::import_gguf(dir + "/m.gguf", dir + "/text-only", ""), ContainsText("already holds"));
}

TEST_CASE("llama.cpp's SPM tokeniser equals SentencePiece on a BPE model and differs on a unigram model",
          "[gguf][tokenizer]") {
  const auto dir = testing::fresh_temp_dir("gguf_spm");
  // A corpus with digits, whitespace runs, non-ASCII text and marker strings.
  const std::string corpus = dir + "/corpus.txt";
  std::vector<std::string> lines;
  {
    std::ofstream f(corpus);
    const char* words[] = {"the", "red", "coat", "naïve", "café", "boots", "42", "2026", "über", "façade", "shirt"};
    const char* syl[] = {"ka", "lo", "min", "tre", "su", "vo", "pel", "dar", "ni", "qua", "ber", "zo", "ist", "fen"};
    for (int i = 0; i < 400; ++i) {
      std::string line;
      for (int w = 0; w < 9; ++w) {
        line += std::string(words[(i * 5 + w * 7) % 11]) + (w % 4 == 3 ? "   " : " ");
        line += std::string(syl[(i + w) % 14]) + syl[(i * 3 + w * 5) % 14] + syl[(i * 7 + w) % 13] + " ";
      }
      line += std::to_string(i * 37) + (i % 9 == 0 ? " <image> <gen_image>" : "") + " end.";
      lines.push_back(line);
      f << line << "\n";
    }
  }
  for (const std::string type : {"bpe", "unigram"}) {
    TokenizerTrainOptions o;
    o.inputs = {corpus};
    o.vocab_size = 400;
    o.model_type = type;
    const auto path = train_tokenizer(o, dir + "/" + type + ".model");
    const Tokenizer sp(path);
    const auto model = io::read_spm_model(path);
    CHECK(model.model_type == (type == "bpe" ? 2 : 1));
    CHECK(model.byte_fallback);
    CHECK(static_cast<int64_t>(model.pieces.size()) == sp.vocab_size());
    CHECK(model.pieces[1].piece == "<s>");
    CHECK(model.pieces[1].type == io::SpmPieceType::Control);
    const io::LlamaSpmTokenizer llama(model);
    int64_t differ = 0;
    for (const auto& line : lines) differ += sp.encode(line) == llama.encode(line) ? 0 : 1;
    INFO(type << ": " << differ << " of " << lines.size() << " lines differ");
    if (type == "bpe") {
      CHECK(differ == 0);
    } else {
      CHECK(differ > 0);
    }
    // The model written back from what was read is the same tokenizer.
    io::write_spm_model(model, dir + "/" + type + "-copy.model");
    const Tokenizer copy(dir + "/" + type + "-copy.model");
    for (size_t i = 0; i < lines.size(); i += 7) CHECK(copy.encode(lines[i]) == sp.encode(lines[i]));
  }
  REQUIRE_THROWS_WITH(io::read_spm_model(corpus), ContainsText("is not a SentencePiece model"));
}
