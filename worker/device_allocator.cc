#include "device_allocator.h"

#include <algorithm>

namespace btx::worker {

DeviceAllocator::DeviceAllocator(int devices)
    : held_(static_cast<size_t>(std::max(0, devices)), false), free_(std::max(0, devices)) {}

std::optional<std::vector<int>> DeviceAllocator::Acquire(int count) {
  if (count < 0 || count > free_) return std::nullopt;
  std::vector<int> out;
  for (int i = 0; i < total() && static_cast<int>(out.size()) < count; ++i) {
    if (!held_[static_cast<size_t>(i)]) out.push_back(i);
  }
  for (int i : out) held_[static_cast<size_t>(i)] = true;
  free_ -= count;
  return out;
}

bool DeviceAllocator::Release(const std::vector<int>& devices) {
  std::vector<bool> releasing(held_.size(), false);
  for (int d : devices) {
    if (d < 0 || d >= total()) return false;
    const auto i = static_cast<size_t>(d);
    if (!held_[i] || releasing[i]) return false;
    releasing[i] = true;
  }
  for (int d : devices) held_[static_cast<size_t>(d)] = false;
  free_ += static_cast<int>(devices.size());
  return true;
}

std::vector<std::string> CudaDeviceIds(const std::vector<int>& devices, const std::vector<std::string>& ids) {
  std::vector<std::string> out;
  out.reserve(devices.size());
  for (int d : devices) {
    const bool named = d >= 0 && static_cast<size_t>(d) < ids.size() && !ids[static_cast<size_t>(d)].empty();
    out.push_back(named ? ids[static_cast<size_t>(d)] : std::to_string(d));
  }
  return out;
}

std::vector<std::string> SplitVisibleDevices(std::string_view list) {
  std::vector<std::string> names;
  while (!list.empty()) {
    const size_t comma = std::min(list.find(','), list.size());
    std::string_view name = list.substr(0, comma);
    while (!name.empty() && name.front() == ' ') name.remove_prefix(1);
    while (!name.empty() && name.back() == ' ') name.remove_suffix(1);
    names.emplace_back(name);
    list.remove_prefix(std::min(comma + 1, list.size()));
  }
  return names;
}

}  // namespace btx::worker
