#include "output.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <regex>

#include "btx/common/strings.h"
#include "btx/contract/job.h"

namespace btx::cli {
using json = nlohmann::json;

absl::StatusOr<Format> ParseFormat(const std::string& name) {
  if (name == "table" || name == "wide") return Format::kTable;
  if (name == "json") return Format::kJson;
  if (name == "yaml") return Format::kYaml;
  return absl::InvalidArgumentError(Cat("-o ", name, ": expected table, json or yaml"));
}

namespace {

void InlineJsonStrings(json& v) {
  static const std::set<std::string> kEmbedded = {"spec", "spec_json", "result_json"};
  if (v.is_array()) {
    for (auto& item : v) InlineJsonStrings(item);
    return;
  }
  if (!v.is_object()) return;
  for (auto& [key, value] : v.items()) {
    if (kEmbedded.count(key) && value.is_string()) {
      const std::string text = value.get<std::string>();
      json parsed = json::parse(text, nullptr, false);
      if (!parsed.is_discarded() && (parsed.is_object() || parsed.is_array())) value = std::move(parsed);
      else if (text.empty()) value = nullptr;
    } else {
      InlineJsonStrings(value);
    }
  }
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

std::string Num(const json& v) {
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number()) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.4g", v.get<double>());
    return buf;
  }
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

// Strings that YAML would read as another type (or not read back) are double-quoted.
bool NeedsQuotes(const std::string& s) {
  static const std::regex kNumberLike("[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\\.(inf|Inf|INF)|\\.(nan|NaN|NAN)|0x[0-9a-fA-F]+|0o[0-7]+");
  static const std::set<std::string> kWords = {"true", "false", "True", "False", "TRUE", "FALSE", "yes", "no",
                                                "Yes", "No", "on", "off", "On", "Off", "null", "Null", "NULL", "~"};
  return s.empty() || kWords.count(s) || std::regex_match(s, kNumberLike) || s.front() == ' ' || s.back() == ' ';
}

void EmitYamlValue(YAML::Emitter& out, const json& v) {
  if (v.is_object()) {
    if (v.empty()) out << YAML::Flow;  // "{}" rather than a dangling key
    out << YAML::BeginMap;
    for (const auto& [k, item] : v.items()) {
      out << YAML::Key << k << YAML::Value;
      EmitYamlValue(out, item);
    }
    out << YAML::EndMap;
  } else if (v.is_array()) {
    if (v.empty()) out << YAML::Flow;
    out << YAML::BeginSeq;
    for (const auto& item : v) EmitYamlValue(out, item);
    out << YAML::EndSeq;
  } else if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (NeedsQuotes(s)) out << YAML::DoubleQuoted << s;
    else out << s;
  } else if (v.is_boolean()) {
    out << (v.get<bool>() ? "true" : "false");
  } else if (v.is_null()) {
    out << YAML::Null;
  } else if (v.is_number_integer()) {
    out << v.get<int64_t>();
  } else if (v.is_number_unsigned()) {
    out << v.get<uint64_t>();
  } else {
    out << v.dump();  // shortest round-trip form of the double
  }
}

std::string Dash(const std::string& s) { return s.empty() ? "-" : s; }

std::string StepText(const v1::Progress& p) {
  if (p.total_steps() <= 0 && p.step() <= 0) return "-";
  return Cat(p.step(), "/", p.total_steps());
}
std::string LossText(const v1::Progress& p) { return p.loss() > 0 ? Fixed(p.loss(), 3) : "-"; }

std::string Join(const google::protobuf::RepeatedPtrField<std::string>& items, const char* sep) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

bool IsGang(const v1::Job& j) { return j.resources().nodes() > 1; }

bool AnyGang(const google::protobuf::RepeatedPtrField<v1::Job>& jobs) {
  return std::any_of(jobs.begin(), jobs.end(), IsGang);
}
bool AnyGang(const std::vector<v1::Job>& jobs) { return std::any_of(jobs.begin(), jobs.end(), IsGang); }

// The NODES column of job tables that hold a gang: the workers a job spans (1 for the others).
std::string NodesText(const v1::Job& j) { return Cat(std::max(1, j.resources().nodes())); }

}  // namespace

