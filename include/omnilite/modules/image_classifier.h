// Image classifier that judges generated images in `omnilite eval` (t2i_accuracy). Not part of the model: a small
// CNN trained by `omnilite train` with train.stage = "classifier" on the labelled training images, at the
// VQ-VAE's image size (the size images are generated at).
//   conv1 (C -> 32, 3x3) ReLU MaxPool2 -> conv2 (32 -> 64, 3x3) ReLU MaxPool2 -> fc1 (64 (S/4)^2 -> 128) ReLU
//   -> fc2 (128 -> num_classes)
#pragma once

#include <torch/torch.h>

namespace omnilite {

struct ImageClassifierImpl : torch::nn::Module {
  ImageClassifierImpl(int64_t in_channels, int64_t image_size, int64_t num_classes);
  // images: [N, C, S, S] in [-1, 1] -> logits [N, num_classes]
  torch::Tensor forward(const torch::Tensor& images);
  // images: [N, C, S, S] -> the 128 features after fc1 and ReLU (eval's Fréchet distance uses them)
  torch::Tensor features(const torch::Tensor& images);
  int64_t image_size;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ImageClassifier);

}  // namespace omnilite
