#include "omnilite/modules/moe.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "omnilite/runtime.h"

// at::_grouped_mm (2D x 3D with int32 end offsets): a CUDA kernel (CUTLASS on sm90+ in bf16) and a derivative since
// LibTorch 2.8, a kernel for other devices and dtypes since 2.9 (from PyTorch's history as known here; compiled,
// run and tested on 2.14 only, docs/gpu.md).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define OMNILITE_GROUPED_MM 1
#else
#define OMNILITE_GROUPED_MM 0
#endif

namespace omnilite {

namespace {
// The dtype the expert GEMMs run in: CUDA autocast's when it is on, x's otherwise.
torch::ScalarType compute_dtype(const torch::Tensor& x) {
  if (x.is_cuda())
    if (auto dt = cuda_autocast_dtype()) return *dt;
  return x.scalar_type();
}
// One token without gradients (batch-1 decoding) on the loop path: its K experts run on it directly, in ascending
// expert order, and their weighted outputs are summed in that order, as forward's sort and index_add sum them
// (0 + a + b), without the sort, gather and scatter kernels. x: [1, D], weights / ids: [1, K] -> [1, D]
torch::Tensor one_token_experts(torch::nn::ModuleList& experts, const torch::Tensor& x,
                                const torch::Tensor& weights, const torch::Tensor& ids) {
  const auto host_ids = ids.reshape({-1}).to(torch::kCPU).contiguous();
  const int64_t* id = host_ids.data_ptr<int64_t>();
  std::vector<int64_t> slots(static_cast<size_t>(host_ids.numel()));
  std::iota(slots.begin(), slots.end(), int64_t{0});
  std::sort(slots.begin(), slots.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });  // by expert id
  const auto w = weights.reshape({-1});
  auto y = torch::zeros_like(x);
  for (const int64_t slot : slots) y += experts[id[slot]]->as<SwiGLUExpertImpl>()->forward(x) * w.narrow(0, slot, 1);
  return y;
}

}  // namespace

MoEDispatch parse_moe_dispatch(const std::string& name) {
  if (name == "auto") return MoEDispatch::Auto;
  if (name == "loop") return MoEDispatch::Loop;
  if (name == "grouped") return MoEDispatch::Grouped;
  throw std::invalid_argument("MoE dispatch \"" + name + "\": must be \"auto\", \"loop\" or \"grouped\"");
}
const char* moe_dispatch_name(MoEDispatch d) {
  switch (d) {
    case MoEDispatch::Loop: return "loop";
    case MoEDispatch::Grouped: return "grouped";
    default: return "auto";
  }
}
bool moe_grouped_available() { return OMNILITE_GROUPED_MM != 0; }
void set_moe_dispatch(torch::nn::Module& model, MoEDispatch d) {
  for (const auto& m : model.modules())
    if (auto* moe = dynamic_cast<MoEImpl*>(m.get())) moe->dispatch = d;
}
MoEPathCounts moe_path_counts(const torch::nn::Module& model) {
  MoEPathCounts sum;
  for (const auto& m : model.modules())
    if (const auto* moe = dynamic_cast<const MoEImpl*>(m.get())) {
      sum.loop += moe->forwards.loop;
      sum.grouped += moe->forwards.grouped;
    }
  return sum;
}

SwiGLUExpertImpl::SwiGLUExpertImpl(int64_t dim, int64_t hidden, const LinearBuilder& builder,
                                   const std::string& path) {
  w1 = register_module("w1", builder.make(join_path(path, "w1"), dim, hidden, false));
  w2 = register_module("w2", builder.make(join_path(path, "w2"), hidden, dim, false));
  w3 = register_module("w3", builder.make(join_path(path, "w3"), dim, hidden, false));
}

// x: [n, D] -> [n, D]
torch::Tensor SwiGLUExpertImpl::forward(const torch::Tensor& x) {
  return w2->forward(torch::silu(w1->forward(x)) * w3->forward(x));
}

