#include "gpu_memory.h"

#include <dlfcn.h>

#include <type_traits>

#include "btx/common/strings.h"

namespace btx::worker {
namespace {

// The few NVML declarations used (nvml.h, stable since driver R319), so the build needs no
// NVIDIA headers. nvmlReturn_t is a C enum: int-sized, 0 is NVML_SUCCESS.
using NvmlReturn = int;
using NvmlDevice = void*;
struct NvmlMemory {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};

}  // namespace

struct GpuMemoryReader::Api {
  NvmlReturn (*init)();
  NvmlReturn (*shutdown)();
  const char* (*error_string)(NvmlReturn);
  NvmlReturn (*device_count)(unsigned*);
  NvmlReturn (*by_index)(unsigned, NvmlDevice*);
  NvmlReturn (*by_pci_bus_id)(const char*, NvmlDevice*);
  NvmlReturn (*memory_info)(NvmlDevice, NvmlMemory*);

  std::string Error(NvmlReturn r) const {
    const char* s = error_string ? error_string(r) : nullptr;
    return s ? Cat(s, " (NVML error ", r, ")") : Cat("NVML error ", r);
  }
};

absl::StatusOr<std::unique_ptr<GpuMemoryReader>> GpuMemoryReader::Open(const std::vector<std::string>& pci_bus_ids,
                                                                       const std::string& library) {
  void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = ::dlerror();
    return absl::UnavailableError(Cat("cannot load ", library, " (no NVIDIA driver?): ", why ? why : "unknown error"));
  }
  auto api = std::make_unique<Api>();
  std::string missing;
  auto bind = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(handle, name));
    if (fn == nullptr && missing.empty()) missing = name;
  };
  bind(api->init, "nvmlInit_v2");
  bind(api->shutdown, "nvmlShutdown");
  bind(api->error_string, "nvmlErrorString");
  bind(api->device_count, "nvmlDeviceGetCount_v2");
  bind(api->by_index, "nvmlDeviceGetHandleByIndex_v2");
  bind(api->by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2");
  bind(api->memory_info, "nvmlDeviceGetMemoryInfo");
  if (!missing.empty()) {
    ::dlclose(handle);
    return absl::UnavailableError(Cat(library, " has no function ", missing, "; not NVML, or a driver older than R319"));
  }
  if (NvmlReturn r = api->init(); r != 0) {
    const std::string why = api->Error(r);
    ::dlclose(handle);
    return absl::UnavailableError(Cat("NVML did not initialise: ", why));
  }
  std::vector<std::pair<int, void*>> devices;
  std::string skipped;
  if (!pci_bus_ids.empty()) {
    for (size_t i = 0; i < pci_bus_ids.size(); ++i) {
      NvmlDevice d = nullptr;
      if (NvmlReturn r = api->by_pci_bus_id(pci_bus_ids[i].c_str(), &d); r == 0) {
        devices.emplace_back(static_cast<int>(i), d);
      } else {
        skipped += Cat(skipped.empty() ? "" : "; ", "GPU ", i, " (", pci_bus_ids[i], "): ", api->Error(r));
      }
    }
  } else {
    unsigned n = 0;
    if (NvmlReturn r = api->device_count(&n); r != 0) skipped = Cat("device count: ", api->Error(r));
    for (unsigned i = 0; i < n; ++i) {
      NvmlDevice d = nullptr;
      if (NvmlReturn r = api->by_index(i, &d); r == 0) {
        devices.emplace_back(static_cast<int>(i), d);
      } else {
        skipped += Cat(skipped.empty() ? "" : "; ", "GPU ", i, ": ", api->Error(r));
      }
    }
  }
  if (devices.empty()) {
    api->shutdown();
    ::dlclose(handle);
    return absl::UnavailableError(Cat("NVML found no GPU", skipped.empty() ? "" : ": ", skipped));
  }
  return std::unique_ptr<GpuMemoryReader>(new GpuMemoryReader(handle, std::move(api), std::move(devices)));
}

GpuMemoryReader::GpuMemoryReader(void* handle, std::unique_ptr<Api> api, std::vector<std::pair<int, void*>> devices)
    : handle_(handle), api_(std::move(api)), devices_(std::move(devices)) {}

GpuMemoryReader::~GpuMemoryReader() {
  api_->shutdown();
  ::dlclose(handle_);
}

std::vector<GpuMemorySample> GpuMemoryReader::Read() const {
  std::vector<GpuMemorySample> out;
  out.reserve(devices_.size());
  for (const auto& [gpu, device] : devices_) {
    NvmlMemory m{};
    if (api_->memory_info(device, &m) != 0) continue;
    out.push_back({gpu, static_cast<int64_t>(m.used), static_cast<int64_t>(m.total)});
  }
  return out;
}

}  // namespace btx::worker
