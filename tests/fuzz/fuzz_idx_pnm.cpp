// libFuzzer target: the IDX (Fashion-MNIST) and PNM (PGM/PPM) image readers, chosen by the first byte.
#include <stdexcept>

#include "fuzz_common.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/pnm.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  try {
    if (data[0] & 1) (void)omnilite::read_pnm(fuzz::write_input("in.ppm", data + 1, size - 1));
    else (void)omnilite::read_idx(fuzz::write_input("in-idx3-ubyte", data + 1, size - 1));
  } catch (const std::exception&) {
  }
  return 0;
}
