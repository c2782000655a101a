#include "omnilite/train/zero.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <type_traits>

#include "omnilite/io/safetensors.h"
#include "omnilite/train/trainer.h"

namespace omnilite {

Zero1::Zero1(std::shared_ptr<Dist> dist, std::vector<torch::Tensor> params)
    : dist_(std::move(dist)), params_(std::move(params)), owner_(params_.size(), 0) {
  std::vector<size_t> order(params_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return params_[a].numel() > params_[b].numel(); });
  std::vector<int64_t> load(static_cast<size_t>(dist_->world()), 0);
  for (size_t i : order) {
    const auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    owner_[i] = static_cast<int64_t>(r);
    load[r] += params_[i].numel();
  }
  owned_by_.resize(load.size());
  for (size_t i = 0; i < params_.size(); ++i) owned_by_[static_cast<size_t>(owner_[i])].push_back(i);
}

bool Zero1::owns(const torch::Tensor& p) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].is_same(p)) return owns(i);
  return false;
}

int64_t Zero1::owned_numel() const {
  int64_t n = 0;
  for (size_t i : owned_by_[static_cast<size_t>(dist_->rank())]) n += params_[i].numel();
  return n;
}

int64_t Zero1::total_numel() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.numel();
  return n;
}

void Zero1::broadcast_params() {
  torch::NoGradGuard ng;
  // One broadcast per owner and dtype: its parameters laid end to end.
  for (int64_t r = 0; r < dist_->world(); ++r) {
    std::map<torch::ScalarType, std::vector<size_t>> by_dtype;
    for (size_t i : owned_by_[static_cast<size_t>(r)]) by_dtype[params_[i].scalar_type()].push_back(i);
    for (const auto& [dtype, idx] : by_dtype) {
      std::vector<torch::Tensor> parts;
      for (size_t i : idx) parts.push_back(params_[i].reshape(-1));
      std::vector<torch::Tensor> flat{torch::cat(parts)};
      dist_->broadcast(flat, r);
      if (r == dist_->rank()) continue;
      int64_t off = 0;
      for (size_t i : idx) {
        params_[i].copy_(flat[0].narrow(0, off, params_[i].numel()).view(params_[i].sizes()));
        off += params_[i].numel();
      }
    }
  }
}

void Zero1::gather_state(torch::optim::AdamW& sharded, torch::optim::AdamW& full) {
  torch::NoGradGuard ng;
  auto& mine = sharded.state();
  auto& all = full.state();
  for (int64_t r = 0; r < dist_->world(); ++r) {
    const auto& idx = owned_by_[static_cast<size_t>(r)];
    // [exp_avg | exp_avg_sq] of each parameter in float32, and the step counts (0 = no state yet)
    int64_t n = 0;
    for (size_t i : idx) n += 2 * params_[i].numel();
    auto flat = torch::zeros({n}, params_.front().options().dtype(torch::kFloat32));
    auto steps = torch::zeros({static_cast<int64_t>(idx.size())}, params_.front().options().dtype(torch::kFloat64));
    if (r == dist_->rank()) {
      int64_t off = 0;
      for (size_t k = 0; k < idx.size(); ++k) {
        const auto& p = params_[idx[k]];
        auto it = mine.find(optimizer_state_key(mine, p));
        if (it != mine.end()) {
          auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
          flat.narrow(0, off, p.numel()).copy_(s.exp_avg().reshape(-1));
          flat.narrow(0, off + p.numel(), p.numel()).copy_(s.exp_avg_sq().reshape(-1));
          steps[static_cast<int64_t>(k)] = static_cast<double>(s.step());
        }
        off += 2 * p.numel();
      }
    }
    std::vector<torch::Tensor> bufs{flat, steps};
    dist_->broadcast(bufs, r);
    auto host_steps = bufs[1].cpu();
    int64_t off = 0;
    for (size_t k = 0; k < idx.size(); ++k) {
      const auto& p = params_[idx[k]];
      const auto step = static_cast<int64_t>(host_steps[static_cast<int64_t>(k)].item<double>());
      if (step > 0 && dist_->is_main()) {  // only rank 0 writes the file
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(step);
        s->exp_avg(bufs[0].narrow(0, off, p.numel()).view(p.sizes()).to(p.scalar_type()).clone());
        s->exp_avg_sq(bufs[0].narrow(0, off + p.numel(), p.numel()).view(p.sizes()).to(p.scalar_type()).clone());
        all[optimizer_state_key(all, p)] = std::move(s);
      }
      off += 2 * p.numel();
    }
  }
}

