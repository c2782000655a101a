// Name patterns for parameters and modules: '*' matches any run of characters ("text.layers.*.moe.gate.*").
// Used by train.freeze, lora.target_modules and lora.full_precision.
#pragma once

#include <string>
#include <vector>

namespace omnilite {

// True when `name` matches `pattern` as a whole.
bool matches_pattern(const std::string& name, const std::string& pattern);
// True when `name` matches one of the patterns.
bool matches_any(const std::string& name, const std::vector<std::string>& patterns);
// The same pattern as a regular expression for a full match (PEFT's target_modules string form).
std::string pattern_to_regex(const std::string& pattern);

}  // namespace omnilite
