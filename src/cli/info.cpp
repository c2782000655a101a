// omnilite info: the parameter table of a config (or the design card), counted analytically.
#include <cstdio>
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/param_count.h"

namespace omnilite::cli {
namespace {

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

std::string human(double v, const char* unit) {
  char buf[64];
  if (v >= 1e9) std::snprintf(buf, sizeof buf, "%.3f G%s", v / 1e9, unit);
  else if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2f M%s", v / 1e6, unit);
  else std::snprintf(buf, sizeof buf, "%.0f %s", v, unit);
  return buf;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

int run_info(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Print the parameters of an OMNI-LITE configuration: one row per module (the "
                                 "checkpoint-key prefix), the total, the active parameters per token and the weight "
                                 "memory in fp32, bf16 and NF4. Counts are analytic: no weights are allocated.");
  opts.add_options()("config", "model config JSON (e.g. configs/omni-lite.json)", cxxopts::value<std::string>())(
      "spec", "design card JSON (e.g. ../shared/spec/omni-lite.spec.json); built into the same model config",
      cxxopts::value<std::string>())("json", "print one JSON object instead of the table")("h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << "\nExactly one of --config or --spec is required.\n";
    return 0;
  }
  if (args.count("config") + args.count("spec") != 1) {
    std::cerr << argv[0] << ": give exactly one of --config FILE or --spec FILE\n\n" << opts.help();
    return 2;
  }
  const std::string path = args.count("config") ? args["config"].as<std::string>() : args["spec"].as<std::string>();
  Config cfg = load_config_file(path);
  const ParamReport r = count_parameters(cfg.model);

  if (args.count("json")) {
    nlohmann::json j;
    j["source"] = path;
    j["total_params"] = r.total;
    j["active_params_backbone"] = r.active_backbone;
    j["active_params_with_embeddings"] = r.active_with_embeddings;
    j["nf4_quantised_params"] = r.nf4_params;
    j["weight_bytes"] = {{"fp32", r.bytes_fp32}, {"bf16", r.bytes_bf16}, {"nf4", r.bytes_nf4}};
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& row : r.rows) rows.push_back({{"module", row.name}, {"params", row.params}, {"nf4_params", row.nf4_params}});
    j["modules"] = rows;
    j["config"] = to_json(cfg)["model"];
    std::cout << j.dump(2) << "\n";
    return 0;
  }

  std::printf("OMNI-LITE parameters (%s)\n\n", path.c_str());
  std::printf("%-30s %16s %8s\n", "module", "parameters", "share");
  for (const auto& row : r.rows)
    std::printf("%-30s %16s %7.2f%%\n", row.name.c_str(), with_commas(row.params).c_str(),
                100.0 * static_cast<double>(row.params) / static_cast<double>(r.total));
  std::printf("%-30s %16s\n\n", "total", with_commas(r.total).c_str());
  std::printf("active per token, backbone (top-%lld of %lld experts): %s (%s)\n",
              static_cast<long long>(cfg.model.moe.top_k), static_cast<long long>(cfg.model.moe.num_experts),
              with_commas(r.active_backbone).c_str(), human(static_cast<double>(r.active_backbone), "").c_str());
  std::printf("active per token, with embedding and LM head:   %s (%s)\n", with_commas(r.active_with_embeddings).c_str(),
              human(static_cast<double>(r.active_with_embeddings), "").c_str());
  std::printf("\nweight memory: fp32 %s | bf16 %s | NF4 %s\n", gib(r.bytes_fp32).c_str(), gib(r.bytes_bf16).c_str(),
              gib(r.bytes_nf4).c_str());
  std::printf("  (NF4: %s linear weights at %.3f bits incl. double-quantised absmax; the other %s in bf16)\n",
              with_commas(r.nf4_params).c_str(), kNf4BitsPerParam, with_commas(r.total - r.nf4_params).c_str());
  return 0;
}

}  // namespace omnilite::cli
