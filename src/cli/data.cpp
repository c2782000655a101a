// omnilite data: data preparation.
//   tokenize   : .txt / .jsonl documents -> token shards (Megatron's .bin/.idx; data/token_shards.h)
//   inspect    : what token shards or image tar shards hold, as JSON (the interop checks read it)
//   webdataset : image-caption sources -> WebDataset .tar shards (data/image_shards.h)
//   sft-demo   : the fine-tuning quickstart's SFT set, built from the embedded data (Fashion-MNIST and the fortunes
//                corpus), in the formats a user brings (docs/training.md). train.jsonl: image conversations about
//                training images (LLaVA records, and the messages form with image parts), two questions each from
//                three types -- "what" (what is shown), "yes/no" (worn on the feet? is this a <class>?) and "which"
//                (a <class> or a <class>?) -- drawing turns ("Draw a sandal." -> a training image of the class) and
//                instruction records from the text corpus. valid.jsonl: one question per held-out (t10k) image,
//                asked in phrasings that training never uses, with the question type in "type" for
//                `omnilite eval --tasks vqa`.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/files.h"
#include "omnilite/cli/commands.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/image_shards.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/token_shards.h"
#include "omnilite/log.h"

namespace omnilite::cli {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

bool worn_on_feet(int64_t label) { return label == 5 || label == 7 || label == 9; }  // sandal, sneaker, ankle boot

std::string with_article(const std::string& c) { return (c[0] == 'a' ? "an " : "a ") + c; }
std::string capitalised(std::string s) {
  s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
  return s;
}

// One question about an image of class `label`, of `type`, in the training or the held-out phrasings.
std::pair<std::string, std::string> question(const std::string& type, int64_t label, bool held_out,
                                             std::mt19937_64& rng) {
  const auto& names = fashion_mnist_classes();
  const int64_t n = static_cast<int64_t>(names.size());
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  auto other = [&] { return (label + 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - 1))) % n; };
  const std::string c = names[static_cast<size_t>(label)];
  if (type == "what") {
    const auto q = held_out ? std::string("What is in this image?")
                            : pick({"What is shown in this picture?", "What is this?", "What kind of item is this?",
                                    "What does the image show?", "Name the item in the picture.",
                                    "What is pictured here?"});
    return {q, capitalised(with_article(c)) + "."};
  }
  if (type == "yes/no") {
    if (rng() % 2 == 0) {
      const auto q = held_out ? std::string("Is this item worn on the feet?")
                              : pick({"Is this worn on the feet?", "Do you wear this on your feet?",
                                      "Is the item in the picture worn on the feet?", "Is this footwear?"});
      return {q, worn_on_feet(label) ? "Yes." : "No."};
    }
    const int64_t asked = rng() % 2 == 0 ? label : other();
    const std::string a = with_article(names[static_cast<size_t>(asked)]);
    const auto q = held_out ? "Is this picture of " + a + "?"
                            : pick({"Is this " + a + "?", "Does this picture show " + a + "?",
                                    "Is the item in the image " + a + "?", "Is this an image of " + a + "?",
                                    "Is there " + a + " in the picture?", "Is it " + a + "?"});
    return {q, asked == label ? "Yes." : "No."};
  }
  // which of two named classes, the right one first or second at random
  const int64_t wrong = other();
  const bool first = rng() % 2 == 0;
  const std::string a = with_article(names[static_cast<size_t>(first ? label : wrong)]),
                    b = with_article(names[static_cast<size_t>(first ? wrong : label)]);
  const auto q = held_out ? "Is it " + a + " or " + b + "?"
                          : pick({"Is this " + a + " or " + b + "?", "Which one is this: " + a + " or " + b + "?",
                                  "Is the picture showing " + a + " or " + b + "?", "Which is shown, " + a + " or " + b +
                                  "?"});
  return {q, capitalised(with_article(c)) + "."};
}

// images [N, S, S, 3] uint8 -> files DIR/NNNNN.EXT (relative paths returned)
std::vector<std::string> write_images(const torch::Tensor& images, int64_t count, const std::string& root,
                                      const std::string& sub) {
  fs::create_directories(root + "/" + sub);
  std::vector<std::string> paths;
  for (int64_t i = 0; i < count; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "/%05lld", static_cast<long long>(i));
    const std::string rel = sub + name + picture_extension();
    if (!fs::exists(root + "/" + rel)) write_image_file(images[i], root + "/" + rel);
    paths.push_back(rel);
  }
  return paths;
}

