// Minimal Prometheus client: counters, gauges and histograms grouped in labelled families,
// serialised in the text exposition format 0.0.4. Values are lock-free atomics so hot paths
// (heartbeats, RPC handlers) never contend with a scrape; only series creation takes a lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace btx::metrics {

class Counter {
 public:
  // Negative and NaN increments are ignored: a counter that went down would read as a reset
  // to rate(), and a NaN would poison the series until the process restarts.
  void Inc(double v = 1.0);
  double Value() const;

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v);
  void Inc(double v = 1.0);
  void Dec(double v = 1.0);
  double Value() const;
  void SetToCurrentTime();  // Unix time in seconds, the unit *_timestamp_seconds gauges expect

 private:
  std::atomic<double> value_{0.0};
};

class Histogram {
 public:
  // `bounds` are the finite upper bounds (inclusive, strictly increasing); the +Inf bucket is
  // implicit. A trailing +Inf is accepted and dropped. Throws std::invalid_argument otherwise.
  explicit Histogram(std::vector<double> bounds);
  // NaN observations are dropped: they carry no bucket and would turn _sum into NaN forever.
  void Observe(double v);

  struct Snapshot {
    std::vector<double> bounds;           // finite upper bounds, as configured
    std::vector<std::uint64_t> cumulative;  // bounds.size() + 1 entries; the last is +Inf
    double sum = 0.0;
    std::uint64_t count = 0;  // always equals cumulative.back()
  };
  Snapshot Collect() const;

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // per-bucket, not cumulative
  std::atomic<double> sum_{0.0};
};

namespace detail {
class FamilyBase {
 public:
  virtual ~FamilyBase() = default;
  virtual void SerializeTo(std::string& out) const = 0;
};
}  // namespace detail

template <class M>
class Family : public detail::FamilyBase {
 public:
  // Returns the series for these label values, creating it at zero. The reference stays valid
  // until Remove/Clear drops that series. Throws std::invalid_argument on a wrong value count.
  // Invalid UTF-8 in a value is replaced by U+FFFD so one bad value cannot break every scrape.
  M& WithLabels(const std::vector<std::string>& label_values);
  void Remove(const std::vector<std::string>& label_values);
  // Drops every series (the unlabelled one too, until the next WithLabels({})); references
  // into the dropped series dangle.
  void Clear();

  // Families are created through Registry::Add*; the rest of this section is for it.
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::vector<double> buckets);
  void SerializeTo(std::string& out) const override;

 private:
  std::unique_ptr<M> Make() const;

  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  std::vector<double> buckets_;  // histograms only
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<M>> series_;
};

class Registry {
 public:
  // Names follow the Prometheus data model and its conventions, which the registry enforces
  // (std::invalid_argument) so every exposition passes `promtool check metrics`: counters end
  // in _total, nothing else does; _bucket/_sum/_count are reserved for histograms; label
  // names are unique, not __-prefixed, and `le` is rejected on histograms; names are unique
  // in the registry. Returned references live as long as the registry.
  Family<Counter>& AddCounter(std::string name, std::string help,
                              std::vector<std::string> label_names = {});
  Family<Gauge>& AddGauge(std::string name, std::string help,
                          std::vector<std::string> label_names = {});
  Family<Histogram>& AddHistogram(std::string name, std::string help, std::vector<double> buckets,
                                  std::vector<std::string> label_names = {});

  // Families sorted by name, series by label values: stable output for diffs and tests.
  std::string Serialize() const;

 private:
  void Reserve(const std::string& name);

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<detail::FamilyBase>> families_;
};

// {start, start*factor, ..., start*factor^(count-1)}; throws std::invalid_argument unless
// start > 0, factor > 1 and count >= 1.
std::vector<double> ExponentialBuckets(double start, double factor, int count);

}  // namespace btx::metrics
