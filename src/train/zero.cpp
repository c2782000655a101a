#include "omnilite/train/zero.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <sstream>
#include <type_traits>

namespace omnilite {
namespace {

// The optimizer's state key of a parameter: LibTorch 1.13 keys by the TensorImpl address printed as a string,
// 2.x by the address itself.
template <class Map>
typename Map::key_type state_key(const Map&, const torch::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << p.unsafeGetTensorImpl();
    return s.str();
  } else {
    return static_cast<Key>(static_cast<void*>(p.unsafeGetTensorImpl()));
  }
}

}  // namespace

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
        auto it = mine.find(state_key(mine, p));
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
        all[state_key(all, p)] = std::move(s);
      }
      off += 2 * p.numel();
    }
  }
}

void Zero1::take_state(torch::optim::AdamW& full, torch::optim::AdamW& sharded) {
  auto& all = full.state();
  auto& mine = sharded.state();
  for (size_t i : owned_by_[static_cast<size_t>(dist_->rank())]) {
    auto it = all.find(state_key(all, params_[i]));
    if (it != all.end()) mine[state_key(mine, params_[i])] = std::move(it->second);
  }
  all.clear();
}

}  // namespace omnilite