void write_jsonl(const std::vector<json>& records, const std::string& path) {
  AtomicFile f(path);
  for (const auto& r : records) f.write(r.dump() + "\n");
  f.commit();
}

int sft_demo(const cxxopts::ParseResult& args) {
  const std::string images = args["images"].as<std::string>();
  const std::string out = args.count("out") ? args["out"].as<std::string>() : "data/generated/sft";
  const int64_t n_train = args["train-images"].as<int64_t>(), n_valid = args["valid-images"].as<int64_t>();
  const double draw_share = args["draw-share"].as<double>(), text_share = args["text-share"].as<double>();
  if (n_train < 1 || n_valid < 1) throw std::runtime_error("--train-images and --valid-images must be >= 1");
  if (!(draw_share >= 0 && text_share >= 0 && draw_share + text_share < 1))
    throw std::runtime_error("--draw-share and --text-share must be >= 0 with a sum below 1");
  std::mt19937_64 rng(args["seed"].as<uint64_t>());
  ImageLoadOptions io;
  io.size = 28;
  io.max_images = n_train;
  const auto train = read_image_captions({images + "/train"}, io);
  io.max_images = n_valid;
  const auto valid = read_image_captions({images + "/t10k"}, io);
  fs::create_directories(out);
  const auto train_paths = write_images(train.images, train.size(), out, "images/train");
  const auto valid_paths = write_images(valid.images, valid.size(), out, "images/valid");
  const std::vector<std::string> types = {"what", "yes/no", "which"};
  const auto& names = fashion_mnist_classes();

  std::vector<json> recs;
  for (int64_t i = 0; i < train.size(); ++i) {
    const int64_t label = train.labels[i].item<int64_t>();
    const auto t1 = types[rng() % 3], t2 = types[rng() % 3];
    const auto [q1, a1] = question(t1, label, false, rng);
    const auto [q2, a2] = question(t2, label, false, rng);
    const std::string& img = train_paths[static_cast<size_t>(i)];
    if (rng() % 3 == 0) {  // the messages form with an image part
      recs.push_back({{"messages", {{{"role", "user"}, {"content", {{{"type", "image"}, {"image", img}},
                                                                   {{"type", "text"}, {"text", "\n" + q1}}}}},
                                   {{"role", "assistant"}, {"content", a1}},
                                   {{"role", "user"}, {"content", q2}},
                                   {{"role", "assistant"}, {"content", a2}}}}});
    } else {
      recs.push_back({{"image", img}, {"conversations", {{{"from", "human"}, {"value", "<image>\n" + q1}},
                                                         {{"from", "gpt"}, {"value", a1}},
                                                         {{"from", "human"}, {"value", q2}},
                                                         {{"from", "gpt"}, {"value", a2}}}}});
    }
  }
  // drawing turns: "Draw a sandal." -> a training image of that class
  const int64_t n_vqa = static_cast<int64_t>(recs.size());
  const auto n_draw = static_cast<int64_t>(static_cast<double>(n_vqa) * draw_share / (1 - draw_share - text_share));
  const auto n_text = static_cast<int64_t>(static_cast<double>(n_vqa) * text_share / (1 - draw_share - text_share));
  for (int64_t k = 0; k < n_draw; ++k) {
    const int64_t i = static_cast<int64_t>(rng() % static_cast<uint64_t>(train.size()));
    const std::string c = names[static_cast<size_t>(train.labels[i].item<int64_t>())];
    const std::vector<std::string> asks = {"Draw " + with_article(c) + ".", "Make a picture of " + with_article(c) + "."};
    recs.push_back({{"messages", {{{"role", "user"}, {"content", asks[rng() % 2]}},
                                 {{"role", "assistant"},
                                  {"content", {{{"type", "image"}, {"image", train_paths[static_cast<size_t>(i)]}}}}}}}});
  }
  // instruction records from the text corpus: continue a fortune from its first line
  const auto docs = read_documents({args["text"].as<std::string>()}).documents;
  int64_t added = 0;
  for (size_t d = 0; d < docs.size() && added < n_text; ++d) {
    const auto& doc = docs[(d * 7919) % docs.size()];
    const size_t nl = doc.find('\n');
    if (nl == std::string::npos || doc.size() > 300) continue;
    recs.push_back({{"instruction", "Continue the text."}, {"input", doc.substr(0, nl)}, {"output", doc.substr(nl + 1)}});
    ++added;
  }
  std::shuffle(recs.begin(), recs.end(), rng);
  write_jsonl(recs, out + "/train.jsonl");

  std::vector<json> held;
  for (int64_t i = 0; i < valid.size(); ++i) {
    const int64_t label = valid.labels[i].item<int64_t>();
    for (const auto& t : types) {
      const auto [q, a] = question(t, label, true, rng);
      held.push_back({{"image", valid_paths[static_cast<size_t>(i)]}, {"type", t},
                      {"conversations", {{{"from", "human"}, {"value", "<image>\n" + q}}, {{"from", "gpt"}, {"value", a}}}}});
    }
  }
  write_jsonl(held, out + "/valid.jsonl");
  std::cout << "wrote " << out << "/train.jsonl (" << n_vqa << " image conversations, " << n_draw << " drawing turns, "
            << added << " instruction records) and " << out << "/valid.jsonl (" << held.size()
            << " held-out questions on " << valid.size() << " test images)\n";
  return 0;
}

