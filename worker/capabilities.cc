// GPU discovery through the CUDA driver API, loaded with dlopen: the worker binary then runs on
// machines with or without a driver, and needs no CUDA toolkit at build time.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "btx/worker/worker.h"
#include "device_allocator.h"

namespace btx::worker {
namespace {

using CuInit = int (*)(unsigned);
using CuDeviceGetCount = int (*)(int*);
using CuDeviceGet = int (*)(int*, int);
using CuDeviceTotalMem = int (*)(size_t*, int);
using CuDeviceGetName = int (*)(char*, int, int);
using CuDeviceGetPciBusId = int (*)(char*, int, int);

void DiscoverGpus(Capabilities& caps) {
  void* lib = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) return;
  auto init = reinterpret_cast<CuInit>(::dlsym(lib, "cuInit"));
  auto count = reinterpret_cast<CuDeviceGetCount>(::dlsym(lib, "cuDeviceGetCount"));
  auto get = reinterpret_cast<CuDeviceGet>(::dlsym(lib, "cuDeviceGet"));
  auto mem = reinterpret_cast<CuDeviceTotalMem>(::dlsym(lib, "cuDeviceTotalMem_v2"));
  auto name = reinterpret_cast<CuDeviceGetName>(::dlsym(lib, "cuDeviceGetName"));
  auto pci = reinterpret_cast<CuDeviceGetPciBusId>(::dlsym(lib, "cuDeviceGetPCIBusId"));
  // The driver numbers only what the worker's CUDA_VISIBLE_DEVICES lets it see, in that list's order: a
  // child is given the list's names for its devices, not the worker's ordinals.
  const char* env = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::vector<std::string> visible = SplitVisibleDevices(env != nullptr ? env : "");
  int n = 0;
  if (init && count && get && mem && name && init(0) == 0 && count(&n) == 0) {
    for (int i = 0; i < n; ++i) {
      int dev = 0;
      size_t bytes = 0;
      char buf[256] = {};
      if (get(&dev, i) != 0 || mem(&bytes, dev) != 0) continue;
      name(buf, sizeof(buf) - 1, dev);
      caps.gpu_memory_bytes.push_back(static_cast<int64_t>(bytes));
      caps.gpu_names.emplace_back(buf);
      char bus[64] = {};
      caps.gpu_pci_bus_ids.emplace_back(pci && pci(bus, sizeof(bus) - 1, dev) == 0 ? bus : "");
      // The ordinal, not the position in caps: a device skipped above must not shift the others.
      const auto k = static_cast<size_t>(i);
      caps.gpu_cuda_ids.push_back(k < visible.size() && !visible[k].empty() ? visible[k] : std::to_string(i));
    }
  }
  // All or nothing: a partial list could not tell which GPU an index names.
  for (const auto& id : caps.gpu_pci_bus_ids) {
    if (id.empty()) {
      caps.gpu_pci_bus_ids.clear();
      break;
    }
  }
  // The driver library stays loaded: unloading CUDA after cuInit is not supported.
}

}  // namespace

Capabilities DiscoverCapabilities() {
  Capabilities caps;
  caps.cpu_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) caps.memory_bytes = static_cast<int64_t>(pages) * page;
  DiscoverGpus(caps);
  return caps;
}

}  // namespace btx::worker