MoEImpl::MoEImpl(int64_t dim, const MoEOptions& o, const LinearBuilder& builder, const std::string& path)
    : opts(o) {
  gate = register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(dim, o.num_experts).bias(false)));
  gate->weight.data().normal_(0.0, kInitStd);
  for (int64_t e = 0; e < o.num_experts; ++e)
    experts->push_back(SwiGLUExpert(dim, o.expert_hidden, builder, join_path(path, "experts." + std::to_string(e))));
  register_module("experts", experts);
  plain_experts_ = true;
  for (const auto& m : *experts) {
    auto* ex = m->as<SwiGLUExpertImpl>();
    for (const auto& l : {ex->w1, ex->w2, ex->w3}) {
      auto* p = dynamic_cast<PlainLinearImpl*>(l.get());
      plain_experts_ = plain_experts_ && p != nullptr && !p->bias.defined();
    }
  }
}

// router_logits: [N, E] -> (weights [N, K], ids [N, K])
std::pair<torch::Tensor, torch::Tensor> MoEImpl::route(const torch::Tensor& router_logits) const {
  const auto acc = router_logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto probs = torch::softmax(router_logits.to(acc), -1);  // [N, E]
  auto top = probs.topk(opts.top_k, -1);                    // values, indices: [N, K]
  auto weights = std::get<0>(top);
  weights = weights / weights.sum(-1, /*keepdim=*/true);
  return {weights, std::get<1>(top)};
}

std::string MoEImpl::grouped_obstacle(const torch::Tensor& x) const {
  if (!OMNILITE_GROUPED_MM)
    return "this build's LibTorch " TORCH_VERSION
           " has no at::_grouped_mm with a CPU kernel and derivative (needs >= 2.9)";
  if (!plain_experts_) return "the experts are LoRA or NF4 projections (the grouped path needs plain weights)";
  const auto dtype = compute_dtype(x);
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16)
    return std::string("compute dtype ") + c10::toString(dtype) + " (at::_grouped_mm takes fp32, bf16 or fp16)";
  const int64_t align = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t D = x.size(-1), F = opts.expert_hidden;
  if (D % align != 0 || F % align != 0)
    return "width D = " + std::to_string(D) + " or expert_hidden F = " + std::to_string(F) +
           " is not a multiple of " + std::to_string(align) + " (at::_grouped_mm needs 16-byte row strides)";
  return {};
}

bool MoEImpl::uses_grouped(const torch::Tensor& x) const {
  switch (dispatch) {
    case MoEDispatch::Loop: return false;
    case MoEDispatch::Grouped: {
      const auto why = grouped_obstacle(x);
      if (!why.empty())
        throw std::runtime_error("runtime.moe_dispatch = \"grouped\": " + why +
                                 "; hint: use \"auto\" (falls back to the loop) or \"loop\"");
      return true;
    }
    default:
      // The grouped GEMM is meant for CUDA in bf16, where launches and host syncs weigh most. On the CPU it gained
      // nothing (the loop was faster in 5 of 6 measured pairs; docs/benchmarks.md).
      return x.is_cuda() && compute_dtype(x) == torch::kBFloat16 && grouped_obstacle(x).empty();
  }
}

// xs: [S, D] slots in expert order, counts: [E] -> [S, D]
torch::Tensor MoEImpl::loop_experts(const torch::Tensor& xs, const torch::Tensor& counts) {
  const auto host = counts.to(torch::kCPU);  // the one host sync of this path
  const int64_t* c = host.data_ptr<int64_t>();
  std::vector<torch::Tensor> outs;
  outs.reserve(opts.num_experts);
  int64_t start = 0;
  for (int64_t e = 0; e < opts.num_experts; ++e) {
    if (c[e] == 0) continue;
    auto slice = xs.narrow(0, start, c[e]);                      // [n_e, D] contiguous slice of expert e
    outs.push_back(experts[e]->as<SwiGLUExpertImpl>()->forward(slice));
    start += c[e];
  }
  return torch::cat(outs, 0);
}

