// Catch2 v2 (Debian 12: catch2 2.13) or v3 (Debian 13, Ubuntu 24.04: catch2 3.x), whichever is installed. The
// tests use `Approx`, `ContainsText`, `OMNILITE_SKIP` and `Catch::Session` through this header only.
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

// Marks the running test as skipped, saying why: Catch2 >= 3.3 ends it with SKIP (ctest then reports "Skipped");
// older versions have no skip, so this is a warning and the caller returns (the test counts as passed).
#if CATCH_VERSION_MAJOR > 3 || (CATCH_VERSION_MAJOR == 3 && CATCH_VERSION_MINOR >= 3)
#define OMNILITE_SKIP(why) SKIP(why)
#else
#define OMNILITE_SKIP(why) WARN(why)
#endif