void Zero1::take_state(torch::optim::AdamW& full, torch::optim::AdamW& sharded) {
  auto& all = full.state();
  auto& mine = sharded.state();
  for (size_t i : owned_by_[static_cast<size_t>(dist_->rank())]) {
    auto it = all.find(optimizer_state_key(all, params_[i]));
    if (it != all.end()) mine[optimizer_state_key(mine, params_[i])] = std::move(it->second);
  }
  all.clear();
}

}  // namespace omnilite

// ---------------------------------------------------------------------------------------------------------------
// ZeroShards

namespace omnilite {
namespace {

// Adds the bytes of t's storage to `into` unless that storage was counted already.
void count_storage(const torch::Tensor& t, std::set<const void*>& seen, double& into) {
  if (!t.defined() || t.numel() == 0) return;
  const auto& st = t.storage();
  if (seen.insert(st.data()).second) into += static_cast<double>(st.nbytes());
}

double bytes_of(const torch::Tensor& t) {
  return t.defined() ? static_cast<double>(t.numel()) * static_cast<double>(t.element_size()) : 0.0;
}

}  // namespace

ZeroShards::ZeroShards(std::shared_ptr<Dist> dist, int64_t level,
                       std::vector<std::pair<std::string, torch::Tensor>> named, std::vector<std::string> block_lists)
    : dist_(std::move(dist)), level_(level), block_lists_(std::move(block_lists)) {
  if (level_ != 2 && level_ != 3)
    throw std::runtime_error("ZeroShards: level " + std::to_string(level_) + " (sharded levels are 2 and 3)");
  if (named.empty()) throw std::runtime_error("train.zero = " + std::to_string(level_) + ": nothing trains");
  // One unit per block that has something to train, in order of appearance; the root last.
  for (const auto& [name, p] : named)
    for (const auto& prefix : block_lists_)
      if (const int64_t b = block_index(name, prefix); b >= 0) {
        const std::string key = prefix + std::to_string(b);
        if (!block_unit_.count(key)) block_unit_.emplace(key, block_unit_.size());
      }
  units_.resize(block_unit_.size() + 1);
  const auto& first = named.front().second;
  for (auto& [name, p] : named) {
    if (p.scalar_type() != first.scalar_type() || p.device() != first.device())
      throw std::runtime_error("train.zero = " + std::to_string(level_) + ": parameter \"" + name + "\" is " +
                               std::string(c10::toString(p.scalar_type())) + " on " + p.device().str() + ", \"" +
                               named.front().first + "\" " + c10::toString(first.scalar_type()) + " on " +
                               first.device().str() +
                               "; hint: sharded levels need one dtype for everything that trains");
    Param q;
    q.name = name;
    q.p = p;
    q.shape = p.sizes().vec();
    q.numel = p.numel();
    q.unit = units_.size() - 1;
    for (const auto& prefix : block_lists_)
      if (const int64_t b = block_index(name, prefix); b >= 0) q.unit = block_unit_.at(prefix + std::to_string(b));
    auto& u = units_[q.unit];
    q.offset = u.numel;
    u.numel += q.numel;
    u.params.push_back(params_.size());
    params_.push_back(std::move(q));
  }
  const int64_t w = dist_->world();
  for (auto& u : units_) u.chunk = (u.numel + w - 1) / w;
}

std::unique_ptr<torch::optim::AdamW> make_adamw(std::vector<torch::Tensor> decay, std::vector<torch::Tensor> no_decay,
                                                const torch::optim::AdamWOptions& opts) {
  auto no_decay_opts = std::make_unique<torch::optim::AdamWOptions>(opts);
  no_decay_opts->weight_decay(0.0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::move(decay), std::make_unique<torch::optim::AdamWOptions>(opts));
  groups.emplace_back(std::move(no_decay), std::move(no_decay_opts));
  return std::make_unique<torch::optim::AdamW>(groups, opts);
}

std::vector<std::string> omni_block_lists(const TrainOptions& tr) {
  if (tr.sft_batch_size > 0) return {"text.layers."};
  return {"text.layers.", "vision.blocks.", "resampler.attn_layers.", "resampler.ff_layers."};
}

int64_t block_index(const std::string& name, const std::string& prefix) {
  if (name.rfind(prefix, 0) != 0) return -1;
  size_t i = prefix.size();
  int64_t n = 0;
  for (; i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])); ++i) n = n * 10 + (name[i] - '0');
  return i > prefix.size() && i < name.size() && name[i] == '.' ? n : -1;
}

