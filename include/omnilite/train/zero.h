// ZeRO (Rajbhandari et al., 2020) for data-parallel runs (train.zero = 1, 2, 3): Zero1 below, ZeroShards further down.
//
// Stage 1 (train.zero = 1, or the older train.zero1): the AdamW state is sharded across
// ranks. Gradients are still summed over all ranks (distributed.h); each rank then steps only the parameters it
// owns, with their exp_avg / exp_avg_sq, and broadcasts them to the other ranks. The state per rank shrinks to
// about 1/W of it; the update is the same as without sharding.
//
// Checkpoints keep the unsharded format (optimizer.pt of an AdamW over all trainable parameters): the owners' states
// are gathered into rank 0's full optimizer before it writes, and on resume every rank reads the file and keeps its
// own parameters' states. So a ZeRO-1 run resumes with or without ZeRO-1, at any world size.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/modules/layer_gate.h"
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

// The omni model's block lists that ZeRO-3 gathers block by block (TrainStage::block_lists): the decoder layers
// always; the ViT blocks and the resampler's attention and feed-forward layers when every rank's micro-batch holds the
// same number of input images, which conversation rows (train.sft_batch_size > 0), some with an image and some
// without, do not promise.
std::vector<std::string> omni_block_lists(const TrainOptions& tr);
// N of a parameter named "<prefix>N.<...>", else -1.
int64_t block_index(const std::string& name, const std::string& prefix);

// AdamW over two groups: `decay` with the weight decay of `opts`, `no_decay` with none (the trainer's rule decides
// which is which, for parameters or, under ZeRO-2/3, for their pieces).
std::unique_ptr<torch::optim::AdamW> make_adamw(std::vector<torch::Tensor> decay, std::vector<torch::Tensor> no_decay,
                                                const torch::optim::AdamWOptions& opts);

// What a rank holds for training, in bytes of distinct storages (a view counts with its base once): the trainable
// parameters (and `extra_weights`), their .grad (and `extra_grads`) and the AdamW moments of `opt`.
struct HeldBytes {
  double weights = 0, grads = 0, optimizer = 0;
  double total() const { return weights + grads + optimizer; }
};
HeldBytes held_bytes(const std::vector<torch::Tensor>& params, const torch::optim::AdamW& opt,
                     const std::vector<torch::Tensor>& extra_weights = {},
                     const std::vector<torch::Tensor>& extra_grads = {});

// ZeRO stages 2 and 3 (train.zero = 2, 3), laid out as FSDP's flat parameters.
//
// The trainable parameters fall into units: one per block of the block lists every rank runs alike
// (TrainStage::block_lists: the decoder layers "text.layers.N.", and with fixed images per rank the ViT blocks
// "vision.blocks.N." and the resampler's "resampler.attn_layers.N." / "resampler.ff_layers.N."); everything else
// (the embeddings, the resampler's input projection and latents, the norms and heads) is the root unit. A unit's parameters are laid end to end
// in registration order and padded to a multiple of W; rank r owns elements [r S, (r + 1) S) of that flat vector
// (S = its padded length / W), so every rank holds 1/W of every unit. A rank's *segments* are the pieces of
// parameters inside its chunks; AdamW (torch::optim::AdamW, decay groups as without sharding) steps the segments,
// so the update is element for element the one of one process.
//
//   2: parameters stay whole on every rank. After the step's last backward each unit's gradients are
//      reduce-scattered (each rank keeps the sum of its chunk) and the full gradients freed; after the optimizer
//      step the units are all-gathered back into the parameters.
//   3: parameters are sharded too: a rank keeps its chunks (the fp32 master values the segments are views of) and
//      the module's parameters are empty between uses. The root unit is gathered for a whole step (and for
//      validation); a decoder layer or ViT block is gathered just before its forward and again for its backward
//      (the block then recomputes its forward, as with activation checkpointing), its gradients are
//      reduce-scattered right after that backward, and it is released. While a block computes, the all-gather of
//      the block expected next (the next one in a forward, the previous one in a backward) is in flight. Peak
//      parameter memory: the shards, the root with its gradients, one block with its gradients and the prefetched
//      block.
//
// A parameter no rank produced a gradient for in a step (an expert no token chose) has no gradient on any rank
// afterwards, and AdamW leaves it alone, as in one process. Checkpoints at these levels are sharded (each rank
// writes its segments and their moments; rank 0 writes the manifest zero_shards.json, see write_checkpoint_shard)
// and load at any world size and level, through io::WeightsReader.
class ZeroShards {
 public:
  // `named`: the trainable parameters by module path, in registration order (all of one dtype and device).
  // `block_lists`: the prefixes whose blocks are units of their own ("text.layers.", "vision.blocks.": those every
  // rank runs alike, TrainStage::block_lists); the parameters of any other block belong to the root.
  ZeroShards(std::shared_ptr<Dist> dist, int64_t level, std::vector<std::pair<std::string, torch::Tensor>> named,
             std::vector<std::string> block_lists);

  int64_t level() const { return level_; }
  // Elements of this rank's segments, and of all trainable parameters.
  int64_t owned_numel() const;
  int64_t total_numel() const;
  // Takes this rank's chunks of the parameters (and, from `full` when given, of their AdamW state: an AdamW over
  // every trainable parameter, e.g. just read from optimizer.pt) and returns the sharded AdamW over the segments:
  // `opts`, with weight decay where decays(parameter name, its dim) says so. Level 3 then releases the parameters.
  // The methods below that take an optimizer take that one.
  std::unique_ptr<torch::optim::AdamW> shard(const torch::optim::AdamW* full, const torch::optim::AdamWOptions& opts,
                                             const std::function<bool(const std::string&, int64_t)>& decays);
  // The moments of this rank's segments from a ZeRO checkpoint (its reader and manifest), after shard(nullptr).
  void load_optimizer_state(const io::WeightsReader& r, torch::optim::AdamW& opt);

