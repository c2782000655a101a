#include "omnilite/data/chat.h"

#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/data/mm_batch.h"
#include "omnilite/log.h"

namespace omnilite {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string resolve(const std::string& path, const std::string& root) {
  if (path.empty()) throw std::runtime_error("an image path is empty");
  return fs::path(path).is_absolute() || root.empty() ? path : (fs::path(root) / path).string();
}

const std::string& string_field(const json& j, const char* key, const std::string& what) {
  if (!j.contains(key)) throw std::runtime_error(what + " has no \"" + key + "\"");
  if (!j[key].is_string()) throw std::runtime_error(what + "'s \"" + key + "\" is not a string");
  return j[key].get_ref<const std::string&>();
}

ChatMessage text_message(const std::string& role, const std::string& text) {
  return {role, {ChatPart{false, text, ""}}};
}

// {"role", "content": str | [parts]}
ChatMessage parse_message(const json& m, size_t i, const std::string& root) {
  const std::string what = "message " + std::to_string(i);
  if (!m.is_object()) throw std::runtime_error(what + " is not an object");
  ChatMessage out;
  out.role = string_field(m, "role", what);
  if (!m.contains("content")) throw std::runtime_error(what + " has no \"content\"");
  const auto& c = m["content"];
  if (c.is_string()) return text_message(out.role, c.get<std::string>());
  if (!c.is_array()) throw std::runtime_error(what + "'s \"content\" is neither a string nor a list of parts");
  for (const auto& p : c) {
    if (!p.is_object()) throw std::runtime_error(what + " has a content part that is not an object");
    const std::string& type = string_field(p, "type", what + "'s part");
    if (type == "text") out.parts.push_back({false, string_field(p, "text", what + "'s text part"), ""});
    else if (type == "image") out.parts.push_back({true, "", resolve(string_field(p, "image", what + "'s image part"), root)});
    else throw std::runtime_error(what + " has a part of type \"" + type + "\"; expected \"text\" or \"image\"");
  }
  return out;
}

// LLaVA: {"image"?, "conversations": [{"from", "value"}]}
std::vector<ChatMessage> parse_llava(const json& j, const std::string& root) {
  const auto& conv = j["conversations"];
  if (!conv.is_array()) throw std::runtime_error("\"conversations\" is not a list");
  const bool has_image = j.contains("image");
  const std::string image = has_image ? resolve(string_field(j, "image", "the record"), root) : "";
  static const std::string kTag = "<image>";
  int64_t tags = 0;
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < conv.size(); ++i) {
    const std::string what = "conversations[" + std::to_string(i) + "]";
    if (!conv[i].is_object()) throw std::runtime_error(what + " is not an object");
    const std::string& from = string_field(conv[i], "from", what);
    const std::string& value = string_field(conv[i], "value", what);
    const std::string role = from == "human" || from == "user" ? "user"
                             : from == "gpt" || from == "assistant" ? "assistant"
                             : from == "system" ? "system" : "";
    if (role.empty())
      throw std::runtime_error(what + " is from \"" + from + "\"; expected \"human\", \"gpt\" or \"system\"");
    ChatMessage m{role, {}};
    size_t at = 0;
    for (size_t pos; role == "user" && (pos = value.find(kTag, at)) != std::string::npos; at = pos + kTag.size()) {
      if (pos > at) m.parts.push_back({false, value.substr(at, pos - at), ""});
      m.parts.push_back({true, "", image});
      ++tags;
    }
    if (at < value.size() || m.parts.empty()) m.parts.push_back({false, value.substr(at), ""});
    out.push_back(std::move(m));
  }
  if (has_image && tags != 1)
    throw std::runtime_error("the record has an \"image\" and " + std::to_string(tags) +
                             " \"<image>\" in its human turns; expected exactly one, where the image goes");
  if (!has_image && tags > 0)
    throw std::runtime_error("a human turn holds \"<image>\" but the record has no \"image\"");
  return out;
}

void check_turns(const std::vector<ChatMessage>& msgs) {
  size_t i = 0;
  if (!msgs.empty() && msgs[0].role == "system") {
    for (const auto& p : msgs[0].parts)
      if (p.is_image) throw std::runtime_error("the system turn holds an image");
    i = 1;
  }
  bool any_assistant = false;
  for (size_t k = i; k < msgs.size(); ++k) {
    const std::string want = (k - i) % 2 == 0 ? "user" : "assistant";
    if (msgs[k].role != want)
      throw std::runtime_error("turn " + std::to_string(k) + " is \"" + msgs[k].role + "\" where \"" + want +
                               "\" belongs; hint: an optional system turn, then user and assistant alternating");
    if (want == "assistant") {
      any_assistant = true;
      bool image = false;
      for (const auto& p : msgs[k].parts) image = image || p.is_image;
      if (image && msgs[k].parts.size() != 1)
        throw std::runtime_error("assistant turn " + std::to_string(k) + " mixes a drawn image with other parts; "
                                 "hint: a drawing turn holds the image alone");
    }
  }
  if (!any_assistant) throw std::runtime_error("the record has no assistant turn");
  if (msgs.back().role != "assistant") throw std::runtime_error("the record ends with a user turn, not an answer");
}

