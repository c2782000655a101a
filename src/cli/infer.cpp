// omnilite generate / score / caption: inference from a checkpoint (KV-cached sampling; per-token log-probabilities).
// Text prompts are encoded with the checkpoint's tokenizer (data.tokenizer) and preceded by bos, as every training
// document is (bos, text, eos: the Llama and Mistral convention), so a prompt reads as the start of a document and
// the Hugging Face export's tokenizer (add_bos_token) gives the same ids.
#include <cmath>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/data/chat.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/runtime.h"
#include "omnilite/log.h"

namespace omnilite::cli {

void add_checkpoint_flags(cxxopts::Options& opts, const std::string& accepts) {
  opts.add_options()("checkpoint", accepts, cxxopts::value<std::string>())(
      "device", "cpu, cuda or cuda:N (default: the checkpoint's runtime.device)", cxxopts::value<std::string>())(
      "adapter", "a QLoRA run folder: its adapters over --checkpoint as the base (omit --checkpoint for the run's "
      "train.base_checkpoint), unmerged, on NF4 bases as they trained", cxxopts::value<std::string>())(
      "nf4-activations", "decoding with --adapter's NF4 bases on the CPU: fp32 (exact) or int16 (inputs rounded to "
      "16 bits per 64 values: faster, ~3e-5 relative error; overrides runtime.nf4_activations)",
      cxxopts::value<std::string>())(
      "h,help", "show this help");
  add_thread_flags(opts);
}

void add_thread_flags(cxxopts::Options& opts) {
  opts.add_options()("threads", "LibTorch intra-op threads, 0 = all cores (overrides runtime.threads)",
                     cxxopts::value<int64_t>())(
      "blas-threads", "OpenBLAS threads, 0 = all cores (overrides runtime.blas_threads)", cxxopts::value<int64_t>());
}

void apply_thread_flags(const cxxopts::ParseResult& args, RuntimeOptions& rt) {
  if (args.count("threads")) rt.threads = args["threads"].as<int64_t>();
  if (args.count("blas-threads")) rt.blas_threads = args["blas-threads"].as<int64_t>();
}

namespace {

std::vector<int64_t> encode_prompt(const Tokenizer& tok, const Config& cfg, const std::string& text,
                                   const std::string& flag) {
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw std::runtime_error(flag + " is empty; hint: give some text, e.g. " + flag + " \"Once upon a time\"");
  std::vector<int64_t> ids{cfg.model.tokens.bos_id};  // as Llama and Mistral prompts (and training documents) begin
  const auto body = tok.encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  return ids;
}

// The checkpoint of --checkpoint on --device (or the checkpoint's own device).
LoadedModel load_from_args(const cxxopts::ParseResult& args) {
  std::optional<quant::Nf4Activations> act;  // checked before the (long) load
  if (args.count("nf4-activations")) {
    try {
      act = quant::parse_nf4_activations(args["nf4-activations"].as<std::string>());
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("--nf4-activations: ") + e.what());
    }
  }
  auto m = load_omni_checkpoint(args.count("checkpoint") ? args["checkpoint"].as<std::string>() : "",
                                args.count("device") ? args["device"].as<std::string>() : "",
                                args.count("adapter") ? args["adapter"].as<std::string>() : "");
  apply_thread_flags(args, m.cfg.runtime);
  if (act) {
    m.cfg.runtime.nf4_activations = args["nf4-activations"].as<std::string>();
    set_nf4_activations(*m.model, *act);
  }
  apply_runtime(m.cfg.runtime);  // the checkpoint's threads (or the flags') and seed, once for the process
  return m;
}

// [N, C, S, S] model images of image files (each centre-cropped to a square).
torch::Tensor model_images(const std::vector<std::string>& files, const ModelConfig& mc) {
  std::vector<torch::Tensor> out;
  for (const auto& f : files) {
    auto pixels = decode_image_file(f);  // [H, W, 3] uint8; throws naming the file
    const int64_t H = pixels.size(0), W = pixels.size(1), side = std::min(H, W);
    pixels = pixels.narrow(0, (H - side) / 2, side).narrow(1, (W - side) / 2, side).contiguous();
    out.push_back(to_model_images(pixels.unsqueeze(0), mc.vision.image_size, mc.vision.in_channels));
  }
  return torch::cat(out, 0);
}

// --temperature, --top-k, --top-p and --seed, checked.
TextSampling sampling_from_args(const cxxopts::ParseResult& args) {
  TextSampling s;
  s.temperature = args["temperature"].as<double>();
  s.top_k = args["top-k"].as<int64_t>();
  s.top_p = args["top-p"].as<double>();
  s.seed = args["seed"].as<uint64_t>();
  if (s.temperature < 0) throw std::runtime_error("--temperature must be >= 0, got " + std::to_string(s.temperature));
  if (s.top_k < 0) throw std::runtime_error("--top-k must be >= 0, got " + std::to_string(s.top_k));
  if (!(s.top_p > 0 && s.top_p <= 1)) throw std::runtime_error("--top-p must be in (0, 1], got " + std::to_string(s.top_p));
  return s;
}

std::vector<int64_t> parse_ids(const std::string& list) {
  std::vector<int64_t> ids;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw std::runtime_error("--tokens \"" + list + "\": \"" + item + "\" is not an integer id; expected e.g. 2,15,7");
    }
  }
  return ids;
}

}  // namespace

