// Shared by the libFuzzer targets: inputs that a reader takes by path are written to a file in a private temp
// folder first. Every target calls one reader on arbitrary bytes; a reader may throw std::exception (that is the
// expected answer to bad input) but must not crash, leak, read out of bounds or hang (AddressSanitizer and
// UndefinedBehaviorSanitizer watch).
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace fuzz {

// A folder of this process for the inputs' files.
inline const std::string& work_dir() {
  static const std::string dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("omnilite_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

// Writes `size` bytes to work_dir()/name and returns the path.
inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = work_dir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                 static_cast<std::streamsize>(size));
  return path;
}

}  // namespace fuzz
