// ZeRO stage 1 (Rajbhandari et al., 2020) for data-parallel runs (train.zero1): the AdamW state is sharded across
// ranks. Gradients are still summed over all ranks (distributed.h); each rank then steps only the parameters it
// owns, with their exp_avg / exp_avg_sq, and broadcasts them to the other ranks. The state per rank shrinks to
// about 1/W of it; the update is the same as without sharding.
//
// Checkpoints keep the unsharded format (optimizer.pt of an AdamW over all trainable parameters): the owners' states
// are gathered into rank 0's full optimizer before it writes, and on resume every rank reads the file and keeps its
// own parameters' states. So a ZeRO-1 run resumes with or without ZeRO-1, at any world size.
#pragma once

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "omnilite/train/distributed.h"

namespace omnilite {

class Zero1 {
 public:
  // `params`: the trainable parameters in the full optimizer's order. Owners are assigned greedily, largest first,
  // to the least-loaded rank (the same on every rank).
  Zero1(std::shared_ptr<Dist> dist, std::vector<torch::Tensor> params);

  // Whether this rank steps params[i].
  bool owns(size_t i) const { return owner_[i] == dist_->rank(); }
  bool owns(const torch::Tensor& p) const;
  // Elements of the parameters this rank owns, and of all.
  int64_t owned_numel() const;
  int64_t total_numel() const;

  // After the owners' optimizer step: every parameter takes its owner's values.
  void broadcast_params();
  // Collective: the owners' AdamW states (of `sharded`) into rank 0's `full` (an AdamW over all parameters), which
  // rank 0 then writes; clear full.state() afterwards. Other ranks' `full` stays empty.
  void gather_state(torch::optim::AdamW& sharded, torch::optim::AdamW& full);
  // The states of this rank's parameters move from `full` (just read from a checkpoint) into `sharded`; the rest of
  // `full`'s state is dropped.
  void take_state(torch::optim::AdamW& full, torch::optim::AdamW& sharded);

 private:
  std::shared_ptr<Dist> dist_;
  std::vector<torch::Tensor> params_;
  std::vector<int64_t> owner_;                 // per parameter: its rank
  std::vector<std::vector<size_t>> owned_by_;  // per rank: its parameters' indices, in order
};

}  // namespace omnilite
