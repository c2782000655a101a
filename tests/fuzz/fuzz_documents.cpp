// libFuzzer target: the training-text readers: a fortune-format .txt (first byte even) or a .jsonl of
// {"text": ...} lines (odd), read into documents.
#include <stdexcept>

#include "fuzz_common.h"
#include "omnilite/data/text_dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  try {
    const auto path = fuzz::write_input((data[0] & 1) ? "in.jsonl" : "in.txt", data + 1, size - 1);
    const auto docs = omnilite::read_documents({path});
    (void)docs;
  } catch (const std::exception&) {
  }
  return 0;
}
