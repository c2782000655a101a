// Catch2 v2 (Debian 12: catch2 2.13) or v3 (Debian 13, Ubuntu 24.04: catch2 3.x), whichever is installed. The
// tests use `Approx`, `ContainsText` and `Catch::Session` through this header only.
#pragma once

#include <string>

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
using Catch::Approx;
// A matcher for strings that contain `s` (v3's ContainsSubstring, v2's Contains).
inline auto ContainsText(const std::string& s) { return Catch::Matchers::ContainsSubstring(s); }
#else
#include <catch2/catch.hpp>
inline auto ContainsText(const std::string& s) { return Catch::Matchers::Contains(s); }
#endif