std::string GangResources(const v1::Resources& r) {
  const int nodes = std::max(1, r.nodes()), ranks = std::max(1, r.ranks());
  return Cat(nodes, nodes == 1 ? " node" : " nodes", " x ", ranks, ranks == 1 ? " rank" : " ranks",
             r.gpus() > 0 ? Cat(" (", r.gpus(), r.gpus() == 1 ? " GPU" : " GPUs", " per node)") : " (CPU)");
}

std::vector<std::string> GangLines(const v1::Job& j, TimePoint now) {
  std::vector<std::string> lines;
  if (!IsGang(j)) return lines;
  lines.push_back(Cat(j.name(), ": ", GangResources(j.resources()), ", ", StateName(j.state())));
  if (j.state() == v1::JOB_STATE_LEASED) {
    std::vector<const v1::GangMember*> members;
    for (const auto& m : j.members()) members.push_back(&m);
    std::stable_sort(members.begin(), members.end(),
                     [](const v1::GangMember* a, const v1::GangMember* b) { return a->node_rank() < b->node_rank(); });
    for (const v1::GangMember* m : members) {
      const std::string who = !m->worker_name().empty() ? m->worker_name() : Dash(m->worker_id());
      std::string lease = "-";
      if (m->lease_deadline().seconds() > 0) {
        const auto left = ToTimePoint(m->lease_deadline()) - now;
        lease = left > Duration::zero() ? Cat("lease ", FormatAge(std::chrono::duration_cast<Duration>(left)), " left")
                                        : "lease expired";
      }
      lines.push_back(Cat("  node ", m->node_rank(), ": ", who, " (", lease, ")",
                          m->delivered() ? "" : " (not yet picked up)"));
    }
    lines.push_back(Cat("  rendezvous: ", j.rendezvous().empty() ? "(not yet known)" : j.rendezvous()));
  } else if ((j.state() == v1::JOB_STATE_READY || j.state() == v1::JOB_STATE_RETRY_WAIT) && !j.pending_reason().empty()) {
    const std::string& reason = j.pending_reason();
    lines.push_back(Cat("  ", reason.rfind("waiting", 0) == 0 ? reason : "waiting: " + reason));
  }
  return lines;
}

json ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string text;
  (void)google::protobuf::util::MessageToJsonString(message, &text, options);
  json out = json::parse(text, nullptr, false);
  if (out.is_discarded()) return json::object();
  InlineJsonStrings(out);
  return out;
}

std::string EmitJson(const json& value) { return value.dump(2) + "\n"; }

std::string EmitYaml(const json& value) {
  YAML::Emitter out;
  out.SetIndent(2);
  EmitYamlValue(out, value);
  std::string s = out.c_str();
  if (s.empty() || s.back() != '\n') s += "\n";
  return s;
}

std::string Emit(Format format, const json& value) {
  return format == Format::kYaml ? EmitYaml(value) : EmitJson(value);
}

std::string RenderTable(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows,
                        const std::set<size_t>& right) {
  std::vector<size_t> width(headers.size(), 0);
  for (size_t c = 0; c < headers.size(); ++c) width[c] = headers[c].size();
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (size_t c = 0; c < headers.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      const std::string pad(width[c] - std::min(width[c], cell.size()), ' ');
      l += right.count(c) ? pad + cell : cell + pad;
      if (c + 1 < headers.size()) l += "  ";
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  line(headers);
  for (const auto& r : rows) line(r);
  return out;
}

std::string StateName(v1::PipelineState s) {
  return s == v1::PIPELINE_STATE_UNSPECIFIED ? "PLANNED" : v1::PipelineState_Name(s).substr(15);
}
std::string StateName(v1::JobState s) { return s == v1::JOB_STATE_UNSPECIFIED ? "-" : v1::JobState_Name(s).substr(10); }
std::string StateName(v1::WorkerState s) {
  return s == v1::WORKER_STATE_UNSPECIFIED ? "-" : v1::WorkerState_Name(s).substr(13);
}
std::string KindName(v1::JobKind k) {
  const contract::JobKindInfo* info = contract::FindJobKind(static_cast<int>(k));
  return info != nullptr ? std::string(info->name) : "-";
}
bool IsTerminal(v1::PipelineState s) {
  return s == v1::PIPELINE_STATE_SUCCEEDED || s == v1::PIPELINE_STATE_FAILED || s == v1::PIPELINE_STATE_CANCELLED;
}
bool IsTerminal(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED || s == v1::JOB_STATE_CANCELLED;
}

std::string FormatAge(Duration d) {
  const int64_t s = std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::seconds>(d).count());
  if (s < 120) return Cat(s, "s");
  if (s < 120 * 60) return Cat(s / 60, "m");
  if (s < 48 * 3600) return Cat(s / 3600, "h");
  return Cat(s / 86400, "d");
}

