// Supervised fine-tuning: the record formats, the chat template, loss masks counted by hand on a hand-made
// SentencePiece model, malformed records skipped with file:line, and packing with document masks (packed samples
// give the logits, losses and gradients of the same samples unpacked; a packed run takes the steps of the unpacked
// one). transformers' apply_chat_template is the referee of the template in tests/interop/check_tokenizer.py.
#include <filesystem>
#include <fstream>
#include <map>

#include "catch_compat.h"
#include "helpers.h"
#include "omnilite/data/chat.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/sft_batch.h"
#include "omnilite/eval/vqa.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/spm_model.h"
#include "omnilite/modules/losses.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A hand-made SentencePiece BPE model: the seven reserved pieces, 256 byte pieces, single characters and the
// merge chains of a few words, so that every id of a conversation is known by hand. Returns the .model path; `id`
// maps each piece to its id.
std::string hand_tokenizer(const std::string& dir, std::map<std::string, int64_t>& id) {
  io::SpmModel m;
  auto add = [&](const std::string& p, io::SpmPieceType t, float score) {
    id[p] = static_cast<int64_t>(m.pieces.size());
    m.pieces.push_back({p, score, t});
  };
  add("<unk>", io::SpmPieceType::Unknown, 0);
  add("<s>", io::SpmPieceType::Control, 0);
  add("</s>", io::SpmPieceType::Control, 0);
  for (const auto& p : reserved_marker_pieces()) add(p, io::SpmPieceType::Control, 0);
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    add(buf, io::SpmPieceType::Byte, 0);
  }
  const std::string sp = "\xe2\x96\x81";  // U+2581, SentencePiece's space
  float score = -1;
  auto chain = [&](const std::string& word) {  // "▁[INST]" -> "▁[", "▁[I", ..., "▁[INST]"
    for (size_t n = sp.size() + 1; n <= word.size(); ++n) {
      const std::string p = word.substr(0, n);
      if (!id.count(p)) add(p, io::SpmPieceType::Normal, score -= 1);
    }
  };
  for (const char* w : {"[INST]", "[/INST]", "hi", "yes", "no", "ok"}) chain(sp + w);
  add("hi", io::SpmPieceType::Normal, score -= 1);
  for (const std::string c : {sp, std::string("["), std::string("]"), std::string("/"), std::string("I"),
                              std::string("N"), std::string("S"), std::string("T"), std::string("h"),
                              std::string("i"), std::string("y"), std::string("e"), std::string("s"),
                              std::string("o"), std::string("k"), std::string("n")})
    add(c, io::SpmPieceType::Normal, score -= 1);
  fs::create_directories(dir);
  const std::string path = dir + "/hand.model";
  io::write_spm_model(m, path);
  return path;
}

ChatMessage msg(const std::string& role, const std::string& text) { return {role, {ChatPart{false, text, ""}}}; }

std::vector<ChatMessage> parse(const std::string& record) {
  return parse_chat_record(json::parse(record), "").messages;
}

}  // namespace

TEST_CASE("chat template: Mistral's [INST] format, the system turn folded into the first user turn") {
  const std::vector<ChatMessage> c = {msg("system", "Be brief."), msg("user", "hi"), msg("assistant", "yes"),
                                      msg("user", "ok?"), msg("assistant", "no")};
  CHECK(render_chat_text(c) == "<s>[INST] Be brief.\n\nhi [/INST] yes</s>[INST] ok? [/INST] no</s>");
  CHECK(render_chat_text({msg("user", "hi")}, /*add_generation_prompt=*/true) == "<s>[INST] hi [/INST]");
  CHECK_THROWS_WITH(render_chat_text({msg("user", "hi"), msg("assistant", "yes")}, true),
                    ContainsText("ends with a user turn"));
  // the Jinja of the exports spells the same pieces
  const auto& j = chat_template_jinja();
  for (const char* piece : {"'[INST] '", "' [/INST]'", "' ' + message['content'] + eos_token", "bos_token",
                            "'\\n\\n'"})
    CHECK(j.find(piece) != std::string::npos);
}