// Text, a special id, or an image run, with whether its ids are targets.
struct Segment {
  enum Kind { kText, kId, kShown, kDrawn } kind;
  std::string text;   // kText
  int64_t id = 0;     // kId
  std::string image;  // kShown, kDrawn
  bool target = false;
};

std::string joined_text(const ChatMessage& m) {
  std::string s;
  for (const auto& p : m.parts) s += p.text;
  return s;
}

// The template of chat.h as segments; `text_only` refuses image parts.
std::vector<Segment> render(const std::vector<ChatMessage>& msgs, const ChatLayout& L, bool add_generation_prompt) {
  std::vector<Segment> seg;
  size_t first = 0;
  std::string system;
  if (!msgs.empty() && msgs[0].role == "system") system = joined_text(msgs[0]), first = 1;
  seg.push_back({Segment::kId, "", L.tokens.bos_id, "", false});
  for (size_t k = first; k < msgs.size(); ++k) {
    const auto& m = msgs[k];
    if (m.role == "user") {
      seg.push_back({Segment::kText, "[INST] " + (k == first && !system.empty() ? system + "\n\n" : ""), 0, "", false});
      for (const auto& p : m.parts)
        seg.push_back(p.is_image ? Segment{Segment::kShown, "", 0, p.image, false}
                                 : Segment{Segment::kText, p.text, 0, "", false});
      seg.push_back({Segment::kText, " [/INST]", 0, "", false});
    } else if (m.role == "assistant") {
      if (m.parts.size() == 1 && m.parts[0].is_image) seg.push_back({Segment::kDrawn, "", 0, m.parts[0].image, true});
      else seg.push_back({Segment::kText, " " + joined_text(m), 0, "", true});
      seg.push_back({Segment::kId, "", L.tokens.eos_id, "", true});
    } else {
      throw std::runtime_error("turn " + std::to_string(k) + " has role \"" + m.role + "\"");
    }
  }
  if (add_generation_prompt && (msgs.empty() || msgs.back().role != "user"))
    throw std::runtime_error("a generation prompt needs a conversation that ends with a user turn");
  return seg;
}

}  // namespace

ChatRecord parse_chat_record(const json& j, const std::string& image_root) {
  if (!j.is_object()) throw std::runtime_error("not a JSON object");
  ChatRecord r;
  if (j.contains("type")) {
    if (!j["type"].is_string()) throw std::runtime_error("\"type\" is not a string");
    r.type = j["type"].get<std::string>();
  }
  if (j.contains("messages")) {
    if (!j["messages"].is_array()) throw std::runtime_error("\"messages\" is not a list");
    for (size_t i = 0; i < j["messages"].size(); ++i) r.messages.push_back(parse_message(j["messages"][i], i, image_root));
  } else if (j.contains("conversations")) {
    r.messages = parse_llava(j, image_root);
  } else if (j.contains("instruction")) {
    std::string prompt = string_field(j, "instruction", "the record");
    if (j.contains("input") && !j["input"].is_null()) {
      const std::string& in = string_field(j, "input", "the record");
      if (!in.empty()) prompt += "\n\n" + in;
    }
    r.messages = {text_message("user", prompt), text_message("assistant", string_field(j, "output", "the record"))};
  } else {
    throw std::runtime_error("neither \"messages\", \"conversations\" nor \"instruction\"; hint: docs/training.md "
                             "lists the record formats");
  }
  check_turns(r.messages);
  return r;
}

