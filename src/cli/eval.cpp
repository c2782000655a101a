// omnilite eval: quality figures of a checkpoint (see include/omnilite/eval/evaluate.h).
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <set>
#include <sstream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/eval/evaluate.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/event_writer.h"
#include "omnilite/log.h"
#include "omnilite/runtime.h"

namespace omnilite::cli {

namespace {

// eval's numbers as scalars "eval/KEY" and its PNG reports as images "eval/NAME", at the evaluated step.
void write_eval_events(const std::string& tb_dir, const nlohmann::json& r) {
  io::EventWriter events(tb_dir);
  const int64_t step = r.value("step", int64_t{0});
  int64_t images = 0;
  for (const auto& [k, v] : r.items()) {
    if (v.is_number()) events.scalar("eval/" + k, step, v.get<double>());
    if (!v.is_string()) continue;
    const std::string path = v.get<std::string>();
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ".png") == 0 && std::filesystem::exists(path)) {
      events.png_file("eval/" + std::filesystem::path(path).stem().string(), step, path);
      ++images;
    }
  }
  events.flush();
  log::info(log::format("eval: the numbers and %lld PNG reports are in TensorBoard's %s", static_cast<long long>(images),
                        tb_dir.c_str()));
}

}  // namespace

int run_eval(int argc, char** argv) {
  EvalOptions d;
  cxxopts::Options opts(argv[0], "Evaluate an OMNI-LITE checkpoint by task: ppl (held-out text perplexity beside the "
                                 "unigram baseline), caption (accuracy and BLEU-4 of greedy captions of held-out "
                                 "images), t2i (generated images judged by the classifier of data.classifier, and "
                                 "the Frechet distance of its features to real ones), recon (VQ-VAE PSNR and codebook "
                                 "usage), moe (per-layer expert load on text and image tokens), vqa (exact-match accuracy of answers to "
                                 "questions about images, per question type). Writes eval.json "
                                 "(with step, config hash and seed) and the PNG reports into the run folder (or "
                                 "--out). docs/evaluation.md explains every number.");
  add_checkpoint_flags(opts, "run folder (its newest checkpoint) or checkpoint folder");
  opts.add_options()(
      "tasks", "comma-separated ppl,caption,t2i,recon,moe,vqa or all", cxxopts::value<std::string>()->default_value("all"))(
      "data", "vqa: .json / .jsonl conversation files (LLaVA records; default: data.sft_valid of the config)",
      cxxopts::value<std::vector<std::string>>())(
      "vqa-questions", "vqa: answers scored at most (0 = all)", cxxopts::value<int64_t>()->default_value(std::to_string(d.vqa_questions)))(
      "max-answer-tokens", "vqa: longest generated answer", cxxopts::value<int64_t>()->default_value(std::to_string(d.max_answer_tokens)))(
      "json", "print the results as JSON on stdout")(
      "out", "folder for eval.json and the PNGs (default: the run folder)", cxxopts::value<std::string>())(
      "classifier", "classifier run or checkpoint folder (default: data.classifier of the config)", cxxopts::value<std::string>())(
      "caption-images", "held-out images to caption (0 = skip)", cxxopts::value<int64_t>()->default_value(std::to_string(d.caption_images)))(
      "t2i-per-class", "images generated per class (0 = skip)", cxxopts::value<int64_t>()->default_value(std::to_string(d.t2i_per_class)))(
      "flow-steps", "Euler steps of the image sampler", cxxopts::value<int64_t>()->default_value(std::to_string(d.flow_steps)))(
      "cfg-scale", "classifier-free guidance weight (1 = none)", cxxopts::value<double>()->default_value("3.0"))(
      "text-rows", "held-out text rows for text_ppl", cxxopts::value<int64_t>()->default_value(std::to_string(d.text_rows)))(
      "recon-images", "held-out images reconstructed for recon", cxxopts::value<int64_t>()->default_value(std::to_string(d.recon_images)))(
      "moe-rows", "held-out text rows and captioned images routed for moe", cxxopts::value<int64_t>()->default_value(std::to_string(d.moe_rows)))(
      "seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("0"));
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args.count("adapter"))) {
    std::cout << opts.help() << "\nExamples:\n  omnilite eval --checkpoint runs/quickstart --json\n"
                 "  omnilite eval --checkpoint runs/quickstart --adapter runs/sft --tasks vqa --data "
                 "data/generated/sft/valid.jsonl\n"
                 "  omnilite eval --checkpoint runs/quickstart --tasks ppl,moe --out runs/quickstart/eval-moe\n";
    return args.count("help") ? 0 : 2;
  }
  EvalOptions o;
  if (args.count("checkpoint")) o.checkpoint = args["checkpoint"].as<std::string>();
  if (args.count("adapter")) o.adapter = args["adapter"].as<std::string>();
  if (args.count("data")) o.vqa_data = args["data"].as<std::vector<std::string>>();
  o.vqa_questions = args["vqa-questions"].as<int64_t>();
  o.max_answer_tokens = args["max-answer-tokens"].as<int64_t>();
  if (args.count("out")) o.out_dir = args["out"].as<std::string>();
  if (args.count("classifier")) o.classifier = args["classifier"].as<std::string>();
  if (args.count("device")) o.device = args["device"].as<std::string>();
  if (args.count("nf4-activations")) o.nf4_activations = args["nf4-activations"].as<std::string>();
  o.caption_images = args["caption-images"].as<int64_t>();
  o.t2i_per_class = args["t2i-per-class"].as<int64_t>();
  o.flow_steps = args["flow-steps"].as<int64_t>();
  o.cfg_scale = args["cfg-scale"].as<double>();
  o.text_rows = args["text-rows"].as<int64_t>();
  o.recon_images = args["recon-images"].as<int64_t>();
  o.moe_rows = args["moe-rows"].as<int64_t>();
  o.tasks = parse_eval_tasks(args["tasks"].as<std::string>());
  o.seed = args["seed"].as<uint64_t>();
  if (o.caption_images < 0 || o.t2i_per_class < 0 || o.recon_images < 0 || o.flow_steps < 1 || o.text_rows < 1 ||
      o.moe_rows < 1 || o.vqa_questions < 0 || o.max_answer_tokens < 1)
    throw std::invalid_argument("--caption-images, --t2i-per-class, --recon-images and --vqa-questions must be >= 0, "
                                "--flow-steps, --text-rows, --moe-rows and --max-answer-tokens >= 1");
  // The checkpoint's threads and seed, once for the process (evaluate() leaves them alone).
  const std::string read_from = o.adapter.empty() ? o.checkpoint : o.adapter;
  Config ck = parse_config(io::read_checkpoint_state(io::latest_checkpoint(read_from))["config"]);
  if (!o.device.empty()) ck.runtime.device = o.device;
  apply_thread_flags(args, ck.runtime);
  apply_runtime(ck.runtime);
  const auto r = evaluate(o);
  // A run folder's TensorBoard events get eval's numbers and PNG reports at the checkpoint's step.
  const std::string ckdir = io::latest_checkpoint(read_from), run = io::run_folder_of(ckdir);
  if (ck.train.tensorboard && run != ckdir && std::filesystem::exists(run + "/metrics.jsonl"))
    write_eval_events(run + "/tb", r);
  if (args.count("json")) std::cout << r.dump(2) << "\n";
  return 0;
}

