// omnilite info: the parameter table of a config (or the design card), read off the model (modules/param_count.h).
// omnilite memory: the training-memory estimate of a config (include/omnilite/train/memory_estimate.h).
#include <cstdio>
#include <iostream>
#include <stdexcept>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/modules/param_count.h"
#include "omnilite/runtime.h"
#include "omnilite/train/memory_estimate.h"

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
                                 "memory in fp32, bf16 and NF4. Counts are read off the model, built without allocating its projections.");
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
    j["active_matmul_params"] = r.active_matmul;
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
  std::printf("multiplied with per token (MFU's N: attention, router, experts, LM head): %s (%s)\n",
              with_commas(r.active_matmul).c_str(), human(static_cast<double>(r.active_matmul), "").c_str());
  std::printf("\nweight memory: fp32 %s | bf16 %s | NF4 %s\n", gib(r.bytes_fp32).c_str(), gib(r.bytes_bf16).c_str(),
              gib(r.bytes_nf4).c_str());
  std::printf("  (NF4: %s linear weights at %.3f bits incl. double-quantised absmax; the other %s in bf16)\n",
              with_commas(r.nf4_params).c_str(), kNf4BitsPerParam, with_commas(r.total - r.nf4_params).c_str());
  return 0;
}

int run_memory(int argc, char** argv) {
  const double process = resident_bytes();  // LibTorch, BLAS and this program, before any model exists
  cxxopts::Options opts(argv[0], "Estimate the memory of training a config's omni model: NF4 weights and their "
                                 "constants, full-precision tensors, LoRA parameters, gradients, AdamW moments, and "
                                 "activations of one micro-batch (train.batch_size x train.seq_len plus image rows) with "
                                 "and without activation checkpointing; with --world-size / --zero what one "
                                 "data-parallel rank holds at a ZeRO stage. Only the small non-projection tensors "
                                 "are allocated.");
  opts.add_options()("config", "config JSON (e.g. configs/qlora-omni-lite.json)", cxxopts::value<std::string>())(
      "world-size", "data-parallel ranks: print one rank's share of the state and the 2/4/8-rank table",
      cxxopts::value<int64_t>()->default_value("1"))(
      "zero", "ZeRO stage 0-3 for --world-size (default: the config's train.zero)", cxxopts::value<int64_t>())(
      "set", "override a config value by dotted key, as omnilite train does: --set train.seq_len=4096 (repeatable)",
      cxxopts::value<std::vector<std::string>>())("json", "print one JSON object")("h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("config")) {
    std::cout << opts.help() << "\nExamples:\n  omnilite memory --config configs/qlora-omni-lite.json\n"
                 "  omnilite memory --config configs/qlora-omni-lite.json --set train.seq_len=4096\n"
                 "  omnilite memory --config configs/omni-lite.json --world-size 4 --zero 3   # per GPU of 4\n"
                 "Compare with the peak resident memory of a run: /usr/bin/time -v omnilite train ... (see "
                 "scripts/bench_qlora.sh).\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string path = args["config"].as<std::string>();
  auto j = read_config_json(path);
  if (args.count("set"))
    for (const auto& kv : args["set"].as<std::vector<std::string>>()) apply_config_override(j, kv);
  const Config cfg = parse_config(j);
  const int64_t world = args["world-size"].as<int64_t>();
  const int64_t zero = args.count("zero") ? args["zero"].as<int64_t>() : cfg.train.zero_stage();
  if (world < 1) throw std::runtime_error("--world-size " + std::to_string(world) + ": must be at least 1");
  if (zero < 0 || zero > 3) throw std::runtime_error("--zero " + std::to_string(zero) + ": must be 0, 1, 2 or 3");
  auto e = estimate_training_memory(cfg);
  e.process_bytes = process > 0 ? process : 0;
  const double with = e.total(true), without = e.total(false);
  const ShardedMemory sh = sharded_memory(e, world, zero);
  // one rank's total: its share of the state, the frozen weights, the peak gathered, activations (ZeRO-3 recomputes
  // every decoder layer in backward, as activation checkpointing does), the process
  auto rank_total = [&](const ShardedMemory& m, int64_t z) {
    const double act = e.checkpointing || (z >= 3) ? e.act_checkpointed : e.act_full;
    return m.state() + m.frozen_weights + m.gathered_peak + act + e.process_bytes;
  };
  if (args.count("json")) {
    nlohmann::json j = {{"config", path},
                        {"lora", cfg.lora.enabled},
                        {"tokens_per_micro_batch", e.tokens},
                        {"params", {{"nf4", e.nf4_params}, {"full", e.full_params}, {"lora", e.lora_params},
                                    {"trainable", e.trainable_params}}},
                        {"bytes", {{"nf4_codes", e.nf4_code_bytes}, {"nf4_constants", e.nf4_const_bytes},
                                   {"full_precision", e.full_bytes}, {"lora", e.lora_bytes}, {"gradients", e.grad_bytes},
                                   {"adamw", e.adam_bytes}, {"activations_one_layer", e.act_layer_bytes},
                                   {"activations_checkpointed", e.act_checkpointed}, {"activations_full", e.act_full},
                                   {"process", e.process_bytes}, {"total_checkpointed", with}, {"total_full", without}}},
                        {"activation_checkpointing", e.checkpointing},
                        {"world_size", world},
                        {"zero", zero},
                        {"per_rank_state_bytes", sh.state()},
                        {"per_rank", {{"trainable_weights", sh.trainable_weights},
                                      {"frozen_weights", sh.frozen_weights},
                                      {"gradients", sh.grads}, {"adamw", sh.adam}, {"gathered_peak", sh.gathered_peak},
                                      {"total", rank_total(sh, zero)}}}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  const auto& tr = cfg.train;
  std::printf("OMNI-LITE training memory estimate (%s)\n", path.c_str());
  std::printf("  %s; micro-batch: %lld text rows x %lld + %lld image rows = %lld tokens; activation checkpointing %s\n\n",
              cfg.lora.enabled ? ("QLoRA, base " + cfg.lora.base_dtype + ", rank " + std::to_string(cfg.lora.rank)).c_str()
                               : "full training (no LoRA)",
              static_cast<long long>(tr.batch_size), static_cast<long long>(tr.seq_len),
              static_cast<long long>(tr.caption_batch_size + tr.gen_batch_size), static_cast<long long>(e.tokens),
              e.checkpointing ? "on" : "off");
  auto row = [](const char* what, int64_t n, double bytes) {
    std::printf("  %-40s %16s %12s\n", what, n >= 0 ? with_commas(n).c_str() : "", gib(bytes).c_str());
  };
  row("NF4 weights: 4-bit codes", e.nf4_params, e.nf4_code_bytes);
  row("NF4 constants: absmax codes, scales", -1, e.nf4_const_bytes);
  row(e.full_bytes < 4.0 * static_cast<double>(e.full_params) ? "full-precision tensors (fp32; frozen tables bf16)"
                                                                  : "full-precision tensors (fp32)",
      e.full_params, e.full_bytes);
  row("LoRA adapters (fp32)", e.lora_params, e.lora_bytes);
  row("gradients (trainable values)", e.trainable_params, e.grad_bytes);
  row("AdamW moments", -1, e.adam_bytes);
  row("activations, one decoder layer", -1, e.act_layer_bytes);
  row("activations with checkpointing", -1, e.act_checkpointed);
  row("activations without checkpointing", -1, e.act_full);
  row("process (LibTorch, BLAS; measured now)", -1, e.process_bytes);
  std::printf("\n  %-40s %16s %12s\n  %-40s %16s %12s\n", "total with activation checkpointing", "", gib(with).c_str(),
              "total without", "", gib(without).c_str());
  // Data parallelism (QLoRA: the adapters and their state shard, the NF4 base stays whole on every rank): one rank's
  // share at this --world-size / --zero, then 2, 4 and 8 ranks at every stage.
  std::printf("\n  per rank at --world-size %lld, ZeRO %lld: weights %s (+ frozen %s), gradients %s, AdamW %s, "
              "gathered at the peak %s; with activations (%s) and the process: %s\n",
              static_cast<long long>(world), static_cast<long long>(zero), gib(sh.trainable_weights).c_str(),
              gib(sh.frozen_weights).c_str(), gib(sh.grads).c_str(), gib(sh.adam).c_str(),
              gib(sh.gathered_peak).c_str(), e.checkpointing || zero >= 3 ? "checkpointed" : "not checkpointed",
              gib(rank_total(sh, zero)).c_str());
  const double gpu = 24.0 * 1024 * 1024 * 1024;  // a 24 GB card (RTX 3090 / 4090: 24 GiB)
  std::printf("\n  per GPU (GiB) %8s %8s %8s %8s    fits 24 GiB at\n", "ZeRO 0", "ZeRO 1", "ZeRO 2", "ZeRO 3");
  for (int64_t w : {2, 4, 8}) {
    std::string fits;
    std::printf("  %2lld ranks     ", static_cast<long long>(w));
    for (int64_t z = 0; z <= 3; ++z) {
      const double t = rank_total(sharded_memory(e, w, z), z);
      std::printf(" %8.2f", t / (1024.0 * 1024.0 * 1024.0));
      if (t <= gpu) fits += (fits.empty() ? "ZeRO " : ", ") + std::to_string(z);
    }
    std::printf("    %s\n", fits.empty() ? "none" : fits.c_str());
  }
  return 0;
}

}  // namespace omnilite::cli
