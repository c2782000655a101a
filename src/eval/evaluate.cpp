#include "omnilite/eval/evaluate.h"

#include "omnilite/eval/vqa.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <optional>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "omnilite/config.h"
#include "omnilite/eval/metrics.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/hash.h"
#include "omnilite/log.h"
#include "omnilite/modules/image_classifier.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/runtime.h"
#include "omnilite/modules/losses.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {


double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The first `max_rows` packed rows of data.text_valid in order, [R, seq_len]; undefined when it has no documents.
torch::Tensor held_out_rows(const Config& cfg, const Tokenizer& tok, int64_t max_rows) {
  const PackedText valid(cfg.data.text_valid, "data.text_valid", tok, cfg.model, cfg.train.seq_len, cfg.train.seed);
  if (valid.rows() == 0) return {};
  std::vector<int64_t> idx(static_cast<size_t>(std::min(valid.rows(), max_rows)));
  std::iota(idx.begin(), idx.end(), 0);
  return valid.gather(idx);
}

// Held-out text perplexity of the model and of the training unigram distribution on the same target tokens.
void text_perplexity(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, int64_t max_rows, json& out) {
  auto rows = held_out_rows(cfg, tok, max_rows);
  if (!rows.defined()) return;
  // Unigram: add-one smoothed counts over the training text (of token shards: their first kUnigramTokens).
  constexpr int64_t kUnigramTokens = int64_t{1} << 26;
  const PackedText train_text(cfg.data.text_train, "data.text_train", tok, cfg.model, cfg.train.seq_len, 0);
  auto train_stream = train_text.stream_prefix(kUnigramTokens);
  const int64_t V = cfg.model.text.vocab_size;
  auto counts = torch::bincount(train_stream, {}, V).to(torch::kFloat64) + 1.0;
  auto log_p = (counts / counts.sum()).log();  // [V]
  torch::NoGradGuard ng;
  const auto dev = model.text->embed_tokens->weight.device();
  std::vector<torch::Tensor> model_lp, unigram_lp;  // log p of each target token
  for (int64_t s = 0; s < rows.size(0); s += 8) {
    auto batch = rows.narrow(0, s, std::min<int64_t>(8, rows.size(0) - s));
    auto logits = model.forward({batch.to(dev)}).logits.to(torch::kFloat32).cpu();  // [B, T, V]
    auto targets = batch.narrow(1, 1, batch.size(1) - 1);                           // [B, T-1]
    auto lp = torch::log_softmax(logits.narrow(1, 0, batch.size(1) - 1).to(torch::kFloat64), -1);
    model_lp.push_back(lp.gather(2, targets.unsqueeze(2)).reshape(-1));
    unigram_lp.push_back(log_p.index_select(0, targets.reshape(-1)));
  }
  const auto all = torch::cat(model_lp);
  out["text_ppl"] = perplexity(all);
  out["unigram_ppl"] = perplexity(torch::cat(unigram_lp));
  const double n = static_cast<double>(all.numel());
  out["text_tokens"] = n;
}

// Held-out labelled images loaded at `size` (up to `max_images`); empty when data.image_valid is not set. Images
// are loaded at the size their training stage loaded them at (the omni stage: the larger of the ViT's and the
// VQ-VAE's size, resized for the ViT by to_model_images), so that eval sees the pixels training saw.
int64_t omni_image_size(const Config& cfg) { return std::max(cfg.model.vision.image_size, cfg.model.vqvae.image_size); }

}  // namespace

ImageCaptionSet held_out_images(const Config& cfg, int64_t size, int64_t max_images) {
  if (cfg.data.image_valid.empty() || max_images <= 0) return {};
  auto io = image_load_options(cfg.data, size);
  io.max_images = max_images;
  auto set = read_image_captions(cfg.data.image_valid, io);
  // Eval scores captions and generated images against the class names: every label must name one.
  const auto& classes = fashion_mnist_classes();
  for (int64_t i = 0; i < set.size(); ++i) {
    const int64_t label = set.labels[i].item<int64_t>();
    if (label >= static_cast<int64_t>(classes.size()))
      throw std::runtime_error("data.image_valid: image " + std::to_string(i) + " has label " + std::to_string(label) +
                               ", outside the " + std::to_string(classes.size()) + " class names (0 = " +
                               classes.front() + " ... " + std::to_string(classes.size() - 1) + " = " + classes.back() +
                               "); hint: eval scores Fashion-MNIST labels 0-9; drop \"label\" from other images");
  }
  return set;
}