int run_generate(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Continue a text prompt with a checkpoint and stream the text to stdout. Decoding "
                                 "keeps a KV cache of the 8 key/value heads, so each new token costs one position.");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint, init or export folder");
  opts.add_options()("prompt", "text to continue", cxxopts::value<std::string>())(
      "max-new-tokens", "most tokens to generate (stops earlier at eos)", cxxopts::value<int64_t>()->default_value("64"))(
      "temperature", "sampling temperature; 0 = greedy", cxxopts::value<double>()->default_value("0.8"))(
      "top-k", "sample among the k most probable tokens (0 = all)", cxxopts::value<int64_t>()->default_value("0"))(
      "top-p", "sample among the most probable tokens whose mass reaches p (1 = all)", cxxopts::value<double>()->default_value("1.0"))(
      "seed", "sampling seed: the same seed gives the same text", cxxopts::value<uint64_t>()->default_value("0"))(
      "json", "print {\"prompt_tokens\": [...], \"tokens\": [...] (eos included when drawn), \"text\": ...} at the end "
              "instead of streaming");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter")) || !args.count("prompt")) {
    std::cout << opts.help() << "\nExample:\n  omnilite generate --checkpoint runs/quickstart --prompt \"The meaning of "
                 "life\" --max-new-tokens 40 --temperature 0.7 --top-p 0.9 --seed 1\n";
    return args.count("help") ? 0 : 2;
  }
  const TextSampling s = sampling_from_args(args);
  const int64_t max_new = args["max-new-tokens"].as<int64_t>();
  if (max_new < 1) throw std::runtime_error("--max-new-tokens must be >= 1, got " + std::to_string(max_new));
  auto m = load_from_args(args);
  Tokenizer tok(m.cfg.data.tokenizer);
  tok.check_compatible(m.cfg.model);
  const auto prompt = encode_prompt(tok, m.cfg, args["prompt"].as<std::string>(), "--prompt");
  std::vector<int64_t> generated;
  std::string shown;
  const int64_t eos = m.cfg.model.tokens.eos_id;
  const bool as_json = args.count("json") > 0;
  std::vector<int64_t> drawn;
  generate_text(*m.model, prompt, max_new, s, [&](int64_t id) {
    drawn.push_back(id);
    if (id == eos) return;
    generated.push_back(id);
    if (as_json) return;
    // Decode everything so far and print what is new (pieces join with spaces and bytes only as a whole).
    const std::string text = tok.decode(generated);
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      std::cout << text.substr(shown.size()) << std::flush;
      shown = text;
    }
  });
  if (as_json) {
    std::cout << nlohmann::json({{"prompt_tokens", prompt}, {"tokens", drawn}, {"text", tok.decode(generated)}}).dump()
              << "\n";
    return 0;
  }
  std::cout << "\n";
  return 0;
}