// The ids documents are framed with: the tokenizer's <s> and </s> (SentencePiece's 1 and 2 when it lacks them).
std::pair<int64_t, int64_t> framing_ids(const Tokenizer& tok) {
  const int64_t bos = tok.piece_id("<s>"), eos = tok.piece_id("</s>");
  return {bos >= 0 ? bos : 1, eos >= 0 ? eos : 2};
}

// omnilite data tokenize: documents -> token shards (token_shards.h), with a progress line.
int tokenize(const cxxopts::ParseResult& args) {
  if (!args.count("input") || !args.count("out"))
    throw std::runtime_error("data tokenize: needs --input FILE (repeatable) and --out DIR; hint: omnilite data "
                             "tokenize --input corpus.jsonl --out data/shards");
  TokenizeOptions o;
  o.inputs = args["input"].as<std::vector<std::string>>();
  o.out_dir = args["out"].as<std::string>();
  o.threads = args["workers"].as<int64_t>();
  if (o.threads <= 0) o.threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  o.shard_tokens = args["shard-tokens"].as<int64_t>();
  const Tokenizer tok(args["tokenizer"].as<std::string>());
  std::tie(o.bos_id, o.eos_id) = framing_ids(tok);
  log::info(log::format("data tokenize: %zu files -> %s, %lld workers, BOS %lld, EOS %lld", o.inputs.size(),
                        o.out_dir.c_str(), static_cast<long long>(o.threads), static_cast<long long>(o.bos_id),
                        static_cast<long long>(o.eos_id)));
  const auto r = tokenize_to_shards(o, tok, [](const TokenizeResult& p, double total) {
    const double mb_s = p.bytes / 1e6 / std::max(1e-9, p.seconds);
    log::info(log::format("tokenize: %.2f of %.2f GB (%.0f%%) | %.1f MB/s | %lld documents, %lld tokens | ETA %.0fs",
                          p.bytes / 1e9, total / 1e9, 100.0 * p.bytes / std::max(1.0, total), mb_s,
                          static_cast<long long>(p.documents), static_cast<long long>(p.tokens),
                          std::max(0.0, total - p.bytes) / 1e6 / std::max(1e-9, mb_s)));
  });
  std::cout << "wrote " << r.shards << " shards to " << o.out_dir << ": " << r.documents << " documents, " << r.tokens
            << " tokens (" << log::format("%.1f MB/s", r.bytes / 1e6 / std::max(1e-9, r.seconds)) << ")"
            << (r.skipped ? ", " + std::to_string(r.skipped) + " malformed lines skipped" : std::string()) << "\n";
  return 0;
}

// --FLAG OFFSET:COUNT (COUNT 1 when left out) within [0, total): the range, or an error naming the flag and value.
std::pair<int64_t, int64_t> parse_range(const cxxopts::ParseResult& args, const std::string& flag, int64_t total,
                                        const std::string& what) {
  const std::string spec = args[flag].as<std::string>();
  const auto colon = spec.find(':');
  int64_t offset = -1, count = -1;
  try {
    offset = std::stoll(spec.substr(0, colon));
    count = colon == std::string::npos ? 1 : std::stoll(spec.substr(colon + 1));
  } catch (const std::exception&) {
  }
  if (offset < 0 || count < 0 || offset + count > total)
    throw std::runtime_error("data inspect: --" + flag + " \"" + spec + "\": expected OFFSET:COUNT within the " +
                             std::to_string(total) + " " + what);
  return {offset, count};
}

