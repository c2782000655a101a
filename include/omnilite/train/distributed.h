// Data-parallel training on LibTorch's c10d: rendezvous, collectives and the bucketed gradient all-reduce.
//
// W processes run the same `omnilite train`; rank r reads items r, r + W, ... of every global micro-batch (the batch
// one process would read with the per-rank batch sizes times W), each stage scales its losses so that the ranks'
// losses sum to the loss of that global batch (loss normalisers such as target-token counts and router statistics
// are summed over ranks before backward), and the gradients are summed over ranks: W ranks then take the optimizer
// step that one process would take on the global batch.
//
// Backends: ProcessGroupGloo for CPU tensors (Debian's LibTorch 1.13 has it; its headers come from libgloo-dev) and
// ProcessGroupNCCL for CUDA tensors in LibTorch builds that have it. Which ones this build has: dist_backends().
// c10d itself is confined to src/train/distributed.cpp; this header needs only LibTorch's tensor API.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace omnilite {

// Where this process stands in the job. Read from the variables torchrun and Slurm set.
struct DistOptions {
  int64_t rank = 0;                        // this process, in [0, world_size) (RANK, else SLURM_PROCID)
  int64_t world_size = 1;                  // processes in the job (WORLD_SIZE, else SLURM_NTASKS)
  int64_t local_rank = 0;                  // rank on this node; a CUDA run uses cuda:LOCAL_RANK (LOCAL_RANK, else SLURM_LOCALID)
  int64_t local_world_size = 1;            // processes on this node; share the cores (LOCAL_WORLD_SIZE, else
                                           // SLURM_NTASKS_PER_NODE, else world_size)
  std::string master_addr = "127.0.0.1";   // host of the rendezvous store (MASTER_ADDR)
  int64_t master_port = 29500;             // its port (MASTER_PORT)
  bool agent_store = false;                // torchrun's agent already serves the store (TORCHELASTIC_USE_AGENT_STORE=True):
                                           // rank 0 connects to it instead of starting one
  double timeout_s = 600;                  // rendezvous or collective waiting longer fails the run (train.dist_timeout_s)
};

// The options of the environment; world_size 1 when no variable is set. Throws naming a malformed variable.
DistOptions dist_options_from_env();

// Backends compiled into this build, e.g. "gloo" or "gloo, nccl"; "" when none (then world_size must be 1).
std::string dist_backends();

// A collective in flight; wait() blocks until it is done (throws naming the collective if it failed or timed out).
class DistWork {
 public:
  DistWork() = default;
  explicit DistWork(std::function<void()> wait) : wait_(std::move(wait)) {}
  void wait() {
    if (wait_) wait_();
    wait_ = nullptr;
  }

 private:
  std::function<void()> wait_;
};

// The process group of a job; in one process every collective is the identity.
class Dist {
 public:
  Dist() = default;  // world of one
  // Joins the job: c10d TCPStore rendezvous at master_addr:master_port, a check that every rank runs the same
  // world size and the same `fingerprint` (the config's hash), then a Gloo (CPU) or NCCL (CUDA) process group.
  // Throws with the rank, the value and a hint on a mismatch, a timeout or a build without a backend.
  static std::shared_ptr<Dist> join(const DistOptions& o, const std::string& fingerprint, torch::Device device);

  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  bool is_main() const { return rank_ == 0; }
  const std::string& backend() const { return backend_; }

  // t summed over ranks, in place. The blocking form waits; the async one returns the collective in flight (t must
  // stay untouched until it is waited for).
  void all_reduce_sum(torch::Tensor& t);
  DistWork all_reduce_sum_async(torch::Tensor& t);
  // Every tensor of `ts` takes rank `root`'s values.
  void broadcast(std::vector<torch::Tensor>& ts, int64_t root = 0);
  // ZeRO-2/3 (zero.h). `full` [W * S]: chunk r (elements [r S, (r + 1) S)) takes rank r's `mine` [S].
  void all_gather(torch::Tensor& full, const torch::Tensor& mine);
  // The same in flight (`full` and `mine` stay untouched until it is waited for).
  DistWork all_gather_async(torch::Tensor& full, const torch::Tensor& mine);
  // `mine` [S] takes chunk `rank()` of `full` [W * S] summed over ranks; `full` is scratch afterwards. NCCL has the
  // collective; Gloo has none, so it is built from W reduce calls (chunk r reduced onto rank r), which move as many
  // bytes as a ring reduce-scatter: see reduce_scatter_impl().
  void reduce_scatter_sum(torch::Tensor& full, torch::Tensor& mine);
  // How reduce_scatter_sum runs on this backend, for the log.
  std::string reduce_scatter_impl() const;
  // Waits until every rank has arrived.
  void barrier();

  struct Group;  // the c10d process group (opaque; distributed.cpp)

 private:
  int64_t rank_ = 0, world_ = 1;
  std::string backend_ = "none";
  double timeout_s_ = 600;
  std::shared_ptr<Group> group_;
};

// Sums the gradients of `params` over the ranks after the backward pass of the last micro-batch of a step, in
// buckets of about `bucket_mb` MiB whose all-reduce starts while backward still runs.
//
// Per-parameter gradient hooks count the gradients that arrive; a parameter is complete when it has received as
// many as in the previous step (reentrant activation checkpointing and a model run on two batches deliver several
// per step; one that received none is complete from the start), and a bucket starts when all its parameters are
// complete and every earlier bucket has started (so the ranks issue their collectives in one order). finish()
// starts the rest and waits; a bucket that received a gradient after it started (a count that grew) is reduced
// again, all ranks agreeing through one small all-reduce of flags, which also tells which parameters had a gradient
// on some rank: those have one afterwards on every rank, the others none (so an expert that no rank routed to stays
// untouched by AdamW, as in one process).
class GradReducer {
 public:
  GradReducer(std::shared_ptr<Dist> dist, std::vector<torch::Tensor> params, double bucket_mb);
  ~GradReducer();  // removes its hooks
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;
  // Before the backward pass of the last micro-batch of a step (earlier micro-batches accumulate locally).
  void arm();
  // After it: sums the gradients over ranks into .grad; returns the seconds spent waiting for the network.
  double finish();
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Buckets that started during backward in the last step (the overlap achieved).
  int64_t started_early() const { return started_early_; }

 private:
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    torch::Tensor flat;          // [sum of numel] the gradients laid end to end
    int64_t ready = 0;           // parameters complete this step
    bool started = false;
    bool stale = false;          // a gradient arrived after the start
    DistWork work;
  };
  void on_grad(size_t i, const torch::Tensor& g);
  void start_ready_buckets();
  void fill_from_grads(Bucket& b);
  torch::Tensor slot(size_t i);

  std::shared_ptr<Dist> dist_;
  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_, offset_;       // per parameter: its bucket and its offset there
  std::vector<int64_t> arrived_, expected_;      // gradients arrived this step / in the last one (-1: unknown)
  std::vector<bool> complete_;
  std::vector<unsigned> hooks_;                  // per parameter: its hook's handle
  size_t next_ = 0;                              // the first bucket not started
  bool armed_ = false;
  int64_t started_early_ = 0;
  std::mutex mu_;
};

}  // namespace omnilite
