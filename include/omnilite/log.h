// Progress and event logging (spdlog underneath). The messages are formatted by the caller with log::format
// (printf-style), so that spdlog and its fmt are confined to src/log.cpp: a PyTorch-bundled LibTorch ships its own
// fmt headers, which clash with the system spdlog's fmt when both reach one translation unit.
#pragma once

#include <string>

namespace omnilite::log {

void info(const std::string& msg);
void warn(const std::string& msg);
// In data-parallel runs: rank 0 logs as usual; any other rank logs only warnings, prefixed "rank N: ".
void set_rank(long long rank);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace omnilite::log