TEST_CASE("loss mask: a two-turn chat, an Alpaca record, a LLaVA record and a drawing turn, counted by hand") {
  std::map<std::string, int64_t> id;
  const Tokenizer tok(hand_tokenizer(testing::fresh_temp_dir("sft_hand"), id));
  const std::string sp = "\xe2\x96\x81";
  ChatLayout L;
  L.num_latents = 2;
  L.gen_tokens = 3;
  const int64_t INST = id[sp + "[INST]"], END = id[sp + "[/INST]"], NL = id["<0x0A>"];

  // <s> [INST] hi [/INST] yes</s>[INST] ok [/INST] no</s>
  auto chat = parse(R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                                     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "no"}]})");
  auto t = encode_chat(chat, tok, L);
  CHECK(t.ids == std::vector<int64_t>{1, INST, id[sp + "hi"], END, id[sp + "yes"], 2, INST, id[sp + "ok"], END,
                                      id[sp + "no"], 2});
  CHECK(t.target == std::vector<uint8_t>{0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1});  // 4 targets: yes </s> no </s>
  CHECK(t.answer_start == std::vector<int64_t>{4, 9});
  auto all = encode_chat(chat, tok, L, /*train_on_input=*/true);
  CHECK(all.ids == t.ids);
  CHECK(all.target == std::vector<uint8_t>{0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  auto prompt = encode_chat({chat[0]}, tok, L, false, /*add_generation_prompt=*/true);
  CHECK(prompt.ids == std::vector<int64_t>{1, INST, id[sp + "hi"], END});

  // Alpaca: user = instruction + "\n\n" + input ("ok" after the newlines has no space, so o k)
  auto alpaca = encode_chat(parse(R"({"instruction": "hi", "input": "ok", "output": "yes"})"), tok, L);
  CHECK(alpaca.ids == std::vector<int64_t>{1, INST, id[sp + "hi"], NL, NL, id["o"], id["k"], END, id[sp + "yes"], 2});
  CHECK(alpaca.target == std::vector<uint8_t>{0, 0, 0, 0, 0, 0, 0, 0, 1, 1});

  // LLaVA: "<image>\nhi" -> [INST] + space, the image run, then "\nhi [/INST]" (a new text: space prefix)
  auto llava = encode_chat(parse(R"({"image": "/x/a.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                     {"from": "gpt", "value": "yes"}]})"), tok, L);
  CHECK(llava.ids == std::vector<int64_t>{1, INST, id[sp], 4, 3, 3, 5, id[sp], NL, id["hi"], END, id[sp + "yes"], 2});
  CHECK(llava.target == std::vector<uint8_t>{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1});
  CHECK(llava.shown == std::vector<std::string>{"/x/a.png"});

  // A drawing turn: image_begin, image_end and </s> are targets, the generated placeholders are not.
  auto draw = encode_chat(parse(R"({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": [{"type": "image", "image": "/x/b.png"}]}]})"),
                          tok, L);
  CHECK(draw.ids == std::vector<int64_t>{1, INST, id[sp + "hi"], END, 4, 6, 6, 6, 5, 2});
  CHECK(draw.target == std::vector<uint8_t>{0, 0, 0, 0, 1, 0, 0, 0, 1, 1});
  CHECK(draw.drawn == std::vector<std::string>{"/x/b.png"});

  // "<image>" outside a LLaVA human turn is plain text
  auto plain = parse(R"({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "no"}]})");
  CHECK(encode_chat(plain, tok, L).shown.empty());
}

TEST_CASE("conversation records: malformed ones are skipped with file:line and counted") {
  const auto dir = testing::fresh_temp_dir("sft_records");
  {
    std::ofstream f(dir + "/a.jsonl");
    f << R"({"instruction": "hi", "output": "yes"})" << "\n"                                          // 1 ok
      << R"({"instruction": "hi"})" << "\n"                                                           // 2 no output
      << R"({"messages": [{"role": "assistant", "content": "yes"}]})" << "\n"                         // 3 order
      << R"({"messages": [{"role": "user", "content": "hi"}]})" << "\n"                               // 4 no answer
      << "{not json\n"                                                                                // 5
      << R"({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]})"
      << "\n"                                                                                         // 6 no image
      << R"({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})"
      << "\n"                                                                                         // 7 no <image>
      << R"({"text": "plain"})" << "\n"                                                               // 8 kind
      << "\n"                                                                                         // blank
      << R"({"type": "yes/no", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhi"},)"
      << R"( {"from": "gpt", "value": "x"}]})" << "\n";                                              // 10 ok
    std::ofstream(dir + "/b.json") << R"([{"instruction": "a", "input": "", "output": "b"}, {"messages": 3}])";
  }
  auto set = read_chat_records({dir + "/a.jsonl", dir + "/b.json"});
  REQUIRE(set.records.size() == 3);
  CHECK(set.skipped == 8);
  CHECK(set.records[0].where == dir + "/a.jsonl:1");
  CHECK(set.records[1].where == dir + "/a.jsonl:10");
  CHECK(set.records[1].type == "yes/no");
  CHECK(set.records[1].messages[0].parts[0].image == dir + "/a.png");  // relative to the file's folder
  CHECK(set.records[2].where == dir + "/b.json[0]");
  CHECK_THROWS_WITH(read_chat_records({dir + "/a.txt"}), ContainsText("expected .json or .jsonl"));
  CHECK_THROWS_WITH(read_chat_records({dir + "/none.jsonl"}), ContainsText("cannot open"));
}