namespace {

void caption_task(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, const EvalOptions& o,
                  const std::string& out_dir, json& out) {
  auto valid = held_out_images(cfg, omni_image_size(cfg), o.caption_images);
  if (valid.size() == 0) return;
  const auto t0 = std::chrono::steady_clock::now();
  const auto& classes = fashion_mnist_classes();
  const int64_t L = cfg.model.resampler.num_latents;
  auto prefix_row = caption_row({}, L, cfg.model.tokens);
  prefix_row.pop_back();  // without eos: the caption follows
  int64_t hits = 0, labelled = 0;
  json examples = json::array();
  std::vector<std::vector<std::string>> hyps;
  std::vector<std::vector<std::vector<std::string>>> refs;
  std::vector<std::string> shown;
  for (int64_t s = 0; s < valid.size(); s += 100) {
    const int64_t n = std::min<int64_t>(100, valid.size() - s);
    auto idx = torch::arange(s, s + n, torch::kInt64);
    auto images = to_model_images(valid.gather(idx), cfg.model.vision.image_size, cfg.model.vision.in_channels);
    auto prefix = pad_rows(std::vector<std::vector<int64_t>>(static_cast<size_t>(n), prefix_row),
                           static_cast<int64_t>(prefix_row.size()), cfg.model.tokens.pad_id);
    auto gen = greedy_generate(model, prefix, images, o.max_caption_tokens);
    for (int64_t i = 0; i < n; ++i) {
      const std::string caption = tok.decode(ids_before_eos(gen[i], cfg.model.tokens));
      const int64_t label = valid.labels[s + i].item<int64_t>();
      if (label >= 0) {
        ++labelled;
        hits += find_class_name(caption, classes) == label;
      }
      hyps.push_back(bleu_tokens(caption));
      refs.emplace_back();
      for (const auto& r : valid.captions[static_cast<size_t>(s + i)]) refs.back().push_back(bleu_tokens(r));
      if (shown.size() < 20) shown.push_back(caption);
      if (examples.size() < 10)
        examples.push_back({{"class", label >= 0 ? classes[static_cast<size_t>(label)] : ""}, {"caption", caption}});
    }
  }
  if (labelled > 0) out["caption_accuracy"] = static_cast<double>(hits) / static_cast<double>(labelled);
  const auto bleu = corpus_bleu4(hyps, refs);
  out["caption_bleu4"] = bleu.bleu;
  out["caption_bleu_precisions"] = bleu.precision;
  out["caption_bleu_brevity_penalty"] = bleu.brevity_penalty;
  out["caption_images"] = valid.size();
  out["caption_examples"] = examples;
  if (have_opencv()) {
    const int64_t n_shown = static_cast<int64_t>(shown.size());
    const std::string png = out_dir + "/captions.png";
    write_captioned_grid(to_model_images(valid.gather(torch::arange(n_shown, torch::kInt64)),
                                         cfg.model.vqvae.image_size, 3),
                         shown, 5, png);
    out["captions_png"] = png;
  }
  log::info(log::format("eval: caption_accuracy %.3f, BLEU-4 %.3f on %lld held-out images (%.0fs)",
                        out.value("caption_accuracy", -1.0), bleu.bleu, static_cast<long long>(valid.size()),
                        seconds_since(t0)));
}

void t2i_task(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, const EvalOptions& o,
              const std::string& out_dir, json& out) {
  const std::string cls_dir = o.classifier.empty() ? cfg.data.classifier : o.classifier;
  if (o.t2i_per_class <= 0 || cls_dir.empty()) return;
  const auto t0 = std::chrono::steady_clock::now();
  const auto dev = model.text->embed_tokens->weight.device();
  const auto& classes = fashion_mnist_classes();
  const std::string cdir = io::latest_checkpoint(cls_dir);
  const json cstate = io::read_checkpoint_state(cdir);
  if (cstate.value("stage", std::string()) != "classifier")
    throw std::runtime_error("classifier \"" + cdir + "\" is not a train.stage = \"classifier\" checkpoint");
  io::SafetensorsReader r(cdir + "/model.safetensors");
  if (!r.contains("fc2.weight")) throw std::runtime_error("classifier \"" + cdir + "\": no fc2.weight");
  const int64_t num_classes = r.tensors().at("fc2.weight").shape[0];
  const int64_t S = cfg.model.vqvae.image_size, channels = cfg.model.vqvae.in_channels;
  ImageClassifier clf(channels, S, num_classes);
  io::load_module(*clf, cdir);
  clf->to(dev);
  clf->eval();
  torch::NoGradGuard ng;
  // The classifier's own held-out accuracy and the real images' features.
  auto held = held_out_images(cfg, S, 2000);
  torch::Tensor real_features;
  if (held.size() > 0) {
    auto imgs = to_model_images(held.gather(), S, channels).to(dev);
    out["classifier_accuracy"] = clf->forward(imgs).argmax(1).cpu().eq(held.labels).to(torch::kFloat64).mean().item<double>();
    real_features = clf->features(imgs).cpu();
  }
  std::vector<std::vector<int64_t>> prompts;
  std::vector<int64_t> labels;
  const int64_t C = std::min<int64_t>(num_classes, static_cast<int64_t>(classes.size()));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < o.t2i_per_class; ++i) {
      prompts.push_back(tok.encode(fashion_caption(c, 0)));
      labels.push_back(c);
    }
  SampleOptions so;
  so.steps = o.flow_steps;
  so.cfg_scale = o.cfg_scale;
  so.seed = o.seed;
  auto images = model.vqvae->decode_normalized(sample_latents(model, prompts, so)).clamp(-1, 1);
  auto pred = clf->forward(images).argmax(1).cpu();
  out["t2i_accuracy"] = pred.eq(torch::tensor(labels, torch::kInt64)).to(torch::kFloat64).mean().item<double>();
  out["t2i_images"] = static_cast<int64_t>(prompts.size());
  out["cfg_scale"] = o.cfg_scale;
  out["flow_steps"] = o.flow_steps;
  if (real_features.defined() && real_features.size(0) >= 4 && images.size(0) >= 2) {
    const auto gen = fit_gaussian(clf->features(images).cpu());
    out["t2i_frechet"] = frechet_distance(gen, fit_gaussian(real_features));
    const int64_t h = real_features.size(0) / 2;
    out["t2i_frechet_floor"] = frechet_distance(fit_gaussian(real_features.narrow(0, 0, h)),
                                                fit_gaussian(real_features.narrow(0, h, h)));
    out["t2i_frechet_real_images"] = real_features.size(0);
  }
  const int64_t cols = std::min<int64_t>(o.t2i_per_class, 10);
  std::vector<torch::Tensor> shown;
  for (int64_t c = 0; c < C; ++c) shown.push_back(images.narrow(0, c * o.t2i_per_class, cols));
  const std::string grid = out_dir + "/t2i_grid" + picture_extension();
  write_image_grid(torch::cat(shown, 0), cols, grid);
  out["t2i_grid"] = grid;
  log::info(log::format("eval: t2i_accuracy %.3f on %lld generated images (classifier held-out accuracy %.3f), "
                        "Frechet %.3f (real halves %.3f); grid %s (%.0fs)", out["t2i_accuracy"].get<double>(),
                        static_cast<long long>(prompts.size()), out.value("classifier_accuracy", -1.0),
                        out.value("t2i_frechet", -1.0), out.value("t2i_frechet_floor", -1.0), grid.c_str(),
                        seconds_since(t0)));
}

