// The only translation unit that includes spdlog (see include/omnilite/log.h).
#include "omnilite/log.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace omnilite::log {

namespace {
long long g_rank = 0;  // this process's data-parallel rank
// OMNILITE_LOG_LEVEL: "info" (default), "warn" (warnings only) or "off" (nothing; the fuzz targets), read once.
int quiet_level() {
  static const int level = [] {
    const char* e = std::getenv("OMNILITE_LOG_LEVEL");
    const std::string v = e ? e : "";
    return v == "off" ? 2 : v == "warn" ? 1 : 0;
  }();
  return level;
}

// Progress goes to stderr, so that what a command prints on stdout (--json, scores, generated text) is its result
// alone and can be piped.
spdlog::logger& logger() {
  static const std::shared_ptr<spdlog::logger> l = [] {
    auto made = spdlog::stderr_color_mt("omnilite");
    made->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");  // spdlog's default look, without the logger's name
    return made;
  }();
  return *l;
}
}  // namespace

void set_rank(long long rank) { g_rank = rank; }

void info(const std::string& msg) {
  if (g_rank == 0 && quiet_level() < 1) logger().info("{}", msg);
}
void warn(const std::string& msg) {
  if (quiet_level() >= 2) return;
  if (g_rank == 0) logger().warn("{}", msg);
  else logger().warn("rank {}: {}", g_rank, msg);
}

std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::vector<char> buf(static_cast<size_t>(n > 0 ? n : 0) + 1);
  std::vsnprintf(buf.data(), buf.size(), fmt, args);
  va_end(args);
  return std::string(buf.data(), static_cast<size_t>(n > 0 ? n : 0));
}

}  // namespace omnilite::log
