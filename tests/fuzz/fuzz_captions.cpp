// libFuzzer target: the image-caption readers, a .jsonl list (first byte even) or a COCO captions .json (odd).
// The folder holds a.ppm and b.pgm, so that lines naming them reach the image path.
#include <stdexcept>

#include <torch/torch.h>

#include "fuzz_common.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/pnm.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  omnilite::write_ppm(fuzz::work_dir() + "/a.ppm", torch::full({4, 4, 3}, 7, torch::kUInt8));
  fuzz::write_input("b.pgm", reinterpret_cast<const uint8_t*>("P2 2 1 255 1 2"), 14);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool coco = data[0] & 1;
  omnilite::ImageLoadOptions o;
  o.size = 8;
  try {
    const auto path = fuzz::write_input(coco ? "in.json" : "in.jsonl", data + 1, size - 1);
    (void)omnilite::read_image_captions({path}, o);
  } catch (const std::exception&) {
  }
  return 0;
}
