// Where and how the model runs: device selection and the thread split between LibTorch and OpenBLAS.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite {

// "cpu", "cuda", "cuda:N" -> device; throws std::runtime_error naming the value when CUDA is absent or N is out of
// range.
torch::Device resolve_device(const std::string& name);

// Sets LibTorch's intra-op threads (0 = all cores) and OpenBLAS's pool (when libopenblas is loaded).
// OpenBLAS spins its own threads next to LibTorch's; on 2 cores two pools of 2 halve throughput, so the
// default gives LibTorch the cores and OpenBLAS one thread (see docs/benchmarks.md).
void configure_threads(int64_t intra_op_threads, int64_t blas_threads);

// Number of OpenBLAS threads in use, or -1 if OpenBLAS is not the loaded BLAS.
int blas_threads_in_use();
// For background threads (data loading): LibTorch ops issued from the calling thread run on that thread alone
// instead of opening an OpenMP team of their own beside the training thread's.
void use_one_thread_here();

// Peak memory allocated by the CUDA caching allocator on the current device since start, in GiB; -1 in builds
// without CUDA.
double cuda_peak_allocated_gib();

// Resident memory of this process now (VmRSS) and its peak so far (VmHWM, what /usr/bin/time -v reports as the
// maximum resident set size), in bytes; -1 where /proc is not available.
double resident_bytes();
double peak_resident_bytes();

// Applies runtime.threads/blas_threads and the seed (process-wide: the CLI calls it once), checks the CPU
// convolution backward once per process (check_cpu_conv_backward); returns the device.
torch::Device apply_runtime(const RuntimeOptions& rt);

// What check_cpu_conv_backward found.
struct ConvBackwardCheck {
  double error = 0;              // max |input gradient - float64 loop| over the probe convolutions, as first found
  bool onednn_disabled = false;  // oneDNN (mkldnn) was switched off for this process because of that error
  double error_after = 0;        // the same error after switching oneDNN off (0 when it was not switched)
};

// Computes the input gradients of a few small fp32 convolutions with LibTorch's CPU kernels and compares them with
// float64 loops. Debian 13's LibTorch 2.6 (oneDNN 3.6) returns wrong input gradients for 83 of 480 small shapes
// on an AMD EPYC (errors of order 1, sometimes NaN), which silently spoils VQ-VAE and ViT training; when the error
// exceeds 1e-4 and oneDNN is on, it is switched off for the process (slower convolutions, correct ones) with a
// warning. Runs the probe once per process; later calls return the first result.
ConvBackwardCheck check_cpu_conv_backward();

}  // namespace omnilite

namespace omnilite {

// The compute dtype of CUDA autocast when it is on (bf16 under AutocastGuard), nullopt when off. Custom autograd
// functions (Nf4Linear's matmul) are not cast by autocast itself and ask here.
c10::optional<torch::ScalarType> cuda_autocast_dtype();

// Enables CUDA autocast in `dtype` (default bf16) for its lifetime when `enabled` (runtime.dtype == "bf16" on a CUDA
// device, or a recomputation re-entering its forward's state); does nothing otherwise. Restores the previous state
// on destruction.
class AutocastGuard {
 public:
  explicit AutocastGuard(bool enabled, torch::ScalarType dtype = torch::kBFloat16);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool enabled_;
  bool previous_ = false;
};

// The states of the random generators a computation on some devices draws from: the CPU generator and the default
// generator of every CUDA device among them (what torch.utils.checkpoint saves with preserve_rng_state).
struct RngState {
  torch::Tensor cpu;                                     // the CPU generator's state (uint8)
  std::vector<std::pair<int64_t, torch::Tensor>> cuda;   // (CUDA device index, its generator's state)
};
// Reads the CPU generator and the generators of the CUDA devices in `devices` (CPU entries add nothing).
RngState capture_rng(const std::vector<torch::Device>& devices = {});
// Sets every generator in `state` back to it.
void restore_rng(const RngState& state);

}  // namespace omnilite