namespace {

// score --lines FILE: every non-empty line as a prompt of its own; one JSON object or one summary line per line.
int score_lines(LoadedModel& m, const std::string& path, bool as_json) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("--lines \"" + path + "\" cannot be opened");
  Tokenizer tok(m.cfg.data.tokenizer);
  std::string line;
  size_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto ids = encode_prompt(tok, m.cfg, line, "--lines line " + std::to_string(lineno));
    const auto lp = score_tokens(*m.model, ids);
    if (as_json) {
      std::cout << nlohmann::json({{"line", lineno}, {"tokens", ids}, {"logprobs", lp}}).dump() << "\n";
      continue;
    }
    double sum = 0;
    for (double v : lp) sum += v;
    std::cout << lineno << "\t" << ids.size() << " tokens\tlog-probability " << sum << "\n";
  }
  return 0;
}

}  // namespace

int run_score(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Per-token log-probabilities of a text or of token ids under a checkpoint: "
                                 "logprobs[i] = log p(tokens[i+1] | tokens[0..i]).");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint, init or export folder");
  opts.add_options()(
      "text", "text to score (encoded with the checkpoint's tokenizer, preceded by bos)", cxxopts::value<std::string>())(
      "tokens", "comma-separated token ids to score as they are, e.g. 2,15,7", cxxopts::value<std::string>())(
      "lines", "text file: each non-empty line scored as a --text of its own (one result per line)",
      cxxopts::value<std::string>())(
      "json", "print {\"tokens\": [...], \"logprobs\": [...]} (one object per line with --lines)");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter")) ||
      args.count("text") + args.count("tokens") + args.count("lines") != 1) {
    std::cout << opts.help() << "\nGive exactly one of --text, --tokens or --lines. Example:\n"
                 "  omnilite score --checkpoint runs/quickstart --text \"a photo of a sandal.\" --json\n";
    return args.count("help") ? 0 : 2;
  }
  auto m = load_from_args(args);
  if (args.count("lines")) return score_lines(m, args["lines"].as<std::string>(), args.count("json") > 0);
  std::vector<int64_t> ids;
  std::unique_ptr<Tokenizer> tok;
  if (args.count("text")) {
    tok = std::make_unique<Tokenizer>(m.cfg.data.tokenizer);
    ids = encode_prompt(*tok, m.cfg, args["text"].as<std::string>(), "--text");
  } else {
    ids = parse_ids(args["tokens"].as<std::string>());
  }
  const auto lp = score_tokens(*m.model, ids);
  if (args.count("json")) {
    std::cout << nlohmann::json({{"tokens", ids}, {"logprobs", lp}}).dump() << "\n";
    return 0;
  }
  double sum = 0;
  for (size_t i = 0; i < lp.size(); ++i) {
    sum += lp[i];
    std::cout << ids[i + 1] << "\t" << (tok ? tok->decode({ids[i + 1]}) : "") << "\t" << lp[i] << "\n";
  }
  std::cout << "total log-probability " << sum << " over " << lp.size() << " tokens, perplexity "
            << std::exp(-sum / static_cast<double>(lp.size())) << "\n";
  return 0;
}

