// libFuzzer target: the safetensors header parser on any bytes, and for a file it accepts, the reader (mmap,
// checksum, every tensor loaded): what the format's checks let through must be safe to read.
#include <stdexcept>

#include "fuzz_common.h"
#include "omnilite/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    omnilite::io::parse_safetensors(data, size, "fuzz");
  } catch (const std::exception&) {
    return 0;
  }
  try {
    omnilite::io::SafetensorsReader r(fuzz::write_input("in.safetensors", data, size));
    r.verify_checksum();
    for (const auto& [name, e] : r.tensors()) {
      if (e.end - e.begin > (64u << 20)) continue;  // a valid header may declare large tensors; the bytes are there
      auto t = r.load(name);
      (void)t;
    }
  } catch (const std::exception&) {
  }
  return 0;
}
