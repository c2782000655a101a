#include "omnilite/eval/vqa.h"

#include <cctype>
#include <chrono>
#include <map>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "omnilite/files.h"
#include "omnilite/data/chat.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/infer/generate.h"
#include "omnilite/log.h"

namespace omnilite {

std::string normalize_answer(const std::string& s) {
  std::string t;
  for (unsigned char c : s) t += std::ispunct(c) ? ' ' : static_cast<char>(std::tolower(c));
  std::stringstream words(t);
  std::string w, out;
  while (words >> w)
    if (w != "a" && w != "an" && w != "the") out += (out.empty() ? "" : " ") + w;
  return out;
}

void vqa_task(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, const VqaOptions& o, nlohmann::json& out) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto set = read_chat_records(o.data);
  const auto layout = chat_layout(cfg.model);
  const auto dev = model.text->embed_tokens->weight.device();
  const auto fdt = model.text->embed_tokens->weight.scalar_type();
  std::map<std::string, std::pair<int64_t, int64_t>> by_type;  // type -> (right, asked)
  int64_t right = 0, asked = 0, skipped = set.skipped;
  std::unique_ptr<AtomicFile> answers;  // vqa_answers.jsonl, complete or absent
  if (!o.answers_file.empty()) answers = std::make_unique<AtomicFile>(o.answers_file);
  for (const auto& r : set.records) {
    for (size_t k = 0; k < r.messages.size(); ++k) {
      const auto& answer = r.messages[k];
      if (answer.role != "assistant" || answer.parts.empty() || answer.parts[0].is_image) continue;
      if (o.max_questions > 0 && asked >= o.max_questions) break;
      std::vector<ChatMessage> prompt(r.messages.begin(), r.messages.begin() + static_cast<std::ptrdiff_t>(k));
      std::string reference;
      for (const auto& p : answer.parts) reference += p.text;
      try {
        const auto t = encode_chat(prompt, tok, layout, false, /*add_generation_prompt=*/true);
        if (!t.drawn.empty()) throw std::runtime_error("the conversation before the answer draws an image");
        torch::Tensor images;
        if (!t.shown.empty()) {
          std::vector<torch::Tensor> raw;
          for (const auto& p : t.shown) raw.push_back(load_image(p, cfg.model.vision.image_size));
          images = to_model_images(torch::stack(raw), cfg.model.vision.image_size, cfg.model.vision.in_channels)
                       .to(dev, fdt);
        }
        auto prefix = torch::tensor(t.ids, torch::kInt64).view({1, -1});
        const auto ids = ids_before_eos(greedy_generate(model, prefix, images, o.max_answer_tokens)[0], cfg.model.tokens);
        const std::string said = tok.decode(ids);
        const bool ok = normalize_answer(said) == normalize_answer(reference);
        right += ok;
        ++asked;
        auto& bt = by_type[r.type.empty() ? "all" : r.type];
        bt.first += ok;
        ++bt.second;
        if (answers)
          answers->write(nlohmann::json{{"where", r.where}, {"type", r.type}, {"answer", said},
                                        {"reference", reference}, {"correct", ok}}.dump() + "\n");
      } catch (const std::exception& e) {
        log::warn("eval vqa: " + r.where + ": skipped, " + e.what());
        ++skipped;
      }
      if (asked > 0 && asked % 200 == 0)
        log::info(log::format("eval vqa: %lld questions, accuracy %.3f so far", static_cast<long long>(asked),
                              static_cast<double>(right) / static_cast<double>(asked)));
    }
  }
  if (asked == 0)
    throw std::runtime_error("eval vqa: no question to score in " + std::to_string(o.data.size()) + " file(s) (" +
                             std::to_string(skipped) + " skipped); hint: records need an assistant answer in text");
  out["vqa_accuracy"] = static_cast<double>(right) / static_cast<double>(asked);
  out["vqa_questions"] = asked;
  out["vqa_skipped"] = skipped;
  nlohmann::json types = nlohmann::json::object();
  for (const auto& [type, c] : by_type)
    types[type] = {{"accuracy", static_cast<double>(c.first) / static_cast<double>(c.second)}, {"questions", c.second}};
  out["vqa_by_type"] = types;
  if (answers) {
    answers->commit();
    out["vqa_answers"] = o.answers_file;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::string per;
  for (const auto& [type, c] : by_type)
    per += log::format(", %s %.3f", type.c_str(), static_cast<double>(c.first) / static_cast<double>(c.second));
  log::info(log::format("eval: vqa_accuracy %.3f over %lld questions%s (%.0fs)", out["vqa_accuracy"].get<double>(),
                        static_cast<long long>(asked), per.c_str(), secs));
}

}  // namespace omnilite