int run_caption(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Describe an image: the ViT and the resampler turn it into 64 tokens of the text "
                                 "space, then the model continues [bos, image_begin, image..., image_end] greedily "
                                 "(KV-cached) until eos.");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint or export folder");
  opts.add_options()("image", "image file: PNG, JPEG, ... as OpenCV reads it, or PGM/PPM (also without OpenCV)",
                                                    cxxopts::value<std::string>())(
      "max-new-tokens", "longest caption", cxxopts::value<int64_t>()->default_value("32"));
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter")) || !args.count("image")) {
    std::cout << opts.help() << "\nExample:\n  omnilite caption --checkpoint runs/quickstart --image shoe.png\n";
    return args.count("help") ? 0 : 2;
  }
  const int64_t max_new = args["max-new-tokens"].as<int64_t>();
  if (max_new < 1) throw std::runtime_error("--max-new-tokens must be >= 1, got " + std::to_string(max_new));
  decode_image_file(args["image"].as<std::string>());  // refuse a bad file before loading the model, naming it
  auto m = load_from_args(args);
  Tokenizer tok(m.cfg.data.tokenizer);
  const auto& mc = m.cfg.model;
  auto images = model_images({args["image"].as<std::string>()}, mc);
  auto row = caption_row({}, mc.resampler.num_latents, mc.tokens);
  row.pop_back();  // without eos: the caption follows
  auto gen = greedy_generate(*m.model, torch::tensor(row, torch::kInt64).view({1, -1}), images, max_new);
  std::cout << tok.decode(ids_before_eos(gen[0], mc.tokens)) << "\n";
  return 0;
}

int run_embed(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Image features: the vision encoder's output tokens ([N, P, width], P patches, plus the "
                                 "class token with model.vision.class_token) and the resampler's image tokens ([N, "
                                 "num_latents, hidden]) of each image, written as one safetensors file (tensors "
                                 "\"vision\" and \"image_tokens\", fp32).");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint, init or export folder");
  opts.add_options()("image", "image file (repeatable): PNG, JPEG, ... as OpenCV reads it, or PGM/PPM; centre-cropped "
                              "and resized to model.vision.image_size", cxxopts::value<std::vector<std::string>>())(
      "out", ".safetensors file to write (atomically)", cxxopts::value<std::string>());
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter")) || !args.count("image") ||
      !args.count("out")) {
    std::cout << opts.help() << "\nExample:\n  omnilite embed --checkpoint runs/llava-init --image a.png --image b.png "
                 "--out features.safetensors\n";
    return args.count("help") ? 0 : 2;
  }
  const auto files = args["image"].as<std::vector<std::string>>();
  for (const auto& f : files) decode_image_file(f);  // refuse a bad file before loading the model, naming it
  auto m = load_from_args(args);
  torch::NoGradGuard ng;
  m.model->eval();
  auto images = model_images(files, m.cfg.model).to(m.model->vision->patch_embed->proj->weight.device());
  auto vision = m.model->vision->forward(images);
  auto tokens = m.model->resampler->forward(vision);
  const std::string out = args["out"].as<std::string>();
  io::save_safetensors(out, {{"vision", vision.to(torch::kCPU, torch::kFloat32).contiguous()},
                             {"image_tokens", tokens.to(torch::kCPU, torch::kFloat32).contiguous()}});
  log::info("embed: " + out + ": vision " + c10::str(vision.sizes()) + ", image_tokens " + c10::str(tokens.sizes()));
  return 0;
}