TEST_CASE("segments: positions restart in each packed sample (hand-computed)") {
  auto seg = torch::tensor({1, 1, 1, 2, 2, 3, 3, 3, 3}, torch::kInt64).view({1, 9});
  CHECK(torch::equal(segment_positions(seg), torch::tensor({0, 1, 2, 0, 1, 0, 1, 2, 3}, torch::kInt64).view({1, 9})));
  auto tokens = torch::tensor({9, 9, 1, 7, 7, 1, 8}, torch::kInt64).view({1, 7});
  CHECK(torch::equal(segments_from_bos(tokens, 1), torch::tensor({0, 0, 1, 1, 1, 2, 2}, torch::kInt64).view({1, 7})));
}

TEST_CASE("packing: samples packed into one row give the logits, velocities, loss and gradients of the same samples "
          "unpacked (float64, activation checkpointing on)") {
  Config cfg = testing::load("configs/tiny.json");
  torch::manual_seed(3);
  OmniLite model(cfg.model);
  model->to(torch::kFloat64);
  model->text->checkpoint_layers = true;
  const auto& tk = cfg.model.tokens;
  const int64_t L = cfg.model.resampler.num_latents, G = 3, P = cfg.model.flow_token_dim();
  // three samples: text, a shown image, a drawn image of G latent tokens (a short run, for the test)
  std::vector<std::vector<int64_t>> s = {{1, 10, 11, 12, 2}, {1, 4}, {1, 20, 4, 6, 6, 6, 5, 2}};
  s[1].insert(s[1].end(), static_cast<size_t>(L), tk.image_id);
  for (int64_t x : {5, 30, 31, 2}) s[1].push_back(x);
  auto images = torch::randn({1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size}, torch::kFloat64);
  auto latents = torch::randn({G, P}, torch::kFloat64);
  auto times = torch::full({G}, 0.3, torch::kFloat64);
  const int64_t T = static_cast<int64_t>(s[0].size() + s[1].size() + s[2].size()) + 2;  // two pads at the end
  auto packed = torch::full({1, T}, tk.pad_id, torch::kInt64), segments = torch::full({1, T}, 3, torch::kInt64);
  auto unpacked = torch::full({3, T}, tk.pad_id, torch::kInt64);
  int64_t at = 0;
  for (int64_t r = 0; r < 3; ++r)
    for (size_t j = 0; j < s[r].size(); ++j, ++at) {
      packed[0][at] = s[r][j], segments[0][at] = r + 1;
      unpacked[r][static_cast<int64_t>(j)] = s[r][j];
    }
  auto run = [&](const torch::Tensor& tokens, const torch::Tensor& seg) {
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
    OmniInput in;
    in.tokens = tokens;
    in.segments = seg;
    in.images = images;
    in.gen_latents = latents;
    in.gen_times = times;
    auto out = model->forward(in);
    auto mask = tokens.ne(tk.pad_id).logical_and(tokens.ne(tk.image_id)).logical_and(tokens.ne(tk.gen_image_id))
                    .logical_and(tokens.ne(tk.bos_id));  // as conversations' targets: a BOS is never one
    auto loss = clm_loss(out.logits, tokens, mask) * mask.narrow(1, 1, T - 1).sum() + (out.velocity * out.velocity).sum();
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : model->parameters())
      if (p.grad().defined()) grads.push_back(p.grad().clone());
    return std::make_tuple(out, loss.detach(), grads, mask);
  };
  auto [po, pl, pg, pm] = run(packed, segments);
  auto [uo, ul, ug, um] = run(unpacked, torch::Tensor());
  // The packed row's positions of sample r are row r's first positions: the logits, and so the loss sums, match.
  CHECK(std::abs(pl.item<double>() - ul.item<double>()) < 1e-10 * std::abs(ul.item<double>()));
  at = 0;
  for (int64_t r = 0; r < 3; ++r) {
    const int64_t n = static_cast<int64_t>(s[r].size());
    CHECK(testing::max_rel_err(po.logits[0].narrow(0, at, n), uo.logits[r].narrow(0, 0, n)) < 1e-12);
    at += n;
  }
  CHECK(testing::max_rel_err(po.velocity, uo.velocity) < 1e-12);
  REQUIRE(pg.size() == ug.size());
  double worst = 0;
  for (size_t i = 0; i < pg.size(); ++i) worst = std::max(worst, testing::max_rel_err(pg[i], ug[i]));
  CHECK(worst < 1e-10);
  // Without segments the packed row's later samples see the earlier ones: the logits differ.
  auto [xo, xl, xg, xm] = run(packed, torch::Tensor());
  CHECK(testing::max_rel_err(xo.logits[0].narrow(0, static_cast<int64_t>(s[0].size()), 3), uo.logits[1].narrow(0, 0, 3)) > 1e-6);
}