std::string FormatClock(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "-";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                               static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  else std::snprintf(buf, sizeof(buf), "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buf;
}

std::string FormatRate(double v) {
  if (!(v > 0) || !std::isfinite(v)) return "-";
  if (v < 1000) return Cat(static_cast<int64_t>(std::llround(v)));
  if (v < 1e6) return Fixed(v / 1e3, 1) + "k";
  if (v < 1e9) return Fixed(v / 1e6, 1) + "M";
  return Fixed(v / 1e9, 1) + "G";
}

TimePoint ToTimePoint(const google::protobuf::Timestamp& t) {
  return TimePoint(std::chrono::duration_cast<TimePoint::duration>(std::chrono::seconds(t.seconds()) +
                                                                  std::chrono::nanoseconds(t.nanos())));
}

std::string FormatTime(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return "-";
  std::time_t secs = static_cast<std::time_t>(t.seconds());
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

std::string PipelinesTable(const std::vector<v1::Pipeline>& pipelines, TimePoint now) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& p : pipelines) {
    rows.push_back({p.id(), p.name(), StateName(p.state()), Cat(p.jobs_succeeded(), "/", p.jobs_total()),
                    FormatAge(std::chrono::duration_cast<Duration>(now - ToTimePoint(p.created_at())))});
  }
  return RenderTable({"ID", "NAME", "STATE", "JOBS", "AGE"}, rows);
}

std::string JobsTable(const std::vector<v1::Job>& jobs, bool with_pipeline) {
  // A NODES column only when a job spans several workers: single-node listings stay as they were.
  const bool gangs = AnyGang(jobs);
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : jobs) {
    std::vector<std::string> r = {j.id()};
    if (with_pipeline) r.push_back(j.pipeline_id().substr(0, 8));
    const auto& p = j.progress();
    for (std::string cell : {j.name(), KindName(j.kind()), StateName(j.state()), Cat(j.attempt(), "/", j.max_attempts()),
                             StepText(p), LossText(p), FormatRate(p.tokens_per_second())}) {
      r.push_back(std::move(cell));
    }
    if (gangs) r.push_back(NodesText(j));
    rows.push_back(std::move(r));
  }
  std::vector<std::string> headers = {"ID"};
  if (with_pipeline) headers.push_back("PIPELINE");
  for (const char* h : {"NAME", "KIND", "STATE", "ATTEMPT", "STEP", "LOSS", "TOK/S"}) headers.push_back(h);
  if (gangs) headers.push_back("NODES");
  return RenderTable(headers, rows);
}

std::string WorkersTable(const std::vector<v1::Worker>& workers, TimePoint now) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& w : workers) {
    const auto& c = w.capabilities();
    rows.push_back({w.id(), w.name(), Dash(w.hostname()), StateName(w.state()), Cat(c.gpus()), Cat(c.slots()),
                    Cat(w.running_job_ids_size()),
                    FormatAge(std::chrono::duration_cast<Duration>(now - ToTimePoint(w.last_seen()))) + " ago",
                    Dash(w.version())});
  }
  return RenderTable({"ID", "NAME", "HOST", "STATE", "GPUS", "SLOTS", "RUNNING", "LAST SEEN", "VERSION"}, rows);
}