void recon_task(OmniLiteImpl& model, const Config& cfg, const EvalOptions& o, const std::string& out_dir, json& out) {
  const int64_t S = cfg.model.vqvae.image_size;
  auto held = held_out_images(cfg, S, o.recon_images);
  if (held.size() == 0) return;
  const auto t0 = std::chrono::steady_clock::now();
  const auto dev = model.text->embed_tokens->weight.device();
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> originals, recons, codes;
  for (int64_t s = 0; s < held.size(); s += 100) {
    auto idx = torch::arange(s, std::min<int64_t>(s + 100, held.size()), torch::kInt64);
    auto x = to_model_images(held.gather(idx), S, cfg.model.vqvae.in_channels).to(dev);
    auto r = model.vqvae->forward(x);
    originals.push_back(x.cpu());
    recons.push_back(r.recon.clamp(-1, 1).cpu());
    codes.push_back(r.q.indices.cpu());
  }
  auto x = torch::cat(originals), y = torch::cat(recons);
  out["recon_psnr_db"] = psnr(y, x, 2.0);  // images span [-1, 1]
  const auto usage = codebook_usage(torch::cat(codes), cfg.model.vqvae.codebook_size);
  out["codebook_perplexity"] = usage.perplexity;
  out["codebook_used"] = usage.used;
  out["codebook_dead"] = usage.dead;
  out["codebook_size"] = cfg.model.vqvae.codebook_size;
  out["recon_images"] = held.size();
  const int64_t k = std::min<int64_t>(10, held.size());
  const std::string grid = out_dir + "/recon_grid" + picture_extension();
  write_image_grid(torch::cat({x.narrow(0, 0, k), y.narrow(0, 0, k)}), k, grid);
  out["recon_grid"] = grid;
  log::info(log::format("eval: recon PSNR %.2f dB on %lld held-out images, codebook perplexity %.1f, %lld of %lld "
                        "codes dead (%.0fs)", out["recon_psnr_db"].get<double>(), static_cast<long long>(held.size()),
                        usage.perplexity, static_cast<long long>(usage.dead),
                        static_cast<long long>(cfg.model.vqvae.codebook_size), seconds_since(t0)));
}

