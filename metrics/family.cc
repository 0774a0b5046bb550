// Labelled families: series creation/removal under a mutex, serialisation per metric type.
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "btx/metrics/metrics.h"
#include "text.h"

namespace btx::metrics {
namespace {

std::vector<std::string> Sanitized(const std::vector<std::string>& values) {
  std::vector<std::string> out;
  out.reserve(values.size());
  for (const auto& v : values) out.push_back(text::SanitizeUtf8(v));
  return out;
}

// `{a="x",b="y"` without the closing brace, so histograms can append le; empty if no labels
// and no extra label will follow.
void AppendLabels(std::string& out, const std::vector<std::string>& names,
                  const std::vector<std::string>& values) {
  for (std::size_t i = 0; i < names.size(); ++i) {
    out += i == 0 ? '{' : ',';
    out += names[i];
    out += "=\"";
    text::AppendEscapedLabelValue(out, values[i]);
    out += '"';
  }
}

// `name{labels} ` ready for the value.
void AppendSeries(std::string& out, std::string_view name, const std::vector<std::string>& names,
                  const std::vector<std::string>& values) {
  out += name;
  AppendLabels(out, names, values);
  if (!names.empty()) out += '}';
  out += ' ';
}

template <class M>
constexpr const char* TypeName() {
  if constexpr (std::is_same_v<M, Counter>) return "counter";
  if constexpr (std::is_same_v<M, Gauge>) return "gauge";
  if constexpr (std::is_same_v<M, Histogram>) return "histogram";
}

}  // namespace

template <class M>
Family<M>::Family(std::string name, std::string help, std::vector<std::string> label_names,
                  std::vector<double> buckets)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      buckets_(std::move(buckets)) {
  // Validate buckets now rather than at the first WithLabels deep inside a request handler.
  (void)Make();
  // A series without labels exists from the start: rate() and alerts such as "== 0" need a
  // sample before the first event, not a series that appears at 1.
  if (label_names_.empty()) series_.emplace(std::vector<std::string>{}, Make());
}

template <class M>
std::unique_ptr<M> Family<M>::Make() const {
  if constexpr (std::is_same_v<M, Histogram>) {
    return std::make_unique<M>(buckets_);
  } else {
    return std::make_unique<M>();
  }
}

template <class M>
M& Family<M>::WithLabels(const std::vector<std::string>& label_values) {
  if (label_values.size() != label_names_.size()) {
    throw std::invalid_argument(name_ + ": expected " + std::to_string(label_names_.size()) +
                                " label values, got " + std::to_string(label_values.size()));
  }
  auto key = Sanitized(label_values);
  std::lock_guard lock(mu_);
  auto it = series_.find(key);
  if (it == series_.end()) it = series_.emplace(std::move(key), Make()).first;
  return *it->second;
}

template <class M>
void Family<M>::Remove(const std::vector<std::string>& label_values) {
  const auto key = Sanitized(label_values);
  std::lock_guard lock(mu_);
  series_.erase(key);
}

template <class M>
void Family<M>::Clear() {
  std::lock_guard lock(mu_);
  series_.clear();
}

template <class M>
void Family<M>::SerializeTo(std::string& out) const {
  out += "# HELP ";
  out += name_;
  out += ' ';
  text::AppendEscapedHelp(out, help_);
  out += "\n# TYPE ";
  out += name_;
  out += ' ';
  out += TypeName<M>();
  out += '\n';
  std::lock_guard lock(mu_);
  for (const auto& [values, metric] : series_) {
    if constexpr (std::is_same_v<M, Histogram>) {
      const auto snap = metric->Collect();
      for (std::size_t i = 0; i < snap.cumulative.size(); ++i) {
        out += name_;
        out += "_bucket";
        AppendLabels(out, label_names_, values);
        out += label_names_.empty() ? "{le=\"" : ",le=\"";
        text::AppendDouble(out, i < snap.bounds.size() ? snap.bounds[i] : std::numeric_limits<double>::infinity());
        out += "\"} ";
        out += std::to_string(snap.cumulative[i]);
        out += '\n';
      }
      AppendSeries(out, name_ + "_sum", label_names_, values);
      text::AppendDouble(out, snap.sum);
      out += '\n';
      // Counts are printed as integers: exact beyond 2^53, where a double would round.
      AppendSeries(out, name_ + "_count", label_names_, values);
      out += std::to_string(snap.count);
      out += '\n';
    } else {
      AppendSeries(out, name_, label_names_, values);
      text::AppendDouble(out, metric->Value());
      out += '\n';
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

}  // namespace btx::metrics
