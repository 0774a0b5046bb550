// Which of the host's GPUs each running job holds. A job gets exactly the number of devices it asked for,
// all distinct and held by no other job, or none at all: running a multi-GPU job on fewer devices would
// slow it down silently and, worse, tell the scheduler (through free_gpus) that the host has room it has not.
// Pure bookkeeping, not thread-safe: the worker calls it under its own lock.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace btx::worker {

class DeviceAllocator {
 public:
  explicit DeviceAllocator(int devices = 0);

  int total() const { return static_cast<int>(held_.size()); }
  int free() const { return free_; }
  // `count` distinct free device indices, lowest first, now held by the caller; nullopt, with nothing
  // taken, when fewer are free (or count < 0). A CPU job asks for 0 and gets an empty set.
  std::optional<std::vector<int>> Acquire(int count);
  // Frees a set an earlier Acquire returned. False, with nothing freed, when the set names a device that
  // is not held, is out of range or is listed twice: a bookkeeping error that must not free a device
  // another job is using.
  bool Release(const std::vector<int>& devices);

 private:
  std::vector<bool> held_;
  int free_ = 0;
};

// How a child's CUDA_VISIBLE_DEVICES names each of `devices`: ids[i] for device i when the worker was given
// one (its own CUDA_VISIBLE_DEVICES entry: the driver numbers only what it lets the worker see), else "i".
std::vector<std::string> CudaDeviceIds(const std::vector<int>& devices, const std::vector<std::string>& ids);
// A CUDA_VISIBLE_DEVICES value split into its entries ("4, GPU-5f3c" -> {"4", "GPU-5f3c"}); "" -> none.
std::vector<std::string> SplitVisibleDevices(std::string_view list);

}  // namespace btx::worker
