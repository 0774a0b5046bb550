// Time source, injected everywhere time matters (leases, backoff, heartbeats) so tests are
// deterministic: they advance a ManualClock instead of sleeping.
#pragma once

#include <chrono>
#include <mutex>

namespace btx {

using TimePoint = std::chrono::system_clock::time_point;
using Duration = std::chrono::milliseconds;

class Clock {
 public:
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
};

class SystemClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::system_clock::now(); }
};

class ManualClock final : public Clock {
 public:
  explicit ManualClock(TimePoint start = TimePoint(std::chrono::seconds(1'700'000'000))) : now_(start) {}
  TimePoint Now() const override;
  void Advance(Duration d);
  void Set(TimePoint t);

 private:
  mutable std::mutex mu_;
  TimePoint now_;
};

int64_t ToUnixMicros(TimePoint t);
TimePoint FromUnixMicros(int64_t us);

}  // namespace btx