// omnilite data inspect: what token shards (a folder, .idx or prefix) or image-caption tar shards hold, as one JSON
// line; --tokens OFFSET:COUNT adds the token ids, --samples OFFSET:COUNT the samples (captions, label, decoded size
// and mean pixel value).
int inspect(const cxxopts::ParseResult& args) {
  if (!args.count("input"))
    throw std::runtime_error("data inspect: needs --input SHARDS (token shards: a folder, .idx or prefix; or image "
                             "shards: a .tar or a folder of them; repeatable)");
  const auto inputs = args["input"].as<std::vector<std::string>>();
  json out;
  if (is_image_shard_source(inputs.front())) {
    std::vector<std::vector<std::string>> captions;
    std::vector<int64_t> labels;
    const int64_t size = args["size"].as<int64_t>();
    const ImageShards shards(inputs, size, 0, captions, labels);
    out = {{"shards", shards.shards()}, {"samples", shards.size()}, {"skipped", shards.skipped()},
           {"fingerprint", shards.fingerprint()}};
    if (args.count("samples")) {
      const auto [offset, count] = parse_range(args, "samples", shards.size(), "samples");
      std::vector<int64_t> idx(static_cast<size_t>(count));
      std::iota(idx.begin(), idx.end(), offset);
      int64_t replaced = 0;
      const auto images = shards.gather(idx, &replaced);  // [count, size, size, 3]
      json samples = json::array();
      for (int64_t i = 0; i < count; ++i)
        samples.push_back({{"captions", captions[static_cast<size_t>(offset + i)]},
                           {"label", labels[static_cast<size_t>(offset + i)]},
                           {"mean", images[i].to(torch::kFloat64).mean().item<double>()}});
      out["sample_list"] = samples;
      out["replaced"] = replaced;
    }
  } else {
    const Tokenizer tok(args["tokenizer"].as<std::string>());
    const auto [bos, eos] = framing_ids(tok);
    const TokenShards shards(inputs, "--input", tok, bos, eos);
    out = {{"shards", shards.shards()}, {"bad_shards", shards.bad_shards()}, {"documents", shards.documents()},
           {"tokens", shards.tokens()}, {"fingerprint", shards.fingerprint()}};
    if (args.count("tokens")) {
      const auto [offset, count] = parse_range(args, "tokens", shards.tokens(), "tokens of the stream");
      std::vector<int64_t> ids(static_cast<size_t>(count));
      shards.read(offset, count, ids.data());
      out["ids"] = ids;
    }
  }
  std::cout << out.dump() << "\n";
  return 0;
}

// omnilite data webdataset: image-caption sources -> WebDataset tar shards (image_shards.h), with a progress line.
int webdataset(const cxxopts::ParseResult& args) {
  if (!args.count("input") || !args.count("out"))
    throw std::runtime_error("data webdataset: needs --input SOURCE (an image-caption source as data.image_train "
                             "takes; repeatable) and --out DIR");
  ImageLoadOptions io;
  io.size = args["size"].as<int64_t>();
  if (io.size < 1 || io.size > 4096)
    throw std::runtime_error("data webdataset: --size " + std::to_string(io.size) + " is outside 1 .. 4096");
  const auto set = read_image_captions(args["input"].as<std::vector<std::string>>(), io);
  if (set.size() == 0) throw std::runtime_error("data webdataset: the --input sources hold no usable image");
  ImageShardWriteOptions o;
  o.out_dir = args["out"].as<std::string>();
  o.shard_samples = args["shard-samples"].as<int64_t>();
  o.repeat = args["repeat"].as<int64_t>();
  const auto t0 = std::chrono::steady_clock::now();
  const auto paths = write_image_shards(set, o);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  log::info(log::format("data webdataset: %lld samples in %zu shards in %s (%.1f s, %.0f samples/s)",
                        static_cast<long long>(set.size() * o.repeat), paths.size(), o.out_dir.c_str(), s,
                        static_cast<double>(set.size() * o.repeat) / std::max(s, 1e-9)));
  return 0;
}

}  // namespace

