// Subcommands of the `omnilite` program. Each takes the arguments after its name (argv[0] = "omnilite NAME")
// and returns the process exit code.
#pragma once

#include <string>

#include <cxxopts.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite::cli {

int run_info(int argc, char** argv);
int run_bench(int argc, char** argv);
int run_tokenizer(int argc, char** argv);
int run_train(int argc, char** argv);
int run_eval(int argc, char** argv);
int run_compare(int argc, char** argv);
int run_init(int argc, char** argv);
int run_export(int argc, char** argv);
int run_memory(int argc, char** argv);
int run_generate(int argc, char** argv);
int run_score(int argc, char** argv);
int run_caption(int argc, char** argv);
int run_imagine(int argc, char** argv);
int run_data(int argc, char** argv);
int run_chat(int argc, char** argv);
int run_embed(int argc, char** argv);

// The flags of every command that reads one checkpoint: --checkpoint (`accepts` says which folders), --device,
// --adapter, the thread flags and -h/--help.
void add_checkpoint_flags(cxxopts::Options& opts, const std::string& accepts);
// --threads and --blas-threads (the thread split: never more threads in all than cores), and their use: each given
// one overrides runtime.threads / runtime.blas_threads.
void add_thread_flags(cxxopts::Options& opts);
void apply_thread_flags(const cxxopts::ParseResult& args, RuntimeOptions& rt);

// "bf16" / "fp32" -> ScalarType; throws naming the flag and the value otherwise.
torch::ScalarType parse_storage_dtype(const std::string& flag, const std::string& value);
}  // namespace omnilite::cli
