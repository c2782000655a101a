// `omnilite eval --tasks vqa --data FILE`: questions about images (LLaVA records, or any conversation format of
// data/chat.h), each answered greedily under the chat template from the gold conversation before it, and scored by
// exact match after normalisation (VQA's rule: case, punctuation and the articles a / an / the do not count).
// Accuracy overall and per record "type" (the question type) go into eval.json; every answer into vqa_answers.jsonl.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "omnilite/config.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite {

// Lower case, punctuation to spaces, the articles a / an / the dropped, whitespace runs collapsed and trimmed:
// "The Sneaker." -> "sneaker".
std::string normalize_answer(const std::string& s);

struct VqaOptions {
  std::vector<std::string> data;  // .json / .jsonl conversation files
  int64_t max_questions = 1000;   // answers scored at most (0 = all)
  int64_t max_answer_tokens = 16; // longest generated answer
  std::string answers_file;       // where every question, answer and reference go as JSON lines ("" = none)
};

// Writes vqa_accuracy, vqa_questions, vqa_skipped and vqa_by_type ({type: {accuracy, questions}}) into `out`.
void vqa_task(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, const VqaOptions& o, nlohmann::json& out);

}  // namespace omnilite