// Per-layer loads of the router logits (num_layers x [B*T, E]) of rows [B, T] over the selected tokens, appended
// to `layers` (one list per layer).
void add_loads(const std::vector<torch::Tensor>& router_logits, int64_t B, int64_t T, const torch::Tensor& selected,
               std::vector<std::vector<torch::Tensor>>& logits_per_layer, std::vector<torch::Tensor>& selections) {
  if (logits_per_layer.empty()) logits_per_layer.resize(router_logits.size());
  for (size_t l = 0; l < router_logits.size(); ++l)
    logits_per_layer[l].push_back(router_logits[l].to(torch::kFloat32).cpu().view({B, T, -1}));
  selections.push_back(selected.cpu());
}

json summarise_loads(const std::vector<std::vector<torch::Tensor>>& logits_per_layer,
                     const std::vector<torch::Tensor>& selections, int64_t top_k, torch::Tensor& heat) {
  json layers = json::array();
  double cv = 0, bal = 0, rep = 0;
  std::vector<torch::Tensor> rows;
  // Rows of different lengths are routed separately and summed per expert.
  for (const auto& per_batch : logits_per_layer) {
    const int64_t E = per_batch[0].size(2);
    std::vector<int64_t> counts(static_cast<size_t>(E), 0);
    int64_t tokens = 0;
    double l_bal = 0, l_rep = 0;
    for (size_t b = 0; b < per_batch.size(); ++b) {
      const auto load = expert_load(per_batch[b], selections[b], top_k);
      for (int64_t e = 0; e < E; ++e) counts[static_cast<size_t>(e)] += load.tokens_per_expert[static_cast<size_t>(e)];
      tokens += load.tokens;
      l_bal += load.balance_loss * static_cast<double>(load.tokens);
      l_rep += load.pair_repeat * static_cast<double>(load.tokens);
    }
    auto cf = torch::tensor(counts, torch::kInt64).to(torch::kFloat64);
    const double l_cv = tokens ? (cf.std(false) / cf.mean()).item<double>() : 0.0;
    const double n = std::max<double>(1.0, static_cast<double>(tokens));
    layers.push_back({{"tokens", tokens}, {"tokens_per_expert", counts}, {"cv", l_cv}, {"balance_loss", l_bal / n},
                      {"pair_repeat", l_rep / n}});
    cv += l_cv;
    bal += l_bal / n;
    rep += l_rep / n;
    rows.push_back(cf / std::max<double>(1.0, static_cast<double>(tokens * top_k)));
  }
  const double L = static_cast<double>(logits_per_layer.size());
  heat = torch::stack(rows);  // [layers, E] share of routed slots
  return {{"layers", layers}, {"mean_cv", cv / L}, {"mean_balance_loss", bal / L}, {"mean_pair_repeat", rep / L}};
}