HeldBytes held_bytes(const std::vector<torch::Tensor>& params, const torch::optim::AdamW& opt,
                     const std::vector<torch::Tensor>& extra_weights, const std::vector<torch::Tensor>& extra_grads) {
  std::set<const void*> seen;
  HeldBytes h;
  for (const auto& p : params) count_storage(p, seen, h.weights);
  for (const auto& t : extra_weights) count_storage(t, seen, h.weights);
  for (const auto& p : params) count_storage(p.grad(), seen, h.grads);
  for (const auto& t : extra_grads) count_storage(t, seen, h.grads);
  for (const auto& [key, st] : opt.state()) {
    const auto& a = static_cast<const torch::optim::AdamWParamState&>(*st);
    count_storage(a.exp_avg(), seen, h.optimizer);
    count_storage(a.exp_avg_sq(), seen, h.optimizer);
  }
  return h;
}

int64_t ZeroShards::owned_numel() const {
  int64_t n = 0;
  for (const auto& s : segments_) n += s.length;
  return n;
}

int64_t ZeroShards::total_numel() const {
  int64_t n = 0;
  for (const auto& q : params_) n += q.numel;
  return n;
}

std::string ZeroShards::shard_file(int64_t rank, int64_t world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "zero-%05lld-of-%05lld.safetensors", static_cast<long long>(rank),
                static_cast<long long>(world));
  return buf;
}

std::unique_ptr<torch::optim::AdamW> ZeroShards::shard(const torch::optim::AdamW* full,
                                                       const torch::optim::AdamWOptions& opts,
                                                       const std::function<bool(const std::string&, int64_t)>& decays) {
  torch::NoGradGuard ng;
  const int64_t r = dist_->rank();
  const auto options = params_.front().p.options();
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& u : units_) {
    u.grad = torch::zeros({u.chunk}, options);
    if (level_ == 3) u.master = torch::zeros({u.chunk}, options);
    const int64_t lo = r * u.chunk, hi = lo + u.chunk;
    for (size_t i : u.params) {
      const auto& q = params_[i];
      const int64_t a = std::max(lo, q.offset), b = std::min(hi, q.offset + q.numel);
      if (a >= b) continue;
      Segment s;
      s.param = i;
      s.begin = a - q.offset;
      s.length = b - a;
      s.offset = a - lo;
      const auto flat = q.p.detach().view({-1}).narrow(0, s.begin, s.length);
      if (level_ == 3) {
        s.value = u.master.narrow(0, s.offset, s.length);
        s.value.copy_(flat);
      } else {
        s.value = flat;
      }
      (decays(q.name, static_cast<int64_t>(q.shape.size())) ? decay : no_decay).push_back(s.value);
      segments_.push_back(std::move(s));
    }
  }
  auto opt = make_adamw(std::move(decay), std::move(no_decay), opts);
  if (full) {
    const auto& all = full->state();
    for (auto& q : params_) {
      auto it = all.find(optimizer_state_key(all, q.p));
      if (it != all.end()) q.adam_steps = static_cast<torch::optim::AdamWParamState&>(*it->second).step();
    }
    auto& mine = opt->state();
    for (const auto& s : segments_) {
      auto it = all.find(optimizer_state_key(all, params_[s.param].p));
      if (it == all.end()) continue;
      const auto& f = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(f.step());
      st->exp_avg(f.exp_avg().reshape({-1}).narrow(0, s.begin, s.length).clone());
      st->exp_avg_sq(f.exp_avg_sq().reshape({-1}).narrow(0, s.begin, s.length).clone());
      mine[optimizer_state_key(mine, s.value)] = std::move(st);
    }
  }
  if (level_ == 3)
    for (auto& u : units_) {
      u.gathered = true;  // the parameters hold their full values until now
      release_unit(u);
    }
  return opt;
}

