// Conversations for supervised fine-tuning (SFT): the record formats, the chat template and the loss mask.
//
// Record formats (a .jsonl file holds one record per line, a .json file an array of records):
//   instruction (Alpaca)      {"instruction": str, "input": str (optional), "output": str}
//                             -> user: instruction, or instruction + "\n\n" + input; assistant: output
//   chat                      {"messages": [{"role": "system" | "user" | "assistant", "content": C}, ...]}
//                             C is a string or a list of parts {"type": "text", "text": str} and
//                             {"type": "image", "image": path}: an image in a user turn is shown to the model, an
//                             image in an assistant turn is drawn by it (the turn then holds that image alone)
//   image conversation (LLaVA) {"image": path, "conversations": [{"from": "system" | "human" | "gpt", "value": str}]}
//                             the "<image>" inside a human value is where the record's image goes (only in this
//                             format: elsewhere "<image>" is plain text)
// Any record may carry "type": a label of its question type, which `omnilite eval --tasks vqa` reports accuracy by.
// Turns: an optional system turn, then user and assistant alternating, starting with user and ending with
// assistant. A record that breaks a rule (a missing field, a role out of order, no assistant turn, an image that
// does not decode) is skipped with a warning naming file:line, and counted.
//
// The chat template (Mistral-Instruct's [INST] format; a system turn is folded into the first user turn):
//   <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>
// The same template ships with both exports as Jinja (chat_template_jinja): transformers' apply_chat_template on the
// HF export and the GGUF's tokenizer.chat_template give exactly encode_chat's ids. Tokenization follows transformers
// (and SentencePiece): the text between special tokens is one piece of text, encoded on its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "omnilite/config.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite {

// One part of a turn's content.
struct ChatPart {
  bool is_image = false;  // an image (shown in a user turn, drawn in an assistant turn) rather than text
  std::string text;       // the text of a text part
  std::string image;      // the image file of an image part (resolved against the image root)
};

struct ChatMessage {
  std::string role;             // "system", "user" or "assistant"
  std::vector<ChatPart> parts;  // the content, in order
};

struct ChatRecord {
  std::vector<ChatMessage> messages;  // system?, user, assistant, user, assistant, ...
  std::string type;                   // the record's "type" label ("" when it has none)
  std::string where;                  // "file:line" (or "file[index]" in a .json array), for messages
};

struct ChatSet {
  std::vector<ChatRecord> records;  // in file order
  int64_t skipped = 0;              // malformed records skipped with a warning
};

// One record, parsed and checked; throws std::runtime_error with the reason (the caller names the place).
// Relative image paths are resolved against image_root.
ChatRecord parse_chat_record(const nlohmann::json& j, const std::string& image_root);

// Reads .json / .jsonl files of records. image_root: the folder of relative image paths ("" = the folder of each
// file). Throws naming a file that cannot be opened or has another extension; bad records are skipped and counted.
ChatSet read_chat_records(const std::vector<std::string>& paths, const std::string& image_root = "");

// The token layout of conversations: the marker ids and the placeholder runs of shown and drawn images.
struct ChatLayout {
  TokenOptions tokens;       // bos/eos and the image markers
  int64_t num_latents = 64;  // image_id placeholders per shown image (resampler.num_latents)
  int64_t gen_tokens = 256;  // gen_image_id placeholders per drawn image (generated_tokens_per_image)
};
ChatLayout chat_layout(const ModelConfig& m);

struct ChatTokens {
  std::vector<int64_t> ids;          // the conversation's ids, BOS first
  std::vector<uint8_t> target;       // per id: 1 where it is a loss target (predicted from the id before it)
  std::vector<std::string> shown;    // the shown images, in the order of their image_id runs
  std::vector<std::string> drawn;    // the drawn images, in the order of their gen_image_id runs
  std::vector<int64_t> answer_start; // per assistant turn: the index of its first id
};

// Renders and tokenizes a conversation. Targets: the ids of every assistant turn and the EOS that ends it; with
// train_on_input, every id after BOS that is not an image placeholder. With add_generation_prompt the
// conversation must end with a user turn and the ids stop where the assistant's answer begins (inference).
ChatTokens encode_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok, const ChatLayout& layout,
                       bool train_on_input = false, bool add_generation_prompt = false);

// The template as Jinja for tokenizer_config.json's chat_template and the GGUF's tokenizer.chat_template.
const std::string& chat_template_jinja();

// The rendered text of a text-only conversation ("<s>" and "</s>" written out), as the Jinja template renders it.
std::string render_chat_text(const std::vector<ChatMessage>& messages, bool add_generation_prompt = false);

}  // namespace omnilite
