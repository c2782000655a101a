// omnilite tokenizer: train a SentencePiece model with OMNI-LITE's reserved image markers, or encode text.
#include <iostream>

#include <cxxopts.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite::cli {

int run_tokenizer(int argc, char** argv) {
  cxxopts::Options opts(argv[0],
                        "Train a SentencePiece tokenizer (ACTION train) or encode/decode text with one (ACTION encode). "
                        "Trained models reserve ids 0 <unk>, 1 <s>, 2 </s>, 3 <image>, 4 <image_begin>, 5 <image_end>, "
                        "6 <gen_image> (the defaults of model.tokens; the markers are control symbols, never read from text) and fall "
                        "back to bytes for unseen characters. The default is byte-fallback BPE with Llama's trainer "
                        "settings, which transformers and llama.cpp split exactly as SentencePiece does.");
  opts.positional_help("ACTION");
  opts.add_options()("action", "train | encode", cxxopts::value<std::string>())(
      "input", "train: text files, .txt (one sentence per line) or .jsonl ({\"text\": ...}); repeat or comma-separate",
      cxxopts::value<std::vector<std::string>>())(
      "vocab-size", "train: pieces in the model", cxxopts::value<int64_t>()->default_value("4096"))(
      "model-type", "train: bpe (byte-fallback BPE as Llama and Mistral ship it) or unigram",
      cxxopts::value<std::string>()->default_value("bpe"))(
      "seed", "train: sampling seed", cxxopts::value<uint64_t>()->default_value("1234"))(
      "out", "train: output .model path (its .vocab is written beside it)", cxxopts::value<std::string>())(
      "model", "encode: the SentencePiece .model to use", cxxopts::value<std::string>())(
      "text", "encode: text to encode; the ids and the decoded text are printed", cxxopts::value<std::string>())(
      "h,help", "show this help");
  opts.parse_positional({"action"});
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("action")) {
    std::cout << opts.help()
              << "\nExamples:\n  omnilite tokenizer train --input data/generated/text/train.jsonl --vocab-size 4096 "
                 "--out data/generated/tokenizer.model\n  omnilite tokenizer encode --model data/generated/tokenizer.model "
                 "--text \"a pair of trousers\"\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string action = args["action"].as<std::string>();
  if (action == "train") {
    if (!args.count("input") || !args.count("out"))
      throw std::runtime_error("tokenizer train: --input FILE... and --out FILE are required");
    TokenizerTrainOptions o;
    o.inputs = args["input"].as<std::vector<std::string>>();
    o.vocab_size = args["vocab-size"].as<int64_t>();
    o.model_type = args["model-type"].as<std::string>();
    o.seed = args["seed"].as<uint64_t>();
    const std::string out = train_tokenizer(o, args["out"].as<std::string>());
    Tokenizer tok(out);
    std::cout << "wrote " << out << " (" << tok.vocab_size() << " pieces)\n";
    return 0;
  }
  if (action == "encode") {
    if (!args.count("model") || !args.count("text"))
      throw std::runtime_error("tokenizer encode: --model FILE and --text TEXT are required");
    Tokenizer tok(args["model"].as<std::string>());
    const auto ids = tok.encode(args["text"].as<std::string>());
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n" << tok.decode(ids) << "\n";
    return 0;
  }
  throw std::runtime_error("tokenizer: unknown action \"" + action + "\"; expected train or encode");
}

}  // namespace omnilite::cli
