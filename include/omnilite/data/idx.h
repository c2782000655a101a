// IDX files (the MNIST / Fashion-MNIST format): big-endian magic 0x00000803 (uint8 images [N, rows, cols]) or
// 0x00000801 (uint8 labels [N]), then the dimensions, then the bytes.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

namespace omnilite {

// path -> uint8 tensor [N, rows, cols] (images) or [N] (labels). Throws naming the file for a wrong magic number
// or a file shorter than its header says (truncated).
torch::Tensor read_idx(const std::string& path);

// The ten Fashion-MNIST classes, in label order.
const std::vector<std::string>& fashion_mnist_classes();

// Caption of an image of class `label`, using template `variant` (mod the number of templates), e.g.
// "a photo of a pullover." Templates let the model learn the class word rather than one fixed string.
std::string fashion_caption(int64_t label, int64_t variant);
int64_t fashion_caption_templates();

}  // namespace omnilite
