// omnilite eval: quality figures of a checkpoint (see include/omnilite/eval/evaluate.h).
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/eval/evaluate.h"

namespace omnilite::cli {

int run_eval(int argc, char** argv) {
  EvalOptions d;
  cxxopts::Options opts(argv[0], "Evaluate an OMNI-LITE checkpoint: caption_accuracy (held-out labelled images), "
                                 "t2i_accuracy (generated images judged by the classifier of data.classifier), "
                                 "text_ppl and unigram_ppl (held-out text). Writes eval.json, t2i_grid.png and "
                                 "loss_curves.png into the run folder (or --out).");
  opts.add_options()("checkpoint", "run folder (its newest checkpoint) or checkpoint folder", cxxopts::value<std::string>())(
      "json", "print the results as JSON on stdout")(
      "out", "folder for eval.json and the PNGs (default: the run folder)", cxxopts::value<std::string>())(
      "classifier", "classifier run or checkpoint folder (default: data.classifier of the config)", cxxopts::value<std::string>())(
      "device", "cpu, cuda or cuda:N (default: runtime.device of the config)", cxxopts::value<std::string>())(
      "caption-images", "held-out images to caption (0 = skip)", cxxopts::value<int64_t>()->default_value(std::to_string(d.caption_images)))(
      "t2i-per-class", "images generated per class (0 = skip)", cxxopts::value<int64_t>()->default_value(std::to_string(d.t2i_per_class)))(
      "flow-steps", "Euler steps of the image sampler", cxxopts::value<int64_t>()->default_value(std::to_string(d.flow_steps)))(
      "cfg-scale", "classifier-free guidance weight (1 = none)", cxxopts::value<double>()->default_value("3.0"))(
      "text-rows", "held-out text rows for text_ppl", cxxopts::value<int64_t>()->default_value(std::to_string(d.text_rows)))(
      "seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("0"))("h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("checkpoint")) {
    std::cout << opts.help() << "\nExample:\n  omnilite eval --checkpoint runs/quickstart --json\n";
    return args.count("help") ? 0 : 2;
  }
  EvalOptions o;
  o.checkpoint = args["checkpoint"].as<std::string>();
  if (args.count("out")) o.out_dir = args["out"].as<std::string>();
  if (args.count("classifier")) o.classifier = args["classifier"].as<std::string>();
  if (args.count("device")) o.device = args["device"].as<std::string>();
  o.caption_images = args["caption-images"].as<int64_t>();
  o.t2i_per_class = args["t2i-per-class"].as<int64_t>();
  o.flow_steps = args["flow-steps"].as<int64_t>();
  o.cfg_scale = args["cfg-scale"].as<double>();
  o.text_rows = args["text-rows"].as<int64_t>();
  o.seed = args["seed"].as<uint64_t>();
  if (o.caption_images < 0 || o.t2i_per_class < 0 || o.flow_steps < 1 || o.text_rows < 1)
    throw std::invalid_argument("--caption-images and --t2i-per-class must be >= 0, --flow-steps and --text-rows >= 1");
  const auto r = evaluate(o);
  if (args.count("json")) std::cout << r.dump(2) << "\n";
  return 0;
}

}  // namespace omnilite::cli
