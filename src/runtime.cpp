#include "omnilite/runtime.h"

#include <dlfcn.h>

#include <ATen/autocast_mode.h>
#include <torch/version.h>
#if OMNILITE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

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

torch::Device apply_runtime(const RuntimeOptions& rt) {
  configure_threads(rt.threads, rt.blas_threads);
  torch::manual_seed(rt.seed);
  return resolve_device(rt.device);
}

// LibTorch 2.4 made autocast per device type; 1.13 has the CUDA-only functions.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
AutocastGuard::AutocastGuard(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  previous_ = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
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
AutocastGuard::AutocastGuard(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  previous_ = at::autocast::is_enabled();
  at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
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

}  // namespace omnilite
