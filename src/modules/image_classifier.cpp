#include "omnilite/modules/image_classifier.h"

namespace omnilite {

ImageClassifierImpl::ImageClassifierImpl(int64_t in_channels, int64_t size, int64_t num_classes) : image_size(size) {
  TORCH_CHECK(size % 4 == 0, "ImageClassifier: image size must be a multiple of 4, got ", size);
  conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, 32, 3).padding(1)));
  conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)));
  fc1 = register_module("fc1", torch::nn::Linear(64 * (size / 4) * (size / 4), 128));
  fc2 = register_module("fc2", torch::nn::Linear(128, num_classes));
}

// [N, C, S, S] -> [N, num_classes]
torch::Tensor ImageClassifierImpl::forward(const torch::Tensor& images) { return fc2->forward(features(images)); }

torch::Tensor ImageClassifierImpl::features(const torch::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(2) == image_size && images.size(3) == image_size,
              "ImageClassifier: expected images [N, C, ", image_size, ", ", image_size, "], got ", images.sizes());
  auto x = torch::max_pool2d(torch::relu(conv1->forward(images)), 2);  // [N, 32, S/2, S/2]
  x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);            // [N, 64, S/4, S/4]
  return torch::relu(fc1->forward(x.flatten(1)));  // [N, 128]
}

}  // namespace omnilite
