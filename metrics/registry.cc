// Name validation and the registry of families. Conventions that promtool only lints are
// enforced here, so a typo fails loudly at start-up instead of silently at query time.
#include <set>
#include <stdexcept>
#include <string_view>

#include "btx/metrics/metrics.h"
#include "text.h"

namespace btx::metrics {
namespace {

enum class Kind { kCounter, kGauge, kHistogram };

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

[[noreturn]] void Reject(const std::string& name, const std::string& why) {
  throw std::invalid_argument("metric " + name + ": " + why);
}

void Validate(const std::string& name, const std::string& help, Kind kind,
              const std::vector<std::string>& label_names) {
  if (!text::IsValidMetricName(name)) Reject(name, "name must match [a-zA-Z_:][a-zA-Z0-9_:]*");
  if (name.starts_with("__")) Reject(name, "names starting with __ are reserved");
  if (help.empty()) Reject(name, "help text is required");
  const bool total = EndsWith(name, "_total");
  if (kind == Kind::kCounter && !total) Reject(name, "counter names must end in _total");
  if (kind != Kind::kCounter && total) Reject(name, "only counter names may end in _total");
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    // These are the sample names a histogram derives from its family name.
    if (EndsWith(name, suffix)) Reject(name, std::string("suffix ") + suffix + " is reserved");
  }
  std::set<std::string_view> seen;
  for (const auto& label : label_names) {
    if (!text::IsValidLabelName(label)) {
      Reject(name, "label name '" + label + "' must match [a-zA-Z_][a-zA-Z0-9_]*");
    }
    if (label.starts_with("__")) Reject(name, "label names starting with __ are reserved");
    if (kind == Kind::kHistogram && label == "le") Reject(name, "label le is reserved");
    if (!seen.insert(label).second) Reject(name, "duplicate label name '" + label + "'");
  }
}

}  // namespace

void Registry::Reserve(const std::string& name) {
  if (families_.contains(name)) Reject(name, "already registered");
}

Family<Counter>& Registry::AddCounter(std::string name, std::string help,
                                      std::vector<std::string> label_names) {
  Validate(name, help, Kind::kCounter, label_names);
  std::lock_guard lock(mu_);
  Reserve(name);
  auto family = std::make_unique<Family<Counter>>(name, std::move(help), std::move(label_names),
                                                  std::vector<double>{});
  auto& ref = *family;
  families_.emplace(std::move(name), std::move(family));
  return ref;
}

Family<Gauge>& Registry::AddGauge(std::string name, std::string help,
                                  std::vector<std::string> label_names) {
  Validate(name, help, Kind::kGauge, label_names);
  std::lock_guard lock(mu_);
  Reserve(name);
  auto family = std::make_unique<Family<Gauge>>(name, std::move(help), std::move(label_names),
                                                std::vector<double>{});
  auto& ref = *family;
  families_.emplace(std::move(name), std::move(family));
  return ref;
}

Family<Histogram>& Registry::AddHistogram(std::string name, std::string help,
                                          std::vector<double> buckets,
                                          std::vector<std::string> label_names) {
  Validate(name, help, Kind::kHistogram, label_names);
  std::lock_guard lock(mu_);
  Reserve(name);
  auto family = std::make_unique<Family<Histogram>>(name, std::move(help), std::move(label_names),
                                                    std::move(buckets));
  auto& ref = *family;
  families_.emplace(std::move(name), std::move(family));
  return ref;
}

std::string Registry::Serialize() const {
  std::string out;
  std::lock_guard lock(mu_);
  for (const auto& [name, family] : families_) family->SerializeTo(out);
  return out;
}

}  // namespace btx::metrics
