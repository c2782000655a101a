// c10d process groups (Gloo, NCCL) and the bucketed gradient all-reduce (see include/omnilite/train/distributed.h).
// This file alone sees USE_C10D_GLOO / USE_C10D_NCCL (set by CMake when the build has the backend), and skips the
// torch PCH, which a differing macro would invalidate.
#include "omnilite/train/distributed.h"

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#if defined(USE_C10D_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(USE_C10D_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "omnilite/log.h"

namespace omnilite {
namespace {

// An integer environment variable; `fallback` when unset or empty. Throws naming the variable and its value.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*end != '\0' || x < 0)
    throw std::runtime_error(std::string("environment variable ") + name + " = \"" + v +
                             "\" is not a non-negative integer; hint: launchers (scripts/launch.sh, torchrun, srun) set it");
  return x;
}

// The first set variable of `names` as an integer, else `fallback`.
int64_t env_first(std::initializer_list<const char*> names, int64_t fallback) {
  for (const char* n : names)
    if (const char* v = std::getenv(n); v && *v) return env_int(n, fallback);
  return fallback;
}

// Slurm's SLURM_NTASKS_PER_NODE may read "2(x3)"; the leading number is the count on this node.
int64_t slurm_tasks_per_node() {
  const char* v = std::getenv("SLURM_NTASKS_PER_NODE");
  if (!v || !*v) return -1;
  return std::strtoll(v, nullptr, 10);
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// A timeout in seconds as c10d takes it.
std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

// Runs a c10d call; its failure becomes one clear error naming the rank and the collective.
template <class F>
auto guarded(int64_t rank, const char* what, double timeout_s, F&& f) -> decltype(f()) {
  std::string why;
  try {
    return f();
  } catch (const c10::Error& e) {
    why = first_line(e.what_without_backtrace());
  } catch (const std::exception& e) {
    why = first_line(e.what());
  }
  throw std::runtime_error(log::format("distributed: rank %lld: %s failed: %s; hint: another rank stopped (see its log) "
                                       "or did not answer within train.dist_timeout_s = %g s",
                                       static_cast<long long>(rank), what, why.c_str(), timeout_s));
}

}  // namespace

DistOptions dist_options_from_env() {
  DistOptions o;
  o.world_size = env_first({"WORLD_SIZE", "SLURM_NTASKS"}, 1);
  o.rank = env_first({"RANK", "SLURM_PROCID"}, 0);
  o.local_rank = env_first({"LOCAL_RANK", "SLURM_LOCALID"}, 0);
  const int64_t per_node = slurm_tasks_per_node();
  o.local_world_size = env_first({"LOCAL_WORLD_SIZE"}, per_node > 0 ? per_node : o.world_size);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) o.master_addr = a;
  o.master_port = env_int("MASTER_PORT", 29500);
  if (const char* s = std::getenv("TORCHELASTIC_USE_AGENT_STORE")) o.agent_store = std::string(s) == "True";
  if (o.world_size < 1) throw std::runtime_error("environment variable WORLD_SIZE = 0: must be at least 1");
  if (o.rank >= o.world_size)
    throw std::runtime_error(log::format("environment: RANK = %lld is not below WORLD_SIZE = %lld",
                                         static_cast<long long>(o.rank), static_cast<long long>(o.world_size)));
  if (o.master_port < 1 || o.master_port > 65535)
    throw std::runtime_error(log::format("environment variable MASTER_PORT = %lld is not a TCP port (1-65535)",
                                         static_cast<long long>(o.master_port)));
  return o;
}

std::string dist_backends() {
  std::string s;
#if defined(USE_C10D_GLOO)
  s += "gloo";
#endif
#if defined(USE_C10D_NCCL)
  s += s.empty() ? "nccl" : ", nccl";
#endif
  return s;
}

// The process group behind the backend-neutral calls (Gloo and NCCL share c10d's collective signatures).
struct Dist::Group {
  c10::intrusive_ptr<c10d::Store> store;
  std::function<c10::intrusive_ptr<c10d::Work>(std::vector<at::Tensor>&)> allreduce;
  std::function<c10::intrusive_ptr<c10d::Work>(std::vector<at::Tensor>&, int64_t)> broadcast;
  std::function<c10::intrusive_ptr<c10d::Work>()> barrier;
  std::function<c10::intrusive_ptr<c10d::Work>(std::vector<at::Tensor>&, std::vector<at::Tensor>&)> allgather;
  std::function<c10::intrusive_ptr<c10d::Work>(std::vector<at::Tensor>&, int64_t)> reduce;  // sum onto a root
  // out, chunks: the backend's own reduce-scatter; unset where it has none (Gloo)
  std::function<c10::intrusive_ptr<c10d::Work>(std::vector<at::Tensor>&, std::vector<at::Tensor>&)> reduce_scatter;
  std::shared_ptr<void> keep;  // the process group object
};

