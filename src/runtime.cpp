#include "omnilite/runtime.h"

#include <dlfcn.h>

#include <ATen/autocast_mode.h>
#include <torch/version.h>
#if OMNILITE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <cmath>
#include <fstream>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "omnilite/log.h"

namespace omnilite {

torch::Device resolve_device(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    if (!torch::cuda::is_available())
      throw std::runtime_error("device \"" + name + "\": CUDA is not available in this build or machine (LibTorch " +
                               "sees no GPU); hint: use --device cpu or a CUDA LibTorch via CMAKE_PREFIX_PATH");
    torch::Device d(name);
    const auto n = static_cast<int64_t>(torch::cuda::device_count());
    if (d.has_index() && d.index() >= n)
      throw std::runtime_error("device \"" + name + "\": only " + std::to_string(n) + " CUDA device(s) present");
    return d;
  }
  throw std::runtime_error("device \"" + name + "\": expected cpu, cuda or cuda:N");
}

namespace {
using SetThreadsFn = void (*)(int);
using GetThreadsFn = int (*)();
}  // namespace

void configure_threads(int64_t intra_op_threads, int64_t blas_threads) {
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  torch::set_num_threads(static_cast<int>(intra_op_threads > 0 ? intra_op_threads : cores));
  if (auto fn = reinterpret_cast<SetThreadsFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    fn(static_cast<int>(blas_threads > 0 ? blas_threads : cores));
}

void use_one_thread_here() {
  // LibTorch sets each new thread's OpenMP team size lazily on its first parallel op; do that first, then shrink
  // this thread's own team size (an OpenMP per-thread setting, unlike torch::set_num_threads which is global).
  at::internal::lazy_init_num_threads();
  using OmpSetFn = void (*)(int);
  if (auto fn = reinterpret_cast<OmpSetFn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"))) fn(1);
}

int blas_threads_in_use() {
  if (auto fn = reinterpret_cast<GetThreadsFn>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"))) return fn();
  return -1;
}

double cuda_peak_allocated_gib() {
#if OMNILITE_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  const auto peak = stats.allocated_bytes[0].peak;  // index 0 = StatType::AGGREGATE in every LibTorch version
  return static_cast<double>(peak) / (1024.0 * 1024.0 * 1024.0);
#else
  return -1.0;
#endif
}

namespace {

// A "Vm...:  N kB" line of /proc/self/status in bytes, or -1.
double proc_status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string k = std::string(key) + ":";
  while (std::getline(f, line))
    if (line.rfind(k, 0) == 0) return 1024.0 * std::stod(line.substr(k.size()));
  return -1.0;
}

}  // namespace

double resident_bytes() { return proc_status_kb("VmRSS"); }
double peak_resident_bytes() { return proc_status_kb("VmHWM"); }

namespace {

// Input gradient of conv2d(x, w, stride, pad) for output gradient gy, by loops in float64: [N, Ci, S, S].
torch::Tensor conv_input_grad_loops(const torch::Tensor& w, const torch::Tensor& gy, int64_t S, int64_t stride,
                                    int64_t pad) {
  const int64_t N = gy.size(0), Co = w.size(0), Ci = w.size(1), K = w.size(2), So = gy.size(2);
  auto gx = torch::zeros({N, Ci, S, S}, torch::kFloat64);
  auto W = w.to(torch::kFloat64).contiguous();
  auto GY = gy.to(torch::kFloat64).contiguous();
  auto a = gx.accessor<double, 4>();
  auto wa = W.accessor<double, 4>();
  auto ga = GY.accessor<double, 4>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < Co; ++o)
      for (int64_t i = 0; i < So; ++i)
        for (int64_t j = 0; j < So; ++j)
          for (int64_t c = 0; c < Ci; ++c)
            for (int64_t ki = 0; ki < K; ++ki)
              for (int64_t kj = 0; kj < K; ++kj) {
                const int64_t ii = i * stride + ki - pad, jj = j * stride + kj - pad;
                if (ii >= 0 && jj >= 0 && ii < S && jj < S) a[n][c][ii][jj] += ga[n][o][i][j] * wa[o][c][ki][kj];
              }
  return gx;
}

// Max |input gradient - loops| over convolutions of the shapes the faulty build got wrong.
double conv_backward_error() {
  struct Probe { int64_t ci, co, size, batch, k, stride; };
  const Probe probes[] = {{3, 3, 4, 2, 3, 1}, {8, 8, 8, 2, 3, 1}, {3, 8, 8, 1, 4, 2}, {16, 8, 32, 2, 3, 1}};
  auto gen = at::detail::createCPUGenerator(1234);
  double worst = 0;
  for (const auto& p : probes) {
    auto w = at::normal(0.0, 0.1, {p.co, p.ci, p.k, p.k}, gen);
    auto x = at::normal(0.0, 1.0, {p.batch, p.ci, p.size, p.size}, gen);
    torch::AutoGradMode grad_on(true);  // also when called under a NoGradGuard
    auto xx = x.clone().requires_grad_();
    auto y = torch::conv2d(xx, w, {}, p.stride, 1);
    auto gy = at::normal(0.0, 1.0, y.sizes(), gen);
    auto gx = torch::autograd::grad({y}, {xx}, {gy})[0];
    const double e =
        (gx.to(torch::kFloat64) - conv_input_grad_loops(w, gy, p.size, p.stride, 1)).abs().max().item<double>();
    worst = std::isfinite(e) ? std::max(worst, e) : std::numeric_limits<double>::infinity();
  }
  return worst;
}

}  // namespace

ConvBackwardCheck check_cpu_conv_backward() {
  static std::once_flag once;
  static ConvBackwardCheck result;
  std::call_once(once, [] {
    result.error = conv_backward_error();
    if (result.error <= 1e-4 || !at::globalContext().userEnabledMkldnn()) {
      if (result.error > 1e-4)
        log::warn(log::format("LibTorch %s computes wrong CPU convolution gradients (max error %.3g against a float64 "
                              "loop) and oneDNN is already off; hint: use another LibTorch build",
                              TORCH_VERSION, result.error));
      return;
    }
    at::globalContext().setUserEnabledMkldnn(false);
    result.onednn_disabled = true;
    result.error_after = conv_backward_error();
    log::warn(log::format("LibTorch %s: oneDNN's CPU convolution backward gives wrong input gradients here (max error "
                          "%.3g against a float64 loop); oneDNN is switched off for this process (error now %.3g, "
                          "convolutions slower)", TORCH_VERSION, result.error, result.error_after));
  });
  return result;
}

torch::Device apply_runtime(const RuntimeOptions& rt) {
  configure_threads(rt.threads, rt.blas_threads);
  check_cpu_conv_backward();
  torch::manual_seed(rt.seed);
  return resolve_device(rt.device);
}

// LibTorch 2.4 made autocast per device type; 1.13 has the CUDA-only functions.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
AutocastGuard::AutocastGuard(bool enabled, torch::ScalarType dtype) : enabled_(enabled) {
  if (!enabled_) return;
  previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
}
AutocastGuard::~AutocastGuard() {
  if (!enabled_) return;
  at::autocast::set_autocast_enabled(at::kCUDA, previous_);
  if (!previous_) at::autocast::clear_cache();
}
c10::optional<torch::ScalarType> cuda_autocast_dtype() {
  if (!at::autocast::is_autocast_enabled(at::kCUDA)) return c10::nullopt;
  return at::autocast::get_autocast_dtype(at::kCUDA);
}
#else
AutocastGuard::AutocastGuard(bool enabled, torch::ScalarType dtype) : enabled_(enabled) {
  if (!enabled_) return;
  previous_ = at::autocast::is_enabled();
  at::autocast::set_autocast_gpu_dtype(dtype);
  at::autocast::set_enabled(true);
}
AutocastGuard::~AutocastGuard() {
  if (!enabled_) return;
  at::autocast::set_enabled(previous_);
  if (!previous_) at::autocast::clear_cache();
}
c10::optional<torch::ScalarType> cuda_autocast_dtype() {
  if (!at::autocast::is_enabled()) return c10::nullopt;
  return at::autocast::get_autocast_gpu_dtype();
}
#endif

namespace {
// Generators are shared by threads (data loaders draw noise); their state is read and set under their own mutex.
torch::Tensor generator_state(at::Generator g) {  // a handle: copies share the generator
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}
void set_generator_state(at::Generator g, const torch::Tensor& state) {
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}
}  // namespace

RngState capture_rng(const std::vector<torch::Device>& devices) {
  RngState s;
  s.cpu = generator_state(at::detail::getDefaultCPUGenerator());
  for (const auto& d : devices) {
    if (!d.is_cuda()) continue;
    const int64_t index = d.has_index() ? d.index() : 0;  // a tensor's CUDA device always has its index
    bool seen = false;
    for (const auto& [i, t] : s.cuda) seen = seen || i == index;
    if (!seen)
      s.cuda.emplace_back(index, generator_state(at::globalContext().defaultGenerator(
                                     torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index)))));
  }
  return s;
}

void restore_rng(const RngState& state) {
  if (state.cpu.defined()) set_generator_state(at::detail::getDefaultCPUGenerator(), state.cpu);
  for (const auto& [index, t] : state.cuda)
    set_generator_state(
        at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index))), t);
}

}  // namespace omnilite
