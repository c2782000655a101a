// A small content hash for identities that are compared, not secured: config hashes, checkpoint headers.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace omnilite {

// 64-bit FNV-1a hash of a text as 16 hex digits (eval.json's config_hash, a base checkpoint's header hash).
inline std::string fnv1a_hex(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (const char c : text) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace omnilite