namespace {
template <class PG>
void bind_group(const c10::intrusive_ptr<PG>& pg, Dist::Group& g) {
  g.allreduce = [pg](std::vector<at::Tensor>& t) {
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    return pg->allreduce(t, o);
  };
  g.broadcast = [pg](std::vector<at::Tensor>& t, int64_t root) {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return pg->broadcast(t, o);
  };
  g.barrier = [pg]() { return pg->barrier(); };
  g.allgather = [pg](std::vector<at::Tensor>& out, std::vector<at::Tensor>& in) {
    std::vector<std::vector<at::Tensor>> outs{out};
    return pg->allgather(outs, in);
  };
  g.reduce = [pg](std::vector<at::Tensor>& t, int64_t root) {
    c10d::ReduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.rootRank = root;
    return pg->reduce(t, o);
  };
}

// The rendezvous: rank 0 serves a TCP store (unless an agent such as torchrun already does), the others connect.
c10::intrusive_ptr<c10d::Store> open_store(const DistOptions& o, const std::string& where) {
  return guarded(o.rank, ("rendezvous at " + where).c_str(), o.timeout_s, [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(o.master_port);
    so.isServer = o.rank == 0 && !o.agent_store;
    so.waitWorkers = false;
    so.timeout = to_ms(o.timeout_s);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
    // LibTorch >= 2.4 asks for the libuv store by default, which builds without libuv (Debian's 2.6) refuse at
    // once: fall back to the classic store, which every rank of such a build uses alike.
    try {
      return c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::TCPStore>(o.master_addr, so));
    } catch (const std::exception& e) {
      if (!so.useLibUV || std::string(e.what()).find("libuv") == std::string::npos) throw;
      so.useLibUV = false;
    }
#endif
    return c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::TCPStore>(o.master_addr, so));
  });
}

// Every rank publishes its world size and fingerprint and compares with every other rank of its world; throws
// naming the two ranks on a mismatch.
void check_fingerprints(const DistOptions& o, c10d::Store& store, const std::string& fingerprint) {
  const std::string mine = std::to_string(o.world_size) + " " + fingerprint;
  guarded(o.rank, "rendezvous (publishing this rank)", o.timeout_s, [&] {
    store.set("omnilite/rank/" + std::to_string(o.rank), std::vector<uint8_t>(mine.begin(), mine.end()));
    return 0;
  });
  std::string mismatch;
  for (int64_t r = 0; r < o.world_size && mismatch.empty(); ++r) {
    if (r == o.rank) continue;
    const auto v = guarded(o.rank, ("rendezvous (waiting for rank " + std::to_string(r) + ")").c_str(), o.timeout_s,
                           [&] { return store.get("omnilite/rank/" + std::to_string(r)); });
    const std::string theirs(v.begin(), v.end());
    if (theirs == mine) continue;
    const auto sp = theirs.find(' ');
    const std::string their_world = theirs.substr(0, sp);
    if (their_world != std::to_string(o.world_size))
      mismatch = log::format("distributed: rank %lld runs with WORLD_SIZE = %lld, rank %lld with %s; hint: start every "
                             "rank with the same WORLD_SIZE", static_cast<long long>(o.rank),
                             static_cast<long long>(o.world_size), static_cast<long long>(r), their_world.c_str());
    else
      mismatch = log::format("distributed: rank %lld and rank %lld run different configs or run options (fingerprints "
                             "%s and %s); hint: start every rank with the same --config, --set, --max-steps and --resume",
                             static_cast<long long>(o.rank), static_cast<long long>(r), fingerprint.c_str(),
                             theirs.substr(sp + 1).c_str());
  }
  // Every rank counts itself checked; on a mismatch, the rank that serves the store waits (10 s at most) for the others
  // to have read its record, so that they, too, report the mismatch rather than a closed connection.
  guarded(o.rank, "rendezvous (check-in)", o.timeout_s, [&] { return store.add("omnilite/checked", 1); });
  if (!mismatch.empty()) {
    if (o.rank == 0 && !o.agent_store) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (std::chrono::steady_clock::now() < until && store.add("omnilite/checked", 0) < o.world_size)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw std::runtime_error(mismatch);
  }
}