void ZeroShards::load_optimizer_state(const io::WeightsReader& r, torch::optim::AdamW& opt) {
  torch::NoGradGuard ng;
  const auto& tensors = r.zero_manifest().at("tensors");
  for (auto& q : params_) {
    if (!tensors.contains(q.name))
      throw std::runtime_error("checkpoint \"" + r.path() + "\": zero_shards.json has no tensor \"" + q.name +
                               "\"; hint: the checkpoint was written for another config or train.freeze");
    q.adam_steps = tensors[q.name].value("adam_step", int64_t{0});
  }
  auto& mine = opt.state();
  for (const auto& s : segments_) {
    const auto& q = params_[s.param];
    if (q.adam_steps == 0) continue;
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(q.adam_steps);
    st->exp_avg(r.load_range("exp_avg/" + q.name, s.begin, s.length).to(s.value.options()));
    st->exp_avg_sq(r.load_range("exp_avg_sq/" + q.name, s.begin, s.length).to(s.value.options()));
    mine[optimizer_state_key(mine, s.value)] = std::move(st);
  }
}

void ZeroShards::prefetch_unit(Unit& u) {
  if (level_ != 3 || u.gathered || u.pending.defined() || u.numel == 0) return;
  u.pending = torch::empty({u.chunk * dist_->world()}, u.master.options());
  u.pending_work = dist_->all_gather_async(u.pending, u.master);
  gathered_bytes_ += bytes_of(u.pending);
  peak_gathered_ = std::max(peak_gathered_, gathered_bytes_);
}

void ZeroShards::gather_unit(Unit& u) {
  if (level_ != 3 || u.gathered || u.numel == 0) return;
  torch::NoGradGuard ng;
  prefetch_unit(u);  // (a no-op when the prefetch is in flight already)
  u.pending_work.wait();
  auto full = std::move(u.pending);
  u.pending = torch::Tensor();
  for (size_t i : u.params) {
    auto& q = params_[i];
    q.p.set_data(full.narrow(0, q.offset, q.numel).view(q.shape));
  }
  u.gathered = true;
}

void ZeroShards::release_unit(Unit& u) {
  if (level_ != 3 || !u.gathered) return;
  torch::NoGradGuard ng;
  for (size_t i : u.params) {
    auto& q = params_[i];
    q.p.set_data(torch::empty({0}, q.p.options()));
  }
  u.gathered = false;
  gathered_bytes_ = std::max(0.0, gathered_bytes_ - static_cast<double>(u.chunk * dist_->world()) *
                                                        static_cast<double>(u.master.element_size()));
}