  // One step: begin_step (level 3 gathers the root) -> micro-batches' forward and backward -> finish() (the
  // remaining gradients reduce-scattered, the had-a-gradient flags agreed; returns the seconds spent) ->
  // grad_norm() / clip(coef) -> the optimizer step -> after_step(stepped).
  void begin_step();
  double finish();
  // The 2-norm of the whole gradient (all ranks' chunks; one scalar all-reduce).
  double grad_norm();
  void clip(double coef);
  void after_step(bool stepped);

  // Level 3: the root unit held gathered (validation between steps); a no-op at level 2.
  void gather_root();
  void release_root();
  // Level 3: every unit gathered / released (a checkpoint in the unsharded layout); no-ops at level 2.
  void gather_all();
  void release_all();
  // Collective: the moments of every rank's segments into `full` (an AdamW over all trainable parameters, as they
  // are now gathered) on rank 0, which then writes the unsharded optimizer.pt (QLoRA's adapters: small). Other
  // ranks' `full` stays empty.
  void gather_state(const torch::optim::AdamW& opt, torch::optim::AdamW& full);

  // Level 3, around the use of block `block` of the list `prefix` (what a module's LayerGate calls; see gate()); a
  // block with nothing to train (frozen) is no unit and nothing happens.
  void gather(const std::string& prefix, size_t block);
  void prefetch(const std::string& prefix, size_t block);
  void release(const std::string& prefix, size_t block);
  void after_backward(const std::string& prefix, size_t block);
  // The gate of the blocks under `prefix` (one of the block lists): block i is the unit of "<prefix>i".
  static std::shared_ptr<LayerGate> gate(const std::shared_ptr<ZeroShards>& z, const std::string& prefix);

  // What this rank holds now: the module's trainable parameters (empty between uses at level 3) and their .grad,
  // the master chunks, the reduced gradient chunks and the moments of `opt`.
  HeldBytes held(const torch::optim::AdamW& opt) const;
  // The most bytes of gathered parameters, full gradients not yet handed over and packing buffers alive at once since
  // the last call (level 3: the root with its gradients, a block with its gradients and the prefetched block).
  double take_peak_gathered();

  // Checkpoint: this rank's segments ("NAME" [length] and, once stepped, "exp_avg/NAME", "exp_avg_sq/NAME") into
  // `path`; and (any rank computes it, rank 0 writes it) the manifest naming which piece of which tensor lies in which
  // file.
  void write_checkpoint_shard(const std::string& path, const torch::optim::AdamW& opt) const;
  nlohmann::json manifest(const std::vector<std::string>& files) const;
  // The shard file of `rank`, relative to the checkpoint folder.
  static std::string shard_file(int64_t rank, int64_t world);

 private:
  struct Param {
    std::string name;
    torch::Tensor p;              // the module's parameter
    std::vector<int64_t> shape;
    int64_t numel = 0;
    size_t unit = 0;
    int64_t offset = 0;           // in its unit's flat vector
    bool local_grad = false;      // had a gradient on this rank this step
    bool global_grad = false;     // on some rank
    int64_t adam_steps = 0;       // AdamW steps taken (its state's step count)
  };
  struct Unit {
    std::vector<size_t> params;   // indices into params_
    int64_t numel = 0, chunk = 0; // elements, and S = padded / W
    torch::Tensor master;         // [S] level 3: this rank's chunk of the values
    torch::Tensor grad;           // [S] this rank's chunk of the summed gradient
    bool gathered = false;        // level 3: the parameters hold their full values
    torch::Tensor pending;        // level 3: [W * S] the all-gather of a prefetch, in flight ...
    DistWork pending_work;        // ... until this is waited for
  };
  struct Segment {
    size_t param;
    int64_t begin = 0, length = 0;  // elements of the flattened parameter
    int64_t offset = 0;             // where they start in the unit's chunk
    torch::Tensor value;            // what AdamW steps (a view of the master chunk or of the parameter)
  };
  Unit* block_unit(const std::string& prefix, size_t block);
  void reduce_unit(Unit& u);
  void gather_unit(Unit& u);
  void prefetch_unit(Unit& u);
  void release_unit(Unit& u);
  void all_gather_into_params(Unit& u);

  std::shared_ptr<Dist> dist_;
  int64_t level_;
  std::vector<Param> params_;
  std::vector<Unit> units_;       // one per block with trainable parameters, then the root
  std::vector<std::string> block_lists_;      // the prefixes whose blocks are units
  std::map<std::string, size_t> block_unit_;  // "text.layers.N" / "vision.blocks.N" -> its unit
  std::vector<Segment> segments_;
  double gathered_bytes_ = 0, peak_gathered_ = 0;
};

// The AdamW state of every trainable parameter (`named`, as `full` holds them) from a ZeRO checkpoint, assembled from
// its pieces: a ZeRO-2/3 checkpoint resumed at stage 0 or 1.
void load_full_adamw_state(const io::WeightsReader& r, const std::vector<std::pair<std::string, torch::Tensor>>& named,
                           torch::optim::AdamW& full);

}  // namespace omnilite