// The process group of `backend` on the store, bound into `g`.
void open_process_group(const DistOptions& o, const std::string& backend, Dist::Group& g) {
  const auto timeout = to_ms(o.timeout_s);
  guarded(o.rank, ("opening the " + backend + " process group").c_str(), o.timeout_s, [&] {
#if defined(USE_C10D_NCCL)
    if (backend == "nccl") {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(g.store, static_cast<int>(o.rank),
                                                           static_cast<int>(o.world_size), opts);
      bind_group(pg, g);
      g.reduce_scatter = [pg](std::vector<at::Tensor>& out, std::vector<at::Tensor>& chunks) {
        std::vector<std::vector<at::Tensor>> ins{chunks};
        c10d::ReduceScatterOptions ro;
        ro.reduceOp = c10d::ReduceOp::SUM;
        return pg->reduce_scatter(out, ins, ro);
      };
      g.keep = std::shared_ptr<void>(nullptr, [pg](void*) mutable { pg.reset(); });
      return 0;
    }
#endif
#if defined(USE_C10D_GLOO)
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    // GLOO_SOCKET_IFNAME picks the network interface; a loopback rendezvous stays on loopback; otherwise the address
    // this host's name resolves to.
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else if (o.master_addr == "127.0.0.1" || o.master_addr == "localhost")
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(g.store, static_cast<int>(o.rank),
                                                         static_cast<int>(o.world_size), opts);
    bind_group(pg, g);
    g.keep = std::shared_ptr<void>(nullptr, [pg](void*) mutable { pg.reset(); });
#endif
    return 0;
  });
}

}  // namespace

std::shared_ptr<Dist> Dist::join(const DistOptions& o, const std::string& fingerprint, torch::Device device) {
  auto d = std::make_shared<Dist>();
  d->rank_ = o.rank;
  d->world_ = o.world_size;
  d->timeout_s_ = o.timeout_s;
  if (o.world_size == 1) return d;
  const bool cuda = device.is_cuda();
  std::string backend = cuda ? "nccl" : "gloo";
#if !defined(USE_C10D_NCCL)
  if (cuda) backend = "gloo";  // Gloo also reduces CUDA tensors (through host copies) where it is built with CUDA
#endif
#if !defined(USE_C10D_GLOO)
  if (backend == "gloo")
    throw std::runtime_error("WORLD_SIZE = " + std::to_string(o.world_size) + " but this build has no c10d backend for " +
                             (cuda ? std::string("CUDA") : std::string("CPU")) + " tensors (built with: \"" +
                             dist_backends() + "\"); hint: install libgloo-dev and rebuild (scripts/setup.sh does)");
#endif
  d->backend_ = backend;
  auto g = std::make_shared<Group>();
  const std::string where = o.master_addr + ":" + std::to_string(o.master_port);
  g->store = open_store(o, where);
  check_fingerprints(o, *g->store, fingerprint);
  open_process_group(o, backend, *g);
  d->group_ = g;
  log::info(log::format("distributed: rank %lld of %lld joined at %s (%s)", static_cast<long long>(o.rank),
                        static_cast<long long>(o.world_size), where.c_str(), backend.c_str()));
  return d;
}

void Dist::all_reduce_sum(torch::Tensor& t) { all_reduce_sum_async(t).wait(); }

DistWork Dist::all_reduce_sum_async(torch::Tensor& t) {
  if (world_ == 1) return {};
  std::vector<at::Tensor> v{t};
  auto w = guarded(rank_, "all-reduce", timeout_s_, [&] { return group_->allreduce(v); });
  const auto timeout = to_ms(timeout_s_);
  return DistWork([w, rank = rank_, timeout, t = timeout_s_]() {
    guarded(rank, "all-reduce", t, [&] { return w->wait(timeout); });
  });
}

void Dist::broadcast(std::vector<torch::Tensor>& ts, int64_t root) {
  if (world_ == 1) return;
  const auto timeout = to_ms(timeout_s_);
  for (auto& t : ts) {
    std::vector<at::Tensor> v{t};
    guarded(rank_, "broadcast", timeout_s_, [&] { return group_->broadcast(v, root)->wait(timeout); });
  }
}