void ZeroShards::reduce_unit(Unit& u) {
  if (u.numel == 0) return;
  torch::NoGradGuard ng;
  auto full = torch::zeros({u.chunk * dist_->world()}, u.grad.options());
  for (size_t i : u.params) {
    auto& q = params_[i];
    const auto& g = q.p.grad();
    if (!g.defined()) continue;
    full.narrow(0, q.offset, q.numel).copy_(g.reshape({-1}));
    q.local_grad = true;
  }
  // Alive together here: the gathered parameters, every full gradient not yet handed over (this unit's, and the
  // root's, which backward produced first) and the packed copy.
  double grads = 0;
  for (const auto& q : params_) grads += bytes_of(q.p.grad());
  peak_gathered_ = std::max(peak_gathered_, gathered_bytes_ + grads + bytes_of(full));
  for (size_t i : u.params) params_[i].p.mutable_grad() = torch::Tensor();
  auto mine = torch::empty({u.chunk}, u.grad.options());
  dist_->reduce_scatter_sum(full, mine);
  u.grad.add_(mine);
}

void ZeroShards::begin_step() {
  for (auto& u : units_) u.grad.zero_();
  for (auto& q : params_) q.local_grad = q.global_grad = false;
  gather_root();
}

double ZeroShards::finish() {
  const auto t0 = std::chrono::steady_clock::now();
  torch::NoGradGuard ng;
  // Level 3 reduced every decoder layer right after its backward; the root (and at level 2 everything) is left.
  if (level_ == 2)
    for (auto& u : units_) reduce_unit(u);
  else
    reduce_unit(units_.back());
  auto flags = torch::zeros({static_cast<int64_t>(params_.size())}, torch::kFloat64);
  auto fa = flags.accessor<double, 1>();
  for (size_t i = 0; i < params_.size(); ++i) fa[static_cast<int64_t>(i)] = params_[i].local_grad ? 1.0 : 0.0;
  auto flags_dev = flags.to(params_.front().p.device());
  dist_->all_reduce_sum(flags_dev);
  flags = flags_dev.cpu();
  fa = flags.accessor<double, 1>();
  for (size_t i = 0; i < params_.size(); ++i) params_[i].global_grad = fa[static_cast<int64_t>(i)] > 0;
  for (auto& s : segments_) {
    const auto& q = params_[s.param];
    s.value.mutable_grad() = q.global_grad ? units_[q.unit].grad.narrow(0, s.offset, s.length) : torch::Tensor();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double ZeroShards::grad_norm() {
  torch::NoGradGuard ng;
  auto sq = torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat64).device(params_.front().p.device()));
  for (const auto& u : units_)
    if (u.chunk > 0) sq += sum_of_squares_fp64(u.grad);
  dist_->all_reduce_sum(sq);
  return std::sqrt(sq.cpu().item<double>());
}

void ZeroShards::clip(double coef) {
  torch::NoGradGuard ng;
  for (auto& u : units_) u.grad.mul_(coef);
}

void ZeroShards::after_step(bool stepped) {
  if (stepped)
    for (auto& q : params_)
      if (q.global_grad) ++q.adam_steps;
  if (level_ == 3) {
    release_root();
    for (auto& u : units_)  // a prefetch nothing used (the step ended first) ends here
      if (u.pending.defined()) {
        u.pending_work.wait();
        gathered_bytes_ -= bytes_of(u.pending);
        u.pending = torch::Tensor();
      }
    return;
  }
  if (!stepped) return;
  // Level 2: every rank's updated chunks back into everyone's parameters (its own are copied onto themselves).
  torch::NoGradGuard ng;
  for (size_t k = 0; k < units_.size(); ++k) {
    auto& u = units_[k];
    if (u.numel == 0) continue;
    auto mine = torch::zeros({u.chunk}, u.grad.options());
    for (const auto& s : segments_)
      if (params_[s.param].unit == k) mine.narrow(0, s.offset, s.length).copy_(s.value);
    auto full = torch::empty({u.chunk * dist_->world()}, u.grad.options());
    dist_->all_gather(full, mine);
    for (size_t i : u.params) {
      auto& q = params_[i];
      q.p.detach().view({-1}).copy_(full.narrow(0, q.offset, q.numel));
    }
  }
}