int run_data(int argc, char** argv) {
  cxxopts::Options opts(argv[0],
                        "Data preparation. ACTION tokenize streams .txt / .jsonl documents into token shards "
                        "(Megatron's .bin/.idx, memory-mapped by training; --workers threads, memory independent of "
                        "the corpus size): list the folder in data.text_train (docs/training.md, \"Token shards\"). "
                        "ACTION inspect prints what token shards hold (shards, documents, tokens; --tokens "
                        "OFFSET:COUNT their ids) or image tar shards hold (samples; --samples OFFSET:COUNT their "
                        "captions, labels and mean pixel values) as JSON. ACTION webdataset writes image-caption "
                        "sources as WebDataset .tar shards (KEY.png, KEY.txt, KEY.json, KEY.cls), streamed by training "
                        "when the folder is listed in data.image_train. ACTION sft-demo writes the fine-tuning "
                        "quickstart's SFT set from the embedded data: image conversations about Fashion-MNIST "
                        "training images (LLaVA records and the messages form; questions of type what, yes/no and "
                        "which), drawing turns and instruction records from the text corpus into OUT/train.jsonl, "
                        "and one question per held-out test image, in phrasings training never uses, into "
                        "OUT/valid.jsonl (docs/training.md).");
  opts.positional_help("ACTION");
  opts.add_options()("action", "tokenize | inspect | webdataset | sft-demo", cxxopts::value<std::string>())(
      "input", "tokenize: a .txt / .jsonl document file (repeatable), read as training reads it; inspect: a shard "
      "folder, .idx or prefix, or image .tar shards or their folder (repeatable); webdataset: an image-caption source "
      "(repeatable)", cxxopts::value<std::vector<std::string>>())(
      "tokens", "inspect (token shards): OFFSET:COUNT, the ids of the stream there", cxxopts::value<std::string>())(
      "samples", "inspect (image shards): OFFSET:COUNT, those samples' captions, label and mean pixel value",
      cxxopts::value<std::string>())(
      "tokenizer", "tokenize, inspect: the SentencePiece model (the run's data.tokenizer)",
      cxxopts::value<std::string>()->default_value("data/generated/tokenizer.model"))(
      "workers", "tokenize: tokenizing threads (0 = one per core)", cxxopts::value<int64_t>()->default_value("0"))(
      "shard-tokens", "tokenize: tokens per shard before the next one starts",
      cxxopts::value<int64_t>()->default_value("268435456"))(
      "size", "webdataset: side the images are resized to before they are written; inspect: before the mean",
      cxxopts::value<int64_t>()->default_value("28"))(
      "shard-samples", "webdataset: samples per .tar shard", cxxopts::value<int64_t>()->default_value("10000"))(
      "repeat", "webdataset: write the sources this many times over (distinct keys)",
      cxxopts::value<int64_t>()->default_value("1"))(
      "images", "sft-demo: the Fashion-MNIST folder (train-* and t10k-* IDX files)",
      cxxopts::value<std::string>()->default_value("data/generated/fashion-mnist"))(
      "text", "sft-demo: the text corpus of the instruction records",
      cxxopts::value<std::string>()->default_value("data/generated/text/train.txt"))(
      "out", "output folder (tokenize, webdataset: required; sft-demo: default data/generated/sft)", cxxopts::value<std::string>())(
      "train-images", "sft-demo: training images with a conversation each", cxxopts::value<int64_t>()->default_value("6000"))(
      "valid-images", "sft-demo: held-out images, three questions each", cxxopts::value<int64_t>()->default_value("300"))(
      "draw-share", "sft-demo: share of drawing records", cxxopts::value<double>()->default_value("0.15"))(
      "text-share", "sft-demo: share of instruction records", cxxopts::value<double>()->default_value("0.1"))(
      "seed", "sft-demo: seed of the questions and the order", cxxopts::value<uint64_t>()->default_value("1"))(
      "h,help", "show this help");
  opts.parse_positional({"action"});
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("action")) {
    std::cout << opts.help() << "\nExamples:\n  omnilite data tokenize --input corpus.jsonl --out data/shards/corpus\n"
                 "  omnilite data inspect --input data/shards/corpus --tokens 0:16\n"
                 "  omnilite data webdataset --input data/generated/fashion-mnist/train --out data/shards/images\n"
                 "  omnilite data sft-demo --out data/generated/sft\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string action = args["action"].as<std::string>();
  if (action == "tokenize") return tokenize(args);
  if (action == "inspect") return inspect(args);
  if (action == "webdataset") return webdataset(args);
  if (action == "sft-demo") return sft_demo(args);
  throw std::runtime_error("data: unknown action \"" + action + "\"; expected tokenize, inspect, webdataset or "
                           "sft-demo");
}

}  // namespace omnilite::cli