void Dist::all_gather(torch::Tensor& full, const torch::Tensor& mine) { all_gather_async(full, mine).wait(); }

DistWork Dist::all_gather_async(torch::Tensor& full, const torch::Tensor& mine) {
  if (world_ == 1) {
    full.copy_(mine);
    return {};
  }
  std::vector<at::Tensor> out, in{mine};
  const int64_t n = mine.numel();
  for (int64_t r = 0; r < world_; ++r) out.push_back(full.narrow(0, r * n, n));
  auto w = guarded(rank_, "all-gather", timeout_s_, [&] { return group_->allgather(out, in); });
  const auto timeout = to_ms(timeout_s_);
  return DistWork([w, rank = rank_, timeout, t = timeout_s_]() {
    guarded(rank, "all-gather", t, [&] { return w->wait(timeout); });
  });
}

void Dist::reduce_scatter_sum(torch::Tensor& full, torch::Tensor& mine) {
  if (world_ == 1) {
    mine.copy_(full);
    return;
  }
  const int64_t n = mine.numel();
  const auto timeout = to_ms(timeout_s_);
  std::vector<at::Tensor> chunks;
  for (int64_t r = 0; r < world_; ++r) chunks.push_back(full.narrow(0, r * n, n));
  if (group_->reduce_scatter) {
    std::vector<at::Tensor> out{mine};
    guarded(rank_, "reduce-scatter", timeout_s_, [&] { return group_->reduce_scatter(out, chunks)->wait(timeout); });
    return;
  }
  // Every chunk reduced onto its rank; all W are in flight at once, then waited for in order.
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (int64_t r = 0; r < world_; ++r) {
    std::vector<at::Tensor> t{chunks[static_cast<size_t>(r)]};
    works.push_back(guarded(rank_, "reduce-scatter (reduce)", timeout_s_, [&] { return group_->reduce(t, r); }));
  }
  for (auto& w : works) guarded(rank_, "reduce-scatter (reduce)", timeout_s_, [&] { return w->wait(timeout); });
  mine.copy_(chunks[static_cast<size_t>(rank_)]);
}

std::string Dist::reduce_scatter_impl() const {
  if (world_ == 1) return "none (one process)";
  if (group_ && group_->reduce_scatter) return backend_ + " reduce_scatter";
  return "W reduce calls (" + backend_ + " has no reduce_scatter)";
}

void Dist::barrier() {
  if (world_ == 1) return;
  const auto timeout = to_ms(timeout_s_);
  guarded(rank_, "barrier", timeout_s_, [&] { return group_->barrier()->wait(timeout); });
}

// ---------------------------------------------------------------------------------------------------------------
// GradReducer

GradReducer::GradReducer(std::shared_ptr<Dist> dist, std::vector<torch::Tensor> params, double bucket_mb)
    : dist_(std::move(dist)), params_(std::move(params)) {
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * 1024 * 1024));
  bucket_of_.resize(params_.size());
  offset_.resize(params_.size());
  arrived_.assign(params_.size(), 0);
  expected_.assign(params_.size(), -1);
  complete_.assign(params_.size(), false);
  // Backward reaches the last-registered parameters first: buckets follow the reverse registration order.
  std::vector<int64_t> sizes;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    const bool fresh = buckets_.empty() || sizes.back() + bytes > cap ||
                       params_[buckets_.back().params.front()].scalar_type() != p.scalar_type() ||
                       params_[buckets_.back().params.front()].device() != p.device();
    if (fresh) {
      buckets_.emplace_back();
      sizes.push_back(0);
    }
    offset_[k] = static_cast<size_t>(sizes.back() / static_cast<int64_t>(p.element_size()));
    bucket_of_[k] = buckets_.size() - 1;
    buckets_.back().params.push_back(k);
    sizes.back() += bytes;
  }
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const auto& first = params_[buckets_[b].params.front()];
    buckets_[b].flat = torch::zeros({sizes[b] / static_cast<int64_t>(first.element_size())}, first.options());
  }
  for (size_t i = 0; i < params_.size(); ++i)
    hooks_.push_back(params_[i].register_hook([this, i](torch::Tensor g) { on_grad(i, g); }));
}

