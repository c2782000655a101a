// omnilite tokenizer: train a SentencePiece model with OMNI-LITE's reserved image markers, or encode text.
#include <iostream>

#include <cxxopts.hpp>

#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/data/chat.h"
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
      "chat", "encode: a .json / .jsonl file of conversations (docs/training.md): one JSON line per record with its "
      "ids under the chat template and its loss targets", cxxopts::value<std::string>())(
      "generation-prompt", "encode --chat: drop each record's last answer and end at the prompt of the next one",
      cxxopts::value<bool>()->default_value("false"))(
      "train-on-input", "encode --chat: targets on every token, not only the answers",
      cxxopts::value<bool>()->default_value("false"))(
      "config", "encode --chat: the config whose model.tokens and image sizes lay out the ids (default: the full "
      "model's)", cxxopts::value<std::string>())(
      "h,help", "show this help");
  opts.parse_positional({"action"});
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("action")) {
    std::cout << opts.help()
              << "\nExamples:\n  omnilite tokenizer train --input data/generated/text/train.jsonl --vocab-size 4096 "
                 "--out data/generated/tokenizer.model\n  omnilite tokenizer encode --model data/generated/tokenizer.model "
                 "--text \"a pair of trousers\"\n  omnilite tokenizer encode --model data/generated/tokenizer.model "
                 "--chat data/generated/sft/train.jsonl\n";
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
    if (!args.count("model") || !(args.count("text") || args.count("chat")))
      throw std::runtime_error("tokenizer encode: --model FILE and --text TEXT (or --chat FILE) are required");
    Tokenizer tok(args["model"].as<std::string>());
    if (args.count("chat")) {
      const ModelConfig m = args.count("config") ? load_config_file(args["config"].as<std::string>()).model
                                                 : ModelConfig();
      const bool prompt = args["generation-prompt"].as<bool>();
      for (const auto& r : read_chat_records({args["chat"].as<std::string>()}).records) {
        auto msgs = r.messages;
        if (prompt) msgs.pop_back();
        const auto t = encode_chat(msgs, tok, chat_layout(m), args["train-on-input"].as<bool>(), prompt);
        std::cout << nlohmann::json{{"where", r.where}, {"ids", t.ids}, {"targets", t.target}}.dump() << "\n";
      }
      return 0;
    }
    const auto ids = tok.encode(args["text"].as<std::string>());
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n" << tok.decode(ids) << "\n";
    return 0;
  }
  throw std::runtime_error("tokenizer: unknown action \"" + action + "\"; expected train or encode");
}

}  // namespace omnilite::cli
