// Benchmark kernels behind `omnilite bench` (docs/benchmarks.md). Each returns what it measured; none writes a file.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite {

// Waits for the device's queued work (CUDA); nothing on the CPU.
void synchronize(const torch::Device& d);
// GEMM FLOP/s at n^3 in `dtype` (one warm-up, then `reps` timed products).
double matmul_flops(const torch::Device& dev, int64_t n, int64_t reps, torch::ScalarType dtype = torch::kFloat32);
// The GEMM rate an MFU is measured against: square matmuls of the step's compute dtype, large enough to approach
// the device's peak (8192 on a GPU; 2048 on a CPU, where larger ones take seconds each).
struct MatmulRate {
  double flops = 0;     // FLOP/s
  nlohmann::json json;  // matmul_dtype, matmul_size, matmul_gflops
};
MatmulRate step_matmul_rate(const torch::Device& dev, bool bf16);
// NF4 projection (dequantise + matmul) vs the fp32 projection of the same shape, no gradients.
nlohmann::json bench_nf4(const torch::Device& dev, int64_t tokens, int64_t in, int64_t out, int64_t reps);
// Memory bandwidth in bytes/s over `bytes` of fp32, best of `reps`, on all cores: {copy (dst.copy_(src), read +
// write counted), read only (a sum)}.
std::pair<double, double> memory_bandwidth(const torch::Device& dev, int64_t bytes, int64_t reps);
// Bytes of model state one decoded token reads: every text tensor once, except the experts (top_k of num_experts
// per layer on average) and the embedding table (one row; all of it when the LM head is tied to it); the image side
// is not used by text decoding.
double weight_bytes_per_token(const OmniLiteImpl& model, const ModelConfig& c);
// The full text path with `weights` = fp32 | bf16 | nf4 (NF4 bases as QLoRA builds them, no adapters), random.
OmniLite decode_model(const Config& cfg, const std::string& weights, const torch::Device& dev);
// Batch-1 decoding of `new_tokens` after a `prompt`-token prefill with the KV cache: tokens/s, prompt tokens/s and
// the memory-bandwidth bound (weight and KV bytes per token over the read bandwidth measured in the same run).
nlohmann::json bench_decode(const Config& cfg, const torch::Device& dev, const std::string& weights, int64_t prompt,
                            int64_t new_tokens);
// The model's forward (and backward with the LM loss when `backward`) on random text of B x T tokens: seconds per
// step over `steps` after one warm-up, tokens/s, and the model-FLOPs utilisation against a GEMM of the compute
// dtype measured in the same run.
nlohmann::json bench_forward(const Config& cfg, const torch::Device& dev, int64_t B, int64_t T, int64_t steps,
                             bool backward);
// Which MoE path the timed work took: the model's layer forwards by path, as {"moe_forwards": {...}} when any.
void add_moe_forwards(nlohmann::json& result, const MoEPathCounts& paths);

}  // namespace omnilite