int run_imagine(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Generate an image from a text prompt: rectified flow from noise (t = 0) to data "
                                 "(t = 1) with Euler steps, classifier-free guidance v = v_uncond + W (v_cond - "
                                 "v_uncond), the prompt's KV cache reused at every step, decoded by the VQ-VAE and "
                                 "written as a PNG (or PPM for a .ppm path).");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint or export folder");
  opts.add_options()("prompt", "what to draw, e.g. \"a photo of a sneaker.\"",
                                                    cxxopts::value<std::string>())(
      "out", "picture to write (atomically): .png (OpenCV builds) or .ppm", cxxopts::value<std::string>())(
      "steps", "Euler steps", cxxopts::value<int64_t>()->default_value("25"))(
      "cfg", "guidance weight W (1 = no guidance)", cxxopts::value<double>()->default_value("3.0"))(
      "seed", "noise seed: the same seed gives the same image", cxxopts::value<uint64_t>()->default_value("0"));
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter")) || !args.count("prompt") || !args.count("out")) {
    std::cout << opts.help() << "\nExample:\n  omnilite imagine --checkpoint runs/quickstart --prompt \"a photo of a "
                 "sneaker.\" --out sneaker.png --steps 25 --cfg 3 --seed 1\n";
    return args.count("help") ? 0 : 2;
  }
  SampleOptions so;
  so.steps = args["steps"].as<int64_t>();
  so.cfg_scale = args["cfg"].as<double>();
  so.seed = args["seed"].as<uint64_t>();
  if (so.steps < 1) throw std::runtime_error("--steps must be >= 1, got " + std::to_string(so.steps));
  const std::string out = args["out"].as<std::string>(), text = args["prompt"].as<std::string>();
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw std::runtime_error("--prompt is empty; hint: e.g. --prompt \"a photo of a sneaker.\"");
  auto m = load_from_args(args);
  Tokenizer tok(m.cfg.data.tokenizer);
  const auto prompt = tok.encode(text);
  const int64_t limit = m.cfg.model.text.max_position_embeddings;
  if (static_cast<int64_t>(prompt.size()) + generated_tokens_per_image(m.cfg.model) + 4 > limit)
    throw std::runtime_error("--prompt has " + std::to_string(prompt.size()) + " tokens; with the image it exceeds "
                             "model.text.max_position_embeddings = " + std::to_string(limit) + "; hint: shorten it");
  torch::NoGradGuard ng;
  auto image = m.model->vqvae->decode_normalized(imagine_latents(*m.model, prompt, so)).clamp(-1, 1).cpu();
  write_image_grid(image, 1, out);
  std::cout << "wrote " << out << " (" << image.size(3) << "x" << image.size(2) << ")\n";
  return 0;
}

}  // namespace omnilite::cli