// xs: [S, D] slots in expert order, counts: [E] -> [S, D]
torch::Tensor MoEImpl::grouped_experts(const torch::Tensor& xs, const torch::Tensor& counts) {
#if OMNILITE_GROUPED_MM
  const int64_t E = opts.num_experts, F = opts.expert_hidden, D = xs.size(1);
  const auto dtype = compute_dtype(xs);  // cast here: autocast may not cast at::_grouped_mm's operands itself
  // Stacked weights in the compute dtype: w1 and w3 interleaved per expert -> [E, 2F, D]; w2 -> [E, D, F].
  // (One copy per forward; its backward hands each expert its own slice of the gradient.)
  std::vector<torch::Tensor> up, down;
  up.reserve(2 * E);
  down.reserve(E);
  for (const auto& m : *experts) {
    auto* ex = m->as<SwiGLUExpertImpl>();
    up.push_back(static_cast<PlainLinearImpl*>(ex->w1.get())->weight.to(dtype));    // [F, D]
    up.push_back(static_cast<PlainLinearImpl*>(ex->w3.get())->weight.to(dtype));    // [F, D]
    down.push_back(static_cast<PlainLinearImpl*>(ex->w2.get())->weight.to(dtype));  // [D, F]
  }
  auto w13 = torch::stack(up).view({E, 2 * F, D});  // [E, 2F, D]
  auto w2 = torch::stack(down);                      // [E, D, F]
  auto offs = counts.cumsum(0).to(torch::kInt32);    // [E] end of each expert's rows, on the device
  auto h = at::_grouped_mm(xs.to(dtype), w13.transpose(1, 2), offs);  // [S, 2F]
  auto act = torch::silu(h.narrow(1, 0, F)) * h.narrow(1, F, F);      // [S, F]
  return at::_grouped_mm(act, w2.transpose(1, 2), offs);              // [S, D]
#else
  (void)xs;
  (void)counts;
  throw std::logic_error("MoE grouped dispatch is not compiled in this build");
#endif
}

// x: [B, T, D] -> y: [B, T, D], router_logits: [B*T, E]
MoEOutput MoEImpl::forward(const torch::Tensor& x) {
  const int64_t D = x.size(-1), K = opts.top_k, E = opts.num_experts;
  auto flat = x.reshape({-1, D});                    // [N, D]
  const int64_t N = flat.size(0);
  auto router_logits = gate->forward(flat);          // [N, E]
  auto [weights, ids] = route(router_logits);        // [N, K] each
  weights = weights.to(x.scalar_type());
  if (N == 1 && !torch::GradMode::is_enabled() && !uses_grouped(x)) {
    ++forwards.loop;
    return {one_token_experts(experts, flat, weights, ids).view(x.sizes()), router_logits};
  }

  // Sort the N*K slots by expert: slot s belongs to token s / K.
  auto flat_ids = ids.reshape({-1});                             // [N*K]
  auto order = flat_ids.argsort();                               // slots grouped by expert
  auto token_of_slot = order.div(K, "floor");                    // [N*K]
  auto slot_weights = weights.reshape({-1}).index_select(0, order).unsqueeze(1);  // [N*K, 1]
  // Slots per expert, counted on the device (bincount would read its maximum back to the host on CUDA).
  auto counts = torch::zeros({E}, flat_ids.options()).scatter_add_(0, flat_ids, torch::ones_like(flat_ids));  // [E]
  auto xs = flat.index_select(0, token_of_slot);                 // [N*K, D] inputs in expert order

  const bool grouped = uses_grouped(x);
  ++(grouped ? forwards.grouped : forwards.loop);
  auto out = grouped ? grouped_experts(xs, counts) : loop_experts(xs, counts);  // [N*K, D]
  auto ys = out * slot_weights;                                  // [N*K, D]
  auto y = torch::zeros({N, D}, x.options()).index_add(0, token_of_slot, ys);  // sum the K slots per token
  return {y.view(x.sizes()), router_logits};
}

}  // namespace omnilite