ChatSet read_chat_records(const std::vector<std::string>& paths, const std::string& image_root) {
  ChatSet out;
  for (const auto& path : paths) {
    const auto ext = std::filesystem::path(path).extension();
    const bool lines = ext == ".jsonl";
    if (!lines && ext != ".json")
      throw std::runtime_error("conversation data \"" + path + "\": unknown extension; expected .json or .jsonl");
    std::ifstream f(path);
    if (!f) throw std::runtime_error("conversation data \"" + path + "\": cannot open");
    const std::string root = image_root.empty() ? fs::path(path).parent_path().string() : image_root;
    auto take = [&](const json& j, const std::string& where) {
      try {
        auto r = parse_chat_record(j, root);
        r.where = where;
        out.records.push_back(std::move(r));
      } catch (const std::exception& e) {
        log::warn("conversation data " + where + ": skipped, " + e.what());
        ++out.skipped;
      }
    };
    if (lines) {
      std::string line;
      for (size_t lineno = 1; std::getline(f, line); ++lineno) {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded()) {
          log::warn(log::format("conversation data %s:%zu: skipped, not valid JSON", path.c_str(), lineno));
          ++out.skipped;
          continue;
        }
        take(j, path + ":" + std::to_string(lineno));
      }
    } else {
      auto j = json::parse(f, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_array())
        throw std::runtime_error("conversation data \"" + path + "\": not a JSON array of records; hint: a .jsonl "
                                 "file holds one record per line");
      for (size_t i = 0; i < j.size(); ++i) take(j[i], path + "[" + std::to_string(i) + "]");
    }
  }
  if (out.skipped > 0)
    log::warn(log::format("conversation data: %lld records skipped", static_cast<long long>(out.skipped)));
  return out;
}

ChatLayout chat_layout(const ModelConfig& m) {
  return {m.tokens, m.resampler.num_latents, generated_tokens_per_image(m)};
}

ChatTokens encode_chat(const std::vector<ChatMessage>& messages, const Tokenizer& tok, const ChatLayout& L,
                       bool train_on_input, bool add_generation_prompt) {
  auto seg = render(messages, L, add_generation_prompt);
  ChatTokens out;
  auto push = [&](int64_t id, bool target) {
    out.ids.push_back(id);
    out.target.push_back(target ? 1 : 0);
  };
  // A run of text segments between special ids is one text, tokenized as a whole (as transformers does); the ids
  // of each segment are what its text adds to the ids of the text before it. Segments of equal target flag merge
  // first, so the only cuts fall where an answer begins: before the space that starts it, where no SentencePiece
  // piece crosses.
  size_t i = 0;
  while (i < seg.size()) {
    if (seg[i].kind != Segment::kText) {
      const auto& s = seg[i++];
      const bool tgt = s.target || (train_on_input && !out.ids.empty());
      if (s.kind == Segment::kId) {
        push(s.id, tgt);
      } else {
        const bool drawn = s.kind == Segment::kDrawn;
        if (drawn) out.answer_start.push_back(static_cast<int64_t>(out.ids.size()));
        push(L.tokens.image_begin_id, tgt);
        const int64_t n = drawn ? L.gen_tokens : L.num_latents;
        for (int64_t k = 0; k < n; ++k) push(drawn ? L.tokens.gen_image_id : L.tokens.image_id, false);
        push(L.tokens.image_end_id, tgt);
        (drawn ? out.drawn : out.shown).push_back(s.image);
      }
      continue;
    }
    std::vector<std::pair<std::string, bool>> runs;  // merged text runs of one flag
    for (; i < seg.size() && seg[i].kind == Segment::kText; ++i) {
      const bool tgt = seg[i].target || train_on_input;
      if (!runs.empty() && runs.back().second == tgt) runs.back().first += seg[i].text;
      else runs.emplace_back(seg[i].text, tgt);
    }
    std::string text;
    std::vector<int64_t> before;
    for (const auto& [piece, tgt] : runs) {
      text += piece;
      auto ids = tok.encode(text);
      if (ids.size() < before.size() || !std::equal(before.begin(), before.end(), ids.begin()))
        throw std::runtime_error("chat template: the text \"" + text.substr(0, 60) + "\" does not tokenize as its "
                                 "parts do; hint: an answer should not start inside a word");
      if (tgt && !train_on_input) out.answer_start.push_back(static_cast<int64_t>(out.ids.size()));
      for (size_t k = before.size(); k < ids.size(); ++k) push(ids[k], tgt);
      before = std::move(ids);
    }
  }
  return out;
}

const std::string& chat_template_jinja() {
  static const std::string t =
      "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
      "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = '' %}"
      "{%- set loop_messages = messages %}{%- endif %}"
      "{{- bos_token }}"
      "{%- for message in loop_messages %}"
      "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
      "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
      "{%- if message['role'] == 'user' %}"
      "{%- if loop.first and system_message != '' %}"
      "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
      "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
      "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
      "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
      "{%- endfor %}";
  return t;
}

std::string render_chat_text(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  ChatLayout L;
  std::string s;
  for (const auto& g : render(messages, L, add_generation_prompt)) {
    if (g.kind == Segment::kText) s += g.text;
    else if (g.kind == Segment::kId) s += g.id == L.tokens.bos_id ? "<s>" : "</s>";
    else throw std::runtime_error("render_chat_text: the conversation holds an image");
  }
  return s;
}

}  // namespace omnilite
