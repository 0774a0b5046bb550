// GPU memory per device through NVML, the management library the NVIDIA driver installs
// (libnvidia-ml.so.1), loaded with dlopen like the CUDA driver in capabilities.cc: the worker
// builds without the CUDA toolkit and runs, with no GPU metrics, where there is no driver.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace btx::worker {

inline constexpr char kNvmlLibrary[] = "libnvidia-ml.so.1";

struct GpuMemorySample {
  int gpu = 0;  // the worker's index: device i is the one its jobs run on as cuda:i
  int64_t used_bytes = 0;
  int64_t total_bytes = 0;
};

class GpuMemoryReader {
 public:
  // Loads `library` and initialises NVML. `pci_bus_ids` are the CUDA devices in CUDA's order
  // (Capabilities::gpu_pci_bus_ids): NVML numbers devices by PCI bus and ignores
  // CUDA_VISIBLE_DEVICES, so its own indices can name a different GPU than cuda:i. Empty: every
  // device NVML sees, in its order. UNAVAILABLE when the library, one of its functions or the
  // driver is missing, or no device is found; the message says which.
  static absl::StatusOr<std::unique_ptr<GpuMemoryReader>> Open(const std::vector<std::string>& pci_bus_ids = {},
                                                               const std::string& library = kNvmlLibrary);
  ~GpuMemoryReader();
  GpuMemoryReader(const GpuMemoryReader&) = delete;
  GpuMemoryReader& operator=(const GpuMemoryReader&) = delete;

  int devices() const { return static_cast<int>(devices_.size()); }
  // One sample per device whose query succeeded (a GPU that fell off the bus is left out rather
  // than reported as empty). Thread-safe, as NVML is.
  std::vector<GpuMemorySample> Read() const;

 private:
  struct Api;
  GpuMemoryReader(void* handle, std::unique_ptr<Api> api, std::vector<std::pair<int, void*>> devices);

  void* handle_;
  std::unique_ptr<Api> api_;
  std::vector<std::pair<int, void*>> devices_;  // (worker index, nvmlDevice_t)
};

}  // namespace btx::worker