void moe_task(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, const EvalOptions& o,
              const std::string& out_dir, json& out) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto dev = model.text->embed_tokens->weight.device();
  const int64_t K = cfg.model.moe.top_k;
  torch::NoGradGuard ng;
  json moe = json::object();
  std::vector<torch::Tensor> heats;
  std::vector<std::string> parts;
  // Text tokens: held-out packed rows.
  if (auto rows = held_out_rows(cfg, tok, o.moe_rows); rows.defined()) {
    auto r = model.forward({rows.to(dev)});
    std::vector<std::vector<torch::Tensor>> per_layer;
    std::vector<torch::Tensor> sel;
    add_loads(r.router_logits, rows.size(0), rows.size(1), torch::ones_like(rows, torch::kBool), per_layer, sel);
    torch::Tensor heat;
    moe["text"] = summarise_loads(per_layer, sel, K, heat);
    heats.push_back(heat);
    parts.push_back("text");
  }
  // Image tokens: the resampled image positions of held-out caption rows.
  auto held = held_out_images(cfg, omni_image_size(cfg), o.moe_rows);
  if (held.size() > 0) {
    std::vector<std::vector<int64_t>> rows;
    for (int64_t i = 0; i < held.size(); ++i)
      rows.push_back(caption_row(tok.encode(held.captions[static_cast<size_t>(i)].front()),
                                 cfg.model.resampler.num_latents, cfg.model.tokens));
    size_t longest = 0;
    for (const auto& r : rows) longest = std::max(longest, r.size());
    auto tokens = pad_rows(rows, static_cast<int64_t>(longest), cfg.model.tokens.pad_id);
    auto images = to_model_images(held.gather(), cfg.model.vision.image_size, cfg.model.vision.in_channels);
    auto r = model.forward({tokens.to(dev), images.to(dev)});
    std::vector<std::vector<torch::Tensor>> per_layer;
    std::vector<torch::Tensor> sel;
    add_loads(r.router_logits, tokens.size(0), tokens.size(1), tokens.eq(cfg.model.tokens.image_id), per_layer, sel);
    torch::Tensor heat;
    moe["image"] = summarise_loads(per_layer, sel, K, heat);
    heats.push_back(heat);
    parts.push_back("image");
  }
  if (heats.empty()) return;
  out["moe"] = moe;
  if (!have_opencv()) return;  // no heatmap without OpenCV
  // One heatmap: the parts side by side, a blank column between them.
  std::vector<torch::Tensor> cols;
  for (size_t i = 0; i < heats.size(); ++i) {
    if (i) cols.push_back(torch::zeros({heats[i].size(0), 1}, torch::kFloat64));
    cols.push_back(heats[i]);
  }
  const std::string png = out_dir + "/expert_load.png";
  std::string columns;
  for (size_t i = 0; i < parts.size(); ++i)
    columns += (i ? " | " : "") + parts[i] + ": experts 0.." + std::to_string(cfg.model.moe.num_experts - 1);
  write_heatmap(torch::cat(cols, 1), "share of routed slots per expert (rows: layers)", "layer", columns, png);
  out["expert_load_png"] = png;
  log::info(log::format("eval: expert load (mean over layers) text cv %.3f / balance %.3f, image cv %.3f / balance "
                        "%.3f (%.0fs)", moe.contains("text") ? moe["text"]["mean_cv"].get<double>() : -1.0,
                        moe.contains("text") ? moe["text"]["mean_balance_loss"].get<double>() : -1.0,
                        moe.contains("image") ? moe["image"]["mean_cv"].get<double>() : -1.0,
                        moe.contains("image") ? moe["image"]["mean_balance_loss"].get<double>() : -1.0,
                        seconds_since(t0)));
}

const std::vector<std::string>& all_tasks() {
  static const std::vector<std::string> t = {"ppl", "caption", "t2i", "recon", "moe", "vqa"};
  return t;
}

}  // namespace

std::vector<std::string> parse_eval_tasks(const std::string& list) {
  if (list == "all") return all_tasks();
  std::vector<std::string> out;
  std::stringstream ss(list);
  std::string t;
  while (std::getline(ss, t, ',')) {
    if (std::find(all_tasks().begin(), all_tasks().end(), t) == all_tasks().end())
      throw std::runtime_error("--tasks \"" + list + "\": unknown task \"" + t + "\"; expected a comma-separated list "
                               "of ppl, caption, t2i, recon, moe, vqa (or all)");
    out.push_back(t);
  }
  if (out.empty()) throw std::runtime_error("--tasks is empty; expected e.g. ppl,moe or all");
  return out;
}