TEST_CASE("SftSampler: packed rows hold each sample once, with its targets and its segment") {
  const auto dir = testing::fresh_temp_dir("sft_sampler");
  Config cfg = testing::tiny_text_config(dir);
  {
    std::ofstream f(dir + "/sft.jsonl");
    for (int i = 0; i < 7; ++i)
      f << json{{"instruction", "the coat " + std::string(static_cast<size_t>(i), 'a')}, {"output", "a red bag"}}.dump()
        << "\n";
    f << json{{"instruction", std::string(400, 'x')}, {"output", "too long"}}.dump() << "\n";
  }
  cfg.train.sft_batch_size = 2;
  cfg.train.sft_seq_len = 48;
  const Tokenizer tok(cfg.data.tokenizer);
  const auto records = read_chat_records({dir + "/sft.jsonl"});
  SftSampler packed(records, "data.sft_train", tok, cfg.model, cfg.train, 5);
  CHECK(packed.samples() == 7);
  CHECK(packed.skipped() == 1);  // longer than a row
  const auto L = chat_layout(cfg.model);
  std::vector<ChatTokens> want;
  for (int i = 0; i < 7; ++i) want.push_back(encode_chat(records.records[static_cast<size_t>(i)].messages, tok, L));
  // every row of an epoch: split at segment changes, each piece is one sample's ids and targets
  std::vector<int> seen(7, 0);
  for (int64_t m = 0; m < (packed.rows() + 1) / 2; ++m) {
    auto b = packed.get(m, /*ordered=*/true);
    REQUIRE(b.segments.defined());
    for (int64_t r = 0; r < b.tokens.size(0); ++r) {
      if (m * 2 + r >= packed.rows()) break;
      int64_t t = 0;
      while (t < 48 && b.tokens[r][t].item<int64_t>() != cfg.model.tokens.pad_id) {
        const int64_t seg = b.segments[r][t].item<int64_t>();
        std::vector<int64_t> ids;
        std::vector<uint8_t> tg;
        for (; t < 48 && b.segments[r][t].item<int64_t>() == seg && b.tokens[r][t].item<int64_t>() != 0; ++t) {
          ids.push_back(b.tokens[r][t].item<int64_t>());
          tg.push_back(b.targets[r][t].item<bool>() ? 1 : 0);
        }
        int found = -1;
        for (int i = 0; i < 7; ++i)
          if (want[static_cast<size_t>(i)].ids == ids && want[static_cast<size_t>(i)].target == tg) found = i;
        REQUIRE(found >= 0);
        ++seen[static_cast<size_t>(found)];
      }
    }
  }
  CHECK(seen == std::vector<int>(7, 1));
  cfg.train.sft_packing = false;
  SftSampler single(records, "data.sft_train", tok, cfg.model, cfg.train, 5);
  CHECK(single.rows() == 7);
  CHECK_FALSE(single.get(0).segments.defined());
}

