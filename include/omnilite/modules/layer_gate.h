// Parameters that live elsewhere between uses (ZeRO-3, include/omnilite/train/zero.h): a block's parameters (a decoder
// layer, a ViT block) are materialised just before the block runs (its forward, and again for its backward) and
// released afterwards. The text decoder and the vision encoder call their gate around every block, with the block's
// index; with a gate and gradients on, each block recomputes its forward in backward (as with activation
// checkpointing), so that its parameters need not stay gathered until then.
#pragma once

#include <cstddef>

namespace omnilite {

class LayerGate {
 public:
  virtual ~LayerGate() = default;
  // Before block `block` runs: its parameters hold their full values.
  virtual void gather(size_t block) = 0;
  // Block `block` is likely to run next (the next in a forward, the previous in a backward): its gathering may start
  // now, while the current block computes. A block that does not exist is ignored.
  virtual void prefetch(size_t block) {}
  // After its forward (or a forward without gradients): its parameters are released.
  virtual void release(size_t block) = 0;
  // After its backward (one per forward with gradients): its parameters' .grad are handed over (summed over ranks into
  // their owners' shards) and the parameters released.
  virtual void after_backward(size_t block) = 0;
};

}  // namespace omnilite