json evaluate(const EvalOptions& o) {
  for (const auto& t : o.tasks)
    if (std::find(all_tasks().begin(), all_tasks().end(), t) == all_tasks().end())
      throw std::runtime_error("eval: unknown task \"" + t + "\"");
  std::optional<quant::Nf4Activations> act;  // checked before the (long) load
  try {
    if (!o.nf4_activations.empty()) act = quant::parse_nf4_activations(o.nf4_activations);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("eval: --nf4-activations: ") + e.what());
  }
  auto loaded = load_omni_checkpoint(o.checkpoint, o.device, o.adapter);
  if (act) {
    set_nf4_activations(*loaded.model, *act);
    loaded.cfg.runtime.nf4_activations = o.nf4_activations;
  }
  const std::string& dir = loaded.dir;
  const Config& cfg = loaded.cfg;
  OmniLite model = loaded.model;
  torch::manual_seed(o.seed);
  Tokenizer tok(cfg.data.tokenizer);
  tok.check_compatible(cfg.model);
  const std::string out_dir = o.out_dir.empty() ? io::run_folder_of(dir) : o.out_dir;
  fs::create_directories(out_dir);
  json out = {{"checkpoint", dir},          {"step", loaded.step}, {"config_hash", fnv1a_hex(to_json(cfg).dump())},
              {"seed", o.seed},             {"tasks", o.tasks}};
  auto wants = [&](const char* t) { return std::find(o.tasks.begin(), o.tasks.end(), t) != o.tasks.end(); };

  if (wants("ppl") && !cfg.data.text_valid.empty()) {
    const auto t0 = std::chrono::steady_clock::now();
    text_perplexity(*model, cfg, tok, o.text_rows, out);
    log::info(log::format("eval: text_ppl %.2f, unigram_ppl %.2f over %.0f held-out tokens (%.0fs)",
                          out["text_ppl"].get<double>(), out["unigram_ppl"].get<double>(),
                          out["text_tokens"].get<double>(), seconds_since(t0)));
  }
  if (wants("caption")) caption_task(*model, cfg, tok, o, out_dir, out);
  if (wants("t2i")) t2i_task(*model, cfg, tok, o, out_dir, out);
  if (wants("recon")) recon_task(*model, cfg, o, out_dir, out);
  if (wants("moe")) moe_task(*model, cfg, tok, o, out_dir, out);
  if (wants("vqa")) {
    VqaOptions v;
    v.data = o.vqa_data.empty() ? cfg.data.sft_valid : o.vqa_data;
    v.max_questions = o.vqa_questions;
    v.max_answer_tokens = o.max_answer_tokens;
    v.answers_file = out_dir + "/vqa_answers.jsonl";
    if (!v.data.empty()) vqa_task(*model, cfg, tok, v, out);
    else if (o.tasks.size() < all_tasks().size())
      throw std::runtime_error("eval vqa: no questions; hint: pass --data FILE.jsonl (LLaVA-format records) or set "
                               "data.sft_valid");
    else log::info("eval: vqa skipped (no --data and no data.sft_valid)");
  }

  const std::string metrics = io::run_folder_of(dir) + "/metrics.jsonl";
  if (!have_opencv()) log::info("eval: built without OpenCV: the plots (loss curves, heatmap, captions) are skipped");
  if (fs::exists(metrics) && have_opencv()) {
    const std::string curves = out_dir + "/loss_curves.png", stats = out_dir + "/train_stats.png";
    write_loss_curves(metrics, {"loss", "loss_clm", "loss_rf", "loss_caption", "loss_sft", "loss_aux", "valid_loss_text",
                                 "valid_loss_sft"}, curves);
    write_training_stats(metrics, stats);
    out["loss_curves"] = curves;
    out["train_stats"] = stats;
  }
  const std::string path = out_dir + "/eval.json";
  write_file_atomically(path, out.dump(2) + "\n");
  out["eval_json"] = path;
  return out;
}

}  // namespace omnilite
