// omnilite: command-line entry point. `omnilite SUBCOMMAND [options]`; `omnilite SUBCOMMAND --help` for each.
#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

#include "omnilite/cli/commands.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(int, char**);
};

const std::vector<Subcommand>& subcommands() {
  static const std::vector<Subcommand> list = {
      {"info", "parameter table, totals, active parameters per token and weight memory of a config or the card",
       omnilite::cli::run_info},
      {"bench", "measure throughput: fp32 matmul GFLOP/s, model tokens/s forward or forward+backward",
       omnilite::cli::run_bench},
      {"train", "train from a config: the model (text, captions, image generation), the VQ-VAE or the judge "
                "classifier; metrics.jsonl, atomic checkpoints, exact resume",
       omnilite::cli::run_train},
      {"eval", "evaluation tasks ppl, caption (accuracy, BLEU-4), t2i (accuracy, Frechet), recon, moe; PNG reports",
       omnilite::cli::run_eval},
      {"compare", "several runs' eval.json side by side and their training curves in one PNG", omnilite::cli::run_compare},
      {"init", "write a full-size randomly initialised checkpoint piece by piece (a QLoRA base)",
       omnilite::cli::run_init},
      {"export", "merge QLoRA adapters into their dequantised NF4 base, or re-store a checkpoint's weights",
       omnilite::cli::run_export},
      {"memory", "estimate training memory: NF4 weights, LoRA, gradients, AdamW, activations with/without "
                 "checkpointing", omnilite::cli::run_memory},
      {"generate", "continue a text prompt (KV-cached; temperature, top-k, top-p, seed), streamed to stdout",
       omnilite::cli::run_generate},
      {"caption", "describe an image file (ViT + resampler, greedy KV-cached decoding)", omnilite::cli::run_caption},
      {"embed", "image features: the vision encoder's tokens and the resampler's image tokens, into a safetensors "
                "file", omnilite::cli::run_embed},
      {"imagine", "generate an image from a prompt (rectified flow, Euler + CFG, cached prompt) into a PNG",
       omnilite::cli::run_imagine},
      {"score", "per-token log-probabilities of a text or token ids (--json)", omnilite::cli::run_score},
      {"chat", "a conversation in the terminal under the chat template (streamed, KV cache kept, /image, /draw)",
       omnilite::cli::run_chat},
      {"data", "data preparation: the fine-tuning quickstart's SFT set (sft-demo)", omnilite::cli::run_data},
      {"tokenizer", "train a SentencePiece tokenizer with the image markers reserved, or encode text with one",
       omnilite::cli::run_tokenizer},
  };
  return list;
}

// An error message as one line: line breaks (LibTorch's, nlohmann's) become "; ", trailing ones are dropped.
// With OMNILITE_BACKTRACE=1 the message is kept as it is, backtrace included.
bool backtrace_requested() {
  const char* bt = std::getenv("OMNILITE_BACKTRACE");
  return bt && std::string(bt) != "0";
}

std::string one_line(const std::string& msg) {
  if (backtrace_requested()) return msg;
  std::string out;
  for (char c : msg) {
    if (c == '\n') {
      if (!out.empty() && out.back() != ' ') out += "; ";
    } else {
      out += c;
    }
  }
  while (!out.empty() && (out.back() == ' ' || out.back() == ';')) out.pop_back();
  return out;
}

void print_usage(std::ostream& os) {
  os << "OMNI-LITE: train, fine-tune, run and evaluate the unified sparse multimodal transformer.\n\n"
        "Usage: omnilite SUBCOMMAND [options]\n\nSubcommands:\n";
  for (const auto& s : subcommands()) os << "  " << s.name << std::string(10 - std::strlen(s.name), ' ') << s.summary << "\n";
  os << "\nRun `omnilite SUBCOMMAND --help` for the options of one subcommand.\n";
}

}  // namespace

int main(int argc, char** argv) {
  // glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh mmap()s and returns them
  // on free, so every large activation ([T, T] attention scores, logits) is paid again in page faults each step
  // (a fifth of the CPU time of a full-size QLoRA step, measured: docs/benchmarks.md). Keep blocks up to 1 GiB in
  // the heap and do not trim it eagerly: freed activations are reused by the next step.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    print_usage(std::cout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  for (const auto& s : subcommands()) {
    if (name != s.name) continue;
    std::string prog = std::string("omnilite ") + s.name;
    std::vector<char*> args{prog.data()};
    for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
    try {
      return s.run(static_cast<int>(args.size()), args.data());
    } catch (const c10::Error& e) {
      // LibTorch's checks carry a C++ backtrace ("Exception raised from ...", "frame #8: ..."): users get the
      // message alone, developers the whole of it with OMNILITE_BACKTRACE=1.
      std::cerr << "omnilite " << name << ": error: "
                << one_line(backtrace_requested() ? e.what() : e.what_without_backtrace()) << "\n";
      return 1;
    } catch (const std::exception& e) {
      std::cerr << "omnilite " << name << ": error: " << one_line(e.what()) << "\n";
      return 1;
    }
  }
  std::cerr << "omnilite: unknown subcommand \"" << name << "\"\n\n";
  print_usage(std::cerr);
  return 2;
}