void ZeroShards::gather_root() { gather_unit(units_.back()); }
void ZeroShards::release_root() { release_unit(units_.back()); }

void ZeroShards::gather_all() {
  for (auto& u : units_) gather_unit(u);
}
void ZeroShards::release_all() {
  for (auto& u : units_) release_unit(u);
}

void ZeroShards::gather_state(const torch::optim::AdamW& opt, torch::optim::AdamW& full) {
  torch::NoGradGuard ng;
  const auto& mine = opt.state();
  auto& all = full.state();
  for (size_t k = 0; k < units_.size(); ++k) {
    auto& u = units_[k];
    if (u.numel == 0) continue;
    // [exp_avg chunk | exp_avg_sq chunk] of this rank, gathered into the two moments of the whole unit
    auto chunk = torch::zeros({2 * u.chunk}, u.grad.options());
    for (const auto& s : segments_) {
      if (params_[s.param].unit != k) continue;
      auto it = mine.find(optimizer_state_key(mine, s.value));
      if (it == mine.end()) continue;
      const auto& a = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      chunk.narrow(0, s.offset, s.length).copy_(a.exp_avg());
      chunk.narrow(0, u.chunk + s.offset, s.length).copy_(a.exp_avg_sq());
    }
    auto gathered = torch::empty({2 * u.chunk * dist_->world()}, u.grad.options());
    dist_->all_gather(gathered, chunk);
    if (!dist_->is_main()) continue;
    // rank r's chunk of moment m lies at [(2 r + m) S, (2 r + m + 1) S): laid back into [W S] per moment
    auto g = gathered.view({dist_->world(), 2, u.chunk});
    const auto avg = g.select(1, 0).reshape({-1}), avg_sq = g.select(1, 1).reshape({-1});
    for (size_t i : u.params) {
      const auto& q = params_[i];
      if (q.adam_steps == 0) continue;
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(q.adam_steps);
      st->exp_avg(avg.narrow(0, q.offset, q.numel).view(q.shape).clone());
      st->exp_avg_sq(avg_sq.narrow(0, q.offset, q.numel).view(q.shape).clone());
      all[optimizer_state_key(all, q.p)] = std::move(st);
    }
  }
}

ZeroShards::Unit* ZeroShards::block_unit(const std::string& prefix, size_t block) {
  auto it = block_unit_.find(prefix + std::to_string(block));
  return it == block_unit_.end() ? nullptr : &units_[it->second];  // a block with nothing to train has no unit
}

void ZeroShards::gather(const std::string& prefix, size_t block) {
  if (auto* u = block_unit(prefix, block)) gather_unit(*u);
}
void ZeroShards::prefetch(const std::string& prefix, size_t block) {
  if (auto* u = block_unit(prefix, block)) prefetch_unit(*u);
}
void ZeroShards::release(const std::string& prefix, size_t block) {
  if (auto* u = block_unit(prefix, block)) release_unit(*u);
}
void ZeroShards::after_backward(const std::string& prefix, size_t block) {
  if (auto* u = block_unit(prefix, block)) {
    reduce_unit(*u);
    release_unit(*u);
  }
}

namespace {
// A module's view of the shards: its block i is the unit of "<prefix>i".
class UnitGate : public LayerGate {
 public:
  UnitGate(std::shared_ptr<ZeroShards> z, std::string prefix) : z_(std::move(z)), prefix_(std::move(prefix)) {}
  void gather(size_t block) override { z_->gather(prefix_, block); }
  void prefetch(size_t block) override { z_->prefetch(prefix_, block); }
  void release(size_t block) override { z_->release(prefix_, block); }
  void after_backward(size_t block) override { z_->after_backward(prefix_, block); }

