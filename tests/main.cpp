// Catch2 test runner. Tests use one intra-op thread so that results do not depend on the machine's core count.
#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file holds the implementation and our own main
#include "catch_compat.h"
#include <torch/torch.h>

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  return Catch::Session().run(argc, argv);
}
