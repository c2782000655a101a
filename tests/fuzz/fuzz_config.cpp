// libFuzzer target: the config parser. The input's first line is the config JSON, each further line one `--set`
// assignment; everything goes through read-like parsing (extends aside), overrides and validation.
#include <sstream>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "omnilite/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::istringstream in(text);
  std::string first;
  std::getline(in, first);
  auto j = nlohmann::json::parse(first, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  try {
    for (std::string line; std::getline(in, line);) omnilite::apply_config_override(j, line);
    const auto cfg = omnilite::parse_config(j);
    (void)omnilite::parse_config(omnilite::to_json(cfg));  // what it writes, it reads back
  } catch (const std::exception&) {
  }
  return 0;
}