int run_compare(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Compare runs: the numbers of their eval.json files side by side (one column per run) "
                                 "and their training curves (loss terms, learning rate, gradient norm, tokens/s) in "
                                 "one PNG, a panel per metric.");
  opts.add_options()("runs", "comma-separated run folders (each with metrics.jsonl and/or eval.json)",
                     cxxopts::value<std::string>())(
      "eval-json", "name of the eval file inside each run folder", cxxopts::value<std::string>()->default_value("eval.json"))(
      "keys", "metrics.jsonl keys to plot", cxxopts::value<std::string>()->default_value("loss,loss_clm,loss_rf,grad_norm,tokens_per_s"))(
      "out", "PNG of the curves", cxxopts::value<std::string>()->default_value("compare.png"))("h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("runs")) {
    std::cout << opts.help() << "\nExample:\n  omnilite compare --runs runs/quickstart,runs/other --out compare.png\n";
    return args.count("help") ? 0 : 2;
  }
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) if (!item.empty()) out.push_back(item);
    return out;
  };
  const auto runs = split(args["runs"].as<std::string>());
  if (runs.empty()) throw std::runtime_error("--runs is empty; expected e.g. runs/a,runs/b");
  // Table: every numeric top-level key of any eval.json, one column per run ("-" where a run lacks it).
  std::vector<nlohmann::json> evals;
  std::set<std::string> keys;
  for (const auto& r : runs) {
    if (!std::filesystem::is_directory(r)) throw std::runtime_error("--runs: \"" + r + "\" is not a folder");
    std::ifstream f(r + "/" + args["eval-json"].as<std::string>());
    auto j = f ? nlohmann::json::parse(f, nullptr, false) : nlohmann::json::object();
    if (!j.is_object()) throw std::runtime_error("\"" + r + "/" + args["eval-json"].as<std::string>() + "\" is not JSON");
    // Numbers, the config hash, and the per-part means of nested sections (moe.text.mean_cv, ...) as flat keys.
    nlohmann::json flat = nlohmann::json::object();
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.value().is_number() || it.key() == "config_hash") flat[it.key()] = it.value();
      if (it.value().is_object())
        for (auto part = it.value().begin(); part != it.value().end(); ++part)
          if (part.value().is_object())
            for (auto leaf = part.value().begin(); leaf != part.value().end(); ++leaf)
              if (leaf.value().is_number()) flat[it.key() + "." + part.key() + "." + leaf.key()] = leaf.value();
    }
    for (auto it = flat.begin(); it != flat.end(); ++it) keys.insert(it.key());
    evals.push_back(flat);
  }
  std::cout << std::left << std::setw(30) << "metric";
  for (const auto& r : runs) std::cout << " | " << std::setw(22) << r;
  std::cout << "\n";
  for (const auto& k : keys) {
    std::cout << std::setw(30) << k;
    for (const auto& j : evals) {
      std::ostringstream cell;
      if (!j.contains(k)) cell << "-";
      else if (j[k].is_number_float()) cell << std::setprecision(4) << j[k].get<double>();
      else if (j[k].is_string()) cell << j[k].get<std::string>().substr(0, 22);
      else cell << j[k].dump();
      std::cout << " | " << std::setw(22) << cell.str();
    }
    std::cout << "\n";
  }
  std::vector<std::string> metrics;
  for (const auto& r : runs) metrics.push_back(r + "/metrics.jsonl");
  for (const auto& m : metrics)
    if (!std::filesystem::exists(m)) throw std::runtime_error("\"" + m + "\" does not exist; hint: pass run folders");
  write_run_comparison(metrics, runs, split(args["keys"].as<std::string>()), args["out"].as<std::string>());
  std::cout << "curves: " << args["out"].as<std::string>() << "\n";
  return 0;
}

}  // namespace omnilite::cli