 private:
  std::shared_ptr<ZeroShards> z_;
  std::string prefix_;
};
}  // namespace

std::shared_ptr<LayerGate> ZeroShards::gate(const std::shared_ptr<ZeroShards>& z, const std::string& prefix) {
  if (std::find(z->block_lists_.begin(), z->block_lists_.end(), prefix) == z->block_lists_.end())
    throw std::runtime_error("ZeroShards::gate: \"" + prefix + "\" is not one of the block lists it shards by");
  return std::make_shared<UnitGate>(z, prefix);
}

HeldBytes ZeroShards::held(const torch::optim::AdamW& opt) const {
  std::vector<torch::Tensor> params, masters, grads;
  for (const auto& q : params_) params.push_back(q.p);
  for (const auto& u : units_) {
    masters.push_back(u.master);
    grads.push_back(u.grad);
  }
  return held_bytes(params, opt, masters, grads);
}

double ZeroShards::take_peak_gathered() {
  const double p = peak_gathered_;
  peak_gathered_ = gathered_bytes_;
  return p;
}

void ZeroShards::write_checkpoint_shard(const std::string& path, const torch::optim::AdamW& opt) const {
  torch::NoGradGuard ng;
  std::vector<std::pair<std::string, torch::Tensor>> out;
  const auto& state = opt.state();
  for (const auto& s : segments_) {
    const auto& name = params_[s.param].name;
    out.emplace_back(name, s.value);
    auto it = state.find(optimizer_state_key(state, s.value));
    if (it == state.end()) continue;
    const auto& a = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    out.emplace_back("exp_avg/" + name, a.exp_avg());
    out.emplace_back("exp_avg_sq/" + name, a.exp_avg_sq());
  }
  io::save_safetensors(path, out, {{"zero", std::to_string(level_)}, {"rank", std::to_string(dist_->rank())},
                                   {"world_size", std::to_string(dist_->world())}});
}

nlohmann::json ZeroShards::manifest(const std::vector<std::string>& files) const {
  nlohmann::json tensors = nlohmann::json::object();
  const int64_t w = dist_->world();
  for (const auto& q : params_) {
    const auto& u = units_[q.unit];
    nlohmann::json pieces = nlohmann::json::array();
    for (int64_t r = 0; r < w; ++r) {
      const int64_t a = std::max(r * u.chunk, q.offset), b = std::min((r + 1) * u.chunk, q.offset + q.numel);
      if (a < b) pieces.push_back({r, a - q.offset, b - a});
    }
    tensors[q.name] = {{"dtype", io::dtype_name(q.p.scalar_type())}, {"shape", q.shape},
                       {"adam_step", q.adam_steps}, {"pieces", pieces}};
  }
  return {{"format", "omnilite-zero-shards"}, {"version", 1}, {"zero", level_}, {"world_size", w},
          {"files", files}, {"tensors", tensors}};
}

void load_full_adamw_state(const io::WeightsReader& r, const std::vector<std::pair<std::string, torch::Tensor>>& named,
                           torch::optim::AdamW& full) {
  torch::NoGradGuard ng;
  const auto& tensors = r.zero_manifest().at("tensors");
  auto& all = full.state();
  for (const auto& [name, p] : named) {
    if (!tensors.contains(name))
      throw std::runtime_error("checkpoint \"" + r.path() + "\": zero_shards.json has no tensor \"" + name +
                               "\"; hint: the checkpoint was written for another config or train.freeze");
    const int64_t step = tensors[name].value("adam_step", int64_t{0});
    if (step == 0) continue;
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(step);
    st->exp_avg(r.load_range("exp_avg/" + name, 0, p.numel()).view(p.sizes()).to(p.options()));
    st->exp_avg_sq(r.load_range("exp_avg_sq/" + name, 0, p.numel()).view(p.sizes()).to(p.options()));
    all[optimizer_state_key(all, p)] = std::move(st);
  }
}

}  // namespace omnilite