GradReducer::~GradReducer() {
  for (size_t i = 0; i < params_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

torch::Tensor GradReducer::slot(size_t i) {
  return buckets_[bucket_of_[i]].flat.narrow(0, static_cast<int64_t>(offset_[i]), params_[i].numel());
}

void GradReducer::arm() {
  std::lock_guard<std::mutex> lock(mu_);
  armed_ = true;
  started_early_ = 0;
  // Parameters that received no gradient in the last step's backward (unused heads, experts no token chose) are
  // complete already, with what .grad holds from earlier micro-batches, so they do not hold their buckets back.
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (expected_[i] != 0) continue;
    auto s = slot(i);
    if (params_[i].grad().defined()) s.copy_(params_[i].grad().reshape(-1));
    else s.zero_();
    complete_[i] = true;
    ++buckets_[bucket_of_[i]].ready;
  }
  start_ready_buckets();
  started_early_ = static_cast<int64_t>(next_);
}

void GradReducer::on_grad(size_t i, const torch::Tensor& g) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!armed_) return;
  auto& b = buckets_[bucket_of_[i]];
  ++arrived_[i];
  if (b.started) {
    b.stale = true;  // reduced again in finish()
    return;
  }
  if (arrived_[i] == expected_[i]) {
    // The gradient after this accumulation: what .grad holds so far plus g.
    torch::NoGradGuard ng;
    auto s = slot(i);
    s.copy_(g.reshape(-1));
    if (params_[i].grad().defined()) s.add_(params_[i].grad().reshape(-1));
    complete_[i] = true;
    ++b.ready;
    start_ready_buckets();
    started_early_ = static_cast<int64_t>(next_);
  } else if (complete_[i]) {
    complete_[i] = false;  // more than last step: finish() copies the final .grad
    --b.ready;
  }
}

void GradReducer::start_ready_buckets() {
  while (next_ < buckets_.size() && buckets_[next_].ready == static_cast<int64_t>(buckets_[next_].params.size())) {
    buckets_[next_].work = dist_->all_reduce_sum_async(buckets_[next_].flat);
    buckets_[next_].started = true;
    ++next_;
  }
}

void GradReducer::fill_from_grads(Bucket& b) {
  torch::NoGradGuard ng;
  for (size_t i : b.params) {
    auto s = slot(i);
    if (params_[i].grad().defined()) s.copy_(params_[i].grad().reshape(-1));
    else s.zero_();
  }
}

double GradReducer::finish() {
  torch::NoGradGuard ng;
  const auto t0 = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = false;
  }
  for (; next_ < buckets_.size(); ++next_) {
    fill_from_grads(buckets_[next_]);
    buckets_[next_].work = dist_->all_reduce_sum_async(buckets_[next_].flat);
    buckets_[next_].started = true;
  }
  for (auto& b : buckets_) b.work.wait();
  // One small all-reduce of flags: buckets to reduce again, parameters that have a gradient on some rank.
  const int64_t nb = buckets(), np = static_cast<int64_t>(params_.size());
  auto flags = torch::zeros({nb + np}, torch::kFloat64);
  auto fa = flags.accessor<double, 1>();
  for (int64_t b = 0; b < nb; ++b) fa[b] = buckets_[static_cast<size_t>(b)].stale ? 1.0 : 0.0;
  for (int64_t i = 0; i < np; ++i) fa[nb + i] = params_[static_cast<size_t>(i)].grad().defined() ? 1.0 : 0.0;
  auto flags_dev = flags.to(params_.front().device());
  dist_->all_reduce_sum(flags_dev);
  flags = flags_dev.cpu();
  fa = flags.accessor<double, 1>();
  for (int64_t b = 0; b < nb; ++b)
    if (fa[b] > 0) {
      fill_from_grads(buckets_[static_cast<size_t>(b)]);
      dist_->all_reduce_sum(buckets_[static_cast<size_t>(b)].flat);
    }
  for (int64_t i = 0; i < np; ++i) {
    auto& p = params_[static_cast<size_t>(i)];
    if (fa[nb + i] == 0) continue;  // no rank has a gradient: .grad stays undefined everywhere
    auto reduced = slot(static_cast<size_t>(i)).view(p.sizes());
    if (p.grad().defined()) p.mutable_grad().copy_(reduced);
    else p.mutable_grad() = reduced.clone();
  }
  // Next step expects as many gradients per parameter as this one delivered.
  expected_ = arrived_;
  std::fill(arrived_.begin(), arrived_.end(), 0);
  std::fill(complete_.begin(), complete_.end(), false);
  for (auto& b : buckets_) {
    b.ready = 0;
    b.started = b.stale = false;
  }
  next_ = 0;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace omnilite