std::string PlanTable(const v1::Pipeline& planned) {
  const bool gangs = AnyGang(planned.jobs());
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : planned.jobs()) {
    rows.push_back({j.name(), KindName(j.kind()), Dash(Join(j.depends_on(), ", ")), Cat(j.max_attempts())});
    if (gangs) rows.back().push_back(NodesText(j));
  }
  std::vector<std::string> headers = {"JOB", "KIND", "DEPENDS ON", "MAX ATTEMPTS"};
  if (gangs) headers.push_back("NODES");
  return RenderTable(headers, rows);
}

std::string EvalTable(const json& eval, const std::vector<std::string>& order) {
  if (!eval.is_object() || !eval.contains("models") || !eval["models"].is_object() || eval["models"].empty()) return "";
  std::vector<std::string> domains;
  if (eval.contains("domains") && eval["domains"].is_array()) {
    for (const auto& d : eval["domains"]) {
      if (d.is_string()) domains.push_back(d.get<std::string>());
      else if (d.is_object() && d.contains("name") && d["name"].is_string()) domains.push_back(d["name"].get<std::string>());
    }
  }
  if (domains.empty()) {  // fall back to the first model's domains
    const json& first = eval["models"].begin().value();
    if (first.contains("domains") && first["domains"].is_object()) {
      for (const auto& [d, _] : first["domains"].items()) domains.push_back(d);
    }
  }
  std::vector<std::string> models;
  for (const auto& name : order) {
    if (eval["models"].contains(name) && std::find(models.begin(), models.end(), name) == models.end()) {
      models.push_back(name);
    }
  }
  for (const auto& [name, _] : eval["models"].items()) {
    if (std::find(models.begin(), models.end(), name) == models.end()) models.push_back(name);
  }
  auto loss = [&](const std::string& model, const std::string& domain) -> std::optional<double> {
    const json& m = eval["models"][model];
    if (domain.empty()) {
      if (m.contains("avg_loss") && m["avg_loss"].is_number()) return m["avg_loss"].get<double>();
      return std::nullopt;
    }
    if (!m.contains("domains") || !m["domains"].contains(domain)) return std::nullopt;
    const json& d = m["domains"][domain];
    if (d.is_number()) return d.get<double>();
    if (d.is_object() && d.contains("loss") && d["loss"].is_number()) return d["loss"].get<double>();
    return std::nullopt;
  };
  std::vector<std::string> columns = domains;
  columns.push_back("");  // the average
  std::vector<std::optional<double>> best(columns.size());
  for (size_t c = 0; c < columns.size(); ++c) {
    for (const auto& m : models) {
      auto v = loss(m, columns[c]);
      if (v && (!best[c] || *v < *best[c])) best[c] = v;
    }
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& m : models) {
    std::vector<std::string> r = {m};
    for (size_t c = 0; c < columns.size(); ++c) {
      auto v = loss(m, columns[c]);
      r.push_back(v ? Fixed(*v, 3) + (models.size() > 1 && *v == *best[c] ? "*" : " ") : "- ");
    }
    rows.push_back(std::move(r));
  }
  std::vector<std::string> headers = {"MODEL"};
  std::set<size_t> right;
  for (size_t c = 0; c < columns.size(); ++c) {
    headers.push_back(columns[c].empty() ? "AVG " : columns[c] + " ");
    right.insert(c + 1);
  }
  return RenderTable(headers, rows, right);
}

std::string PipelineEvalTable(const v1::Pipeline& pipeline) {
  for (const auto& j : pipeline.jobs()) {
    if (j.kind() != v1::JOB_KIND_EVAL || j.result_json().empty()) continue;
    json eval = json::parse(j.result_json(), nullptr, false);
    std::vector<std::string> order;
    json spec = json::parse(j.spec_json(), nullptr, false);
    if (spec.is_object() && spec.contains("models") && spec["models"].is_array()) {
      for (const auto& m : spec["models"]) {
        if (m.is_object() && m.contains("name") && m["name"].is_string()) order.push_back(m["name"].get<std::string>());
      }
    }
    std::string table = EvalTable(eval, order);
    if (table.empty()) continue;
    return "Evaluation: validation loss in nats/token (lower is better; * = best per column)\n" + table;
  }
  return "";
}

