#include "omnilite/pattern.h"

namespace omnilite {

bool matches_pattern(const std::string& name, const std::string& pattern) {
  // Iterative wildcard match: '*' spans any run of characters.
  size_t n = 0, p = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == name[n]) {
      ++n;
      ++p;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

bool matches_any(const std::string& name, const std::vector<std::string>& patterns) {
  for (const auto& p : patterns)
    if (matches_pattern(name, p)) return true;
  return false;
}

std::string pattern_to_regex(const std::string& pattern) {
  std::string out;
  for (char c : pattern) {
    if (c == '*') out += ".*";
    else if (std::string("\\^$.|?+()[]{}").find(c) != std::string::npos) out += std::string("\\") + c;
    else out += c;
  }
  return out;
}

}  // namespace omnilite