TEST_CASE("SFT training: a packed run takes the steps of the unpacked run (checkpointing on), and only the answers "
          "are learned by default") {
  const auto dir = testing::fresh_temp_dir("sft_train");
  Config cfg = testing::tiny_text_config(dir);
  {
    std::ofstream f(dir + "/sft.jsonl");
    f << json{{"instruction", "the coat"}, {"output", "a red bag"}}.dump() << "\n"
      << json{{"messages", {{{"role", "user"}, {"content", "a blue dress and a coat"}}, {{"role", "assistant"}, {"content", "the green shirt"}}}}}.dump() << "\n"
      << json{{"instruction", "boot"}, {"input", "a bag"}, {"output", "the boot and the dress"}}.dump() << "\n";
  }
  cfg.train.batch_size = 0;
  cfg.data.sft_train = {dir + "/sft.jsonl"};
  cfg.data.text_valid = {};
  cfg.data.image_train = {};
  cfg.data.image_valid = {};
  cfg.train.steps = 3;
  cfg.train.warmup_steps = 0;
  cfg.train.log_every = 1;
  cfg.train.activation_checkpointing = true;
  cfg.train.tensorboard = false;
  cfg.train.sft_seq_len = 160;
  auto losses_of = [&](bool packing, int64_t batch, const std::string& out) {
    Config c = cfg;
    c.train.sft_packing = packing;
    c.train.sft_batch_size = batch;
    TrainRunOptions run;
    run.out_dir = dir + "/" + out;
    train(c, run);
    std::vector<double> v;
    for (const auto& m : testing::metrics_of(run.out_dir)) v.push_back(m.at("loss_sft").get<double>());
    return v;
  };
  const auto packed = losses_of(true, 1, "packed");     // one row holds all three samples
  const auto unpacked = losses_of(false, 3, "single");  // three rows
  REQUIRE(packed.size() == 3);
  REQUIRE(unpacked.size() == 3);
  for (size_t i = 0; i < 3; ++i) CHECK(std::abs(packed[i] - unpacked[i]) < 1e-5 * unpacked[i]);
  CHECK(packed[2] < packed[0]);

  // `omnilite chat`, greedy, two turns: the second turn reuses the cache of the first. Reference: greedy decoding
  // of the whole conversation's ids from scratch (no cache kept between turns).
  const std::string run = dir + "/packed";
  auto m = load_omni_checkpoint(run);
  const Tokenizer tok(cfg.data.tokenizer);
  const auto L = chat_layout(cfg.model);
  TextSampling greedy;
  greedy.temperature = 0;
  auto turn = [&](const std::string& text, bool first) {
    auto ids = encode_chat({msg("user", text)}, tok, L, false, true).ids;
    if (!first) ids.erase(ids.begin());
    return ids;
  };
  std::vector<int64_t> conv = turn("the coat", true);
  auto a1 = generate_text(*m.model, conv, 6, greedy);
  conv.insert(conv.end(), a1.begin(), a1.end());
  if (a1.back() != cfg.model.tokens.eos_id) conv.push_back(cfg.model.tokens.eos_id);
  const auto t2 = turn("a red bag", false);
  conv.insert(conv.end(), t2.begin(), t2.end());
  auto a2 = generate_text(*m.model, conv, 6, greedy);
  auto text_of = [&](std::vector<int64_t> ids) {
    if (!ids.empty() && ids.back() == cfg.model.tokens.eos_id) ids.pop_back();
    return tok.decode(ids);
  };
  const std::string cmd = "printf 'the coat\\na red bag\\n/quit\\n' | " + std::string(OMNILITE_CLI_PATH) +
                          " chat --checkpoint " + run + " --max-new-tokens 6 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof buf, p)) out += buf;
  CHECK(pclose(p) == 0);
  CHECK(out == text_of(a1) + "\n" + text_of(a2) + "\n");

  // eval vqa: the exact-match count of records whose references are the model's own greedy answers (right) or
  // another text (wrong): 2 of 3, per type
  {
    std::ofstream f(dir + "/vqa.jsonl");
    f << json{{"type", "x"}, {"messages", {{{"role", "user"}, {"content", "the coat"}}, {{"role", "assistant"}, {"content", "The " + text_of(a1) + "!"}}}}}.dump() << "\n"
      << json{{"type", "x"}, {"messages", {{{"role", "user"}, {"content", "the coat"}}, {{"role", "assistant"}, {"content", "zebra"}}}}}.dump() << "\n"
      << json{{"type", "y"}, {"instruction", "the coat"}, {"output", text_of(a1)}}.dump() << "\n";
  }
  VqaOptions vo;
  vo.data = {dir + "/vqa.jsonl"};
  vo.max_answer_tokens = 6;
  json res;
  vqa_task(*m.model, m.cfg, tok, vo, res);
  CHECK(res["vqa_questions"].get<int64_t>() == 3);
  CHECK(res["vqa_accuracy"].get<double>() == Approx(2.0 / 3.0));
  CHECK(res["vqa_by_type"]["x"]["accuracy"].get<double>() == Approx(0.5));
  CHECK(res["vqa_by_type"]["y"]["accuracy"].get<double>() == Approx(1.0));
}

TEST_CASE("normalize_answer: VQA's rule, by hand") {
  CHECK(normalize_answer("The Sneaker.") == "sneaker");
  CHECK(normalize_answer("  an   ankle boot! ") == "ankle boot");
  CHECK(normalize_answer("Yes") == normalize_answer("yes."));
  CHECK(normalize_answer("A t-shirt") == "t shirt");
  CHECK(normalize_answer("theme") == "theme");  // only whole words are articles
}