namespace omnilite::cli {

int run_chat(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Hold a conversation in the terminal under the chat template (docs/inference.md): "
                                 "each answer streams to stdout, and the KV cache keeps the conversation, so a turn "
                                 "costs only its own tokens. Commands: /image FILE attaches an image to your next "
                                 "message, /draw PROMPT writes a PNG of what the model draws, /reset starts over, "
                                 "/quit (or end of input) ends.");
  add_checkpoint_flags(opts, "run folder (newest checkpoint), checkpoint, init or export folder");
  opts.add_options()("image", "an image file shown with the first message", cxxopts::value<std::string>())(
      "system", "a system message (folded into the first user turn)", cxxopts::value<std::string>())(
      "max-new-tokens", "longest answer", cxxopts::value<int64_t>()->default_value("128"))(
      "temperature", "sampling temperature; 0 = greedy", cxxopts::value<double>()->default_value("0"))(
      "top-k", "sample among the k most probable tokens (0 = all)", cxxopts::value<int64_t>()->default_value("0"))(
      "top-p", "sample among the most probable tokens whose mass reaches p (1 = all)",
      cxxopts::value<double>()->default_value("1.0"))(
      "seed", "sampling and drawing seed", cxxopts::value<uint64_t>()->default_value("0"))(
      "draw-dir", "folder of the /draw pictures (chat_draw_N.png)", cxxopts::value<std::string>()->default_value("."))(
      "steps", "/draw: Euler steps", cxxopts::value<int64_t>()->default_value("25"))(
      "cfg", "/draw: guidance weight (1 = none)", cxxopts::value<double>()->default_value("3.0"));
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter"))) {
    std::cout << opts.help() << "\nExamples:\n  omnilite chat --checkpoint runs/quickstart --adapter runs/sft --image "
                 "data/generated/sft/images/valid/00000.png\n  printf 'What is this?\\n/quit\\n' | omnilite chat "
                 "--adapter runs/sft --image shoe.png\n";
    return args.count("help") ? 0 : 2;
  }
  const TextSampling ts = sampling_from_args(args);
  const int64_t max_new = args["max-new-tokens"].as<int64_t>();
  if (max_new < 1) throw std::runtime_error("--max-new-tokens must be >= 1, got " + std::to_string(max_new));
  std::vector<std::string> attached;
  if (args.count("image")) attached.push_back(args["image"].as<std::string>());
  auto m = load_from_args(args);
  Tokenizer tok(m.cfg.data.tokenizer);
  const auto layout = chat_layout(m.cfg.model);
  const std::string system = args.count("system") ? args["system"].as<std::string>() : "";
  KVCache cache;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(ts.seed);
  std::vector<int64_t> pending;  // ids sampled but not yet in the cache (the answer's last id, its eos)
  bool first = true;
  int64_t drawn = 0;
  std::cerr << "chat: " << m.dir << " (/image FILE, /draw PROMPT, /reset, /quit)\n";
  std::string line;
  while (std::cerr << "> " << std::flush, std::getline(std::cin, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      if (line == "/quit" || line == "/exit") break;
      if (line == "/reset") {
        cache = KVCache();
        pending.clear();
        first = true;
        std::cerr << "chat: the conversation starts over\n";
        continue;
      }
      if (line.rfind("/image ", 0) == 0) {
        const std::string f = line.substr(7);
        decode_image_file(f);  // refuse a file that does not decode now, naming it
        attached.push_back(f);
        std::cerr << "chat: " << f << " goes with your next message\n";
        continue;
      }
      if (line.rfind("/draw ", 0) == 0) {
        // A drawing turn as fine-tuning shows it: [INST] PROMPT [/INST] then the image block (a conversation of
        // its own; the chat's cache is untouched).
        auto ids = encode_chat({{"user", {ChatPart{false, line.substr(6), ""}}}}, tok, layout, false, true).ids;
        ids.erase(ids.begin());  // imagine_latents puts bos first itself
        SampleOptions so;
        so.steps = args["steps"].as<int64_t>();
        so.cfg_scale = args["cfg"].as<double>();
        so.seed = ts.seed + static_cast<uint64_t>(drawn);
        torch::NoGradGuard ng;
        auto image = m.model->vqvae->decode_normalized(imagine_latents(*m.model, ids, so)).clamp(-1, 1).cpu();
        const std::string out = args["draw-dir"].as<std::string>() + "/chat_draw_" + std::to_string(++drawn) +
                                picture_extension();
        write_image_grid(image, 1, out);
        std::cout << "[wrote " << out << "]\n" << std::flush;
        continue;
      }
      if (line[0] == '/') throw std::runtime_error("unknown command \"" + line + "\"; expected /image FILE, /draw "
                                                   "PROMPT, /reset or /quit");
      ChatMessage user{"user", {}};
      for (const auto& f : attached) user.parts.push_back({true, "", f});
      user.parts.push_back({false, attached.empty() ? line : "\n" + line, ""});
      std::vector<ChatMessage> turn;
      if (first && !system.empty()) turn.push_back({"system", {ChatPart{false, system, ""}}});
      turn.push_back(user);
      auto t = encode_chat(turn, tok, layout, false, /*add_generation_prompt=*/true);
      if (!first) t.ids.erase(t.ids.begin());  // one bos per conversation
      std::vector<int64_t> ids = pending;
      ids.insert(ids.end(), t.ids.begin(), t.ids.end());
      auto images = t.shown.empty() ? torch::Tensor() : model_images(t.shown, m.cfg.model);
      std::vector<int64_t> answer;
      std::string shown;
      auto reply = continue_text(*m.model, cache, ids, images, max_new, ts, gen, [&](int64_t id) {
        if (id == m.cfg.model.tokens.eos_id) return;
        answer.push_back(id);
        const std::string text = tok.decode(answer);  // pieces join with spaces only once decoded together
        if (text.size() > shown.size()) std::cout << text.substr(shown.size()) << std::flush;
        shown = text;
      });
      std::cout << "\n" << std::flush;
      pending = {reply.back()};
      if (reply.back() != m.cfg.model.tokens.eos_id) pending.push_back(m.cfg.model.tokens.eos_id);
      attached.clear();
      first = false;
    } catch (const std::exception& e) {
      std::cerr << "chat: " << e.what() << "\n";
    }
  }
  return 0;
}

}  // namespace omnilite::cli