std::string DescribePipeline(const v1::Pipeline& p, const std::vector<v1::Event>& events, TimePoint now,
                             size_t max_events) {
  std::string out;
  auto field = [&](const char* name, const std::string& value) { out += Cat(name, std::string(12 - std::min<size_t>(12, std::string(name).size()), ' '), value, "\n"); };
  field("Name:", p.name());
  field("ID:", p.id());
  field("State:", StateName(p.state()));
  field("Jobs:", Cat(p.jobs_succeeded(), "/", p.jobs_total(), " succeeded"));
  field("Created:", Cat(FormatTime(p.created_at()), " (",
                        FormatAge(std::chrono::duration_cast<Duration>(now - ToTimePoint(p.created_at()))), " ago)"));
  field("Updated:", FormatTime(p.updated_at()));
  if (!p.idempotency_key().empty()) field("Key:", p.idempotency_key());
  if (!p.error().empty()) field("Error:", p.error());

  const bool gangs = AnyGang(p.jobs());
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : p.jobs()) {
    std::string took = "-";
    if (j.started_at().seconds() > 0) {
      const auto end = j.finished_at().seconds() > 0 ? ToTimePoint(j.finished_at()) : now;
      took = FormatClock(std::chrono::duration<double>(end - ToTimePoint(j.started_at())).count());
    }
    rows.push_back({j.name(), KindName(j.kind()), StateName(j.state()), Cat(j.attempt(), "/", j.max_attempts()),
                    Dash(Join(j.depends_on(), ",")), StepText(j.progress()), LossText(j.progress()),
                    FormatRate(j.progress().tokens_per_second()), took});
    if (gangs) rows.back().push_back(NodesText(j));
  }
  std::vector<std::string> headers = {"NAME", "KIND", "STATE", "ATTEMPT", "DEPENDS ON", "STEP", "LOSS", "TOK/S", "TIME"};
  if (gangs) headers.push_back("NODES");
  out += "\nJobs:\n" + RenderTable(headers, rows);

  // Jobs that span several workers: their shape, the members of the running attempt and where they
  // meet, or what a job that is ready still waits for.
  if (gangs) {
    out += "\nGangs:\n";
    for (const auto& j : p.jobs()) {
      for (const auto& l : GangLines(j, now)) out += "  " + l + "\n";
    }
  }

  std::vector<std::vector<std::string>> metrics;
  for (const auto& j : p.jobs()) {
    if (j.kind() == v1::JOB_KIND_EVAL) continue;  // shown as the evaluation table
    json r = json::parse(j.result_json(), nullptr, false);
    if (!r.is_object()) continue;
    for (const auto& [k, v] : r.items()) {
      if (v.is_primitive()) metrics.push_back({j.name(), k, Num(v)});
    }
  }
  if (!metrics.empty()) out += "\nMetrics:\n" + RenderTable({"JOB", "METRIC", "VALUE"}, metrics);

  if (std::string eval = PipelineEvalTable(p); !eval.empty()) out += "\n" + eval;

  std::vector<std::vector<std::string>> errors;
  for (const auto& j : p.jobs()) {
    if (!j.error().empty()) errors.push_back({j.name(), Cat("attempt ", j.attempt()), j.error()});
  }
  if (!errors.empty()) out += "\nErrors:\n" + RenderTable({"JOB", "ATTEMPT", "ERROR"}, errors);

  std::vector<const v1::Event*> shown;
  for (const auto& e : events) {
    if (e.type() != "job.progress") shown.push_back(&e);
  }
  const size_t skip = shown.size() > max_events ? shown.size() - max_events : 0;
  std::vector<std::vector<std::string>> ev;
  for (size_t i = skip; i < shown.size(); ++i) {
    const auto& e = *shown[i];
    ev.push_back({FormatTime(e.time()), Dash(e.job_name()), e.type(), e.attempt() > 0 ? Cat(e.attempt()) : "-",
                  e.message().size() > 100 ? e.message().substr(0, 97) + "..." : e.message()});
  }
  out += Cat("\nEvents", skip > 0 ? Cat(" (last ", max_events, " of ", shown.size(), ")") : "", ":\n");
  out += ev.empty() ? "  (none)\n" : RenderTable({"TIME", "JOB", "EVENT", "ATTEMPT", "MESSAGE"}, ev);
  return out;
}

}  // namespace btx::cli
