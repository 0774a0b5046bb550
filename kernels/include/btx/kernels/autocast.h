// CUDA and CPU autocast across LibTorch versions: 1.13 has only the device-specific calls, 2.4+ deprecates
// them in favour of per-device-type ones (and logs a warning on every call).
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace btx::kernels {

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
inline bool cuda_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA); }
inline at::ScalarType cuda_autocast_dtype() { return at::autocast::get_autocast_dtype(at::kCUDA); }
inline void set_cuda_autocast(bool enabled, at::ScalarType dtype) {
  at::autocast::set_autocast_enabled(at::kCUDA, enabled);
  at::autocast::set_autocast_dtype(at::kCUDA, dtype);
}
#else
inline bool cuda_autocast_enabled() { return at::autocast::is_enabled(); }
inline at::ScalarType cuda_autocast_dtype() { return at::autocast::get_autocast_gpu_dtype(); }
inline void set_cuda_autocast(bool enabled, at::ScalarType dtype) {
  at::autocast::set_enabled(enabled);
  at::autocast::set_autocast_gpu_dtype(dtype);
}
#endif

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
inline bool cpu_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCPU); }
inline at::ScalarType cpu_autocast_dtype() { return at::autocast::get_autocast_dtype(at::kCPU); }
inline void set_cpu_autocast(bool enabled, at::ScalarType dtype) {
  at::autocast::set_autocast_enabled(at::kCPU, enabled);
  at::autocast::set_autocast_dtype(at::kCPU, dtype);
}
#else
inline bool cpu_autocast_enabled() { return at::autocast::is_cpu_enabled(); }
inline at::ScalarType cpu_autocast_dtype() { return at::autocast::get_autocast_cpu_dtype(); }
inline void set_cpu_autocast(bool enabled, at::ScalarType dtype) {
  at::autocast::set_cpu_enabled(enabled);
  at::autocast::set_autocast_cpu_dtype(dtype);
}
#endif

// bf16 autocast on CPU for one scope (train.precision: bf16); as CudaAutocastScope below.
class CpuAutocastScope {
 public:
  explicit CpuAutocastScope(bool enable, at::ScalarType dtype = at::kBFloat16)
      : enabled_(enable), was_enabled_(cpu_autocast_enabled()), old_dtype_(cpu_autocast_dtype()) {
    if (enabled_) set_cpu_autocast(true, dtype);
  }
  ~CpuAutocastScope() {
    if (!enabled_) return;
    set_cpu_autocast(was_enabled_, old_dtype_);
    if (!was_enabled_) at::autocast::clear_cache();
  }
  CpuAutocastScope(const CpuAutocastScope&) = delete;
  CpuAutocastScope& operator=(const CpuAutocastScope&) = delete;

 private:
  bool enabled_, was_enabled_;
  at::ScalarType old_dtype_;
};

// Mixed precision on CUDA for one scope (bf16 by default, as the trainer uses); the cast cache is dropped
// at the end so weights updated by the optimizer are cast afresh next time.
class CudaAutocastScope {
 public:
  explicit CudaAutocastScope(bool enable, at::ScalarType dtype = at::kBFloat16)
      : enabled_(enable), was_enabled_(cuda_autocast_enabled()), old_dtype_(cuda_autocast_dtype()) {
    if (enabled_) set_cuda_autocast(true, dtype);
  }
  ~CudaAutocastScope() {
    if (!enabled_) return;
    set_cuda_autocast(was_enabled_, old_dtype_);
    if (!was_enabled_) at::autocast::clear_cache();
  }
  CudaAutocastScope(const CudaAutocastScope&) = delete;
  CudaAutocastScope& operator=(const CudaAutocastScope&) = delete;

 private:
  bool enabled_, was_enabled_;
  at::ScalarType old_dtype_;
};

}  // namespace btx::kernels
