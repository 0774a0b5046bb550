// Gangs (migration 0008): a job leased to several workers at once. Forming is all-or-nothing in one
// statement (btx_offer_gang); this file hands the leases out and says who a waiting gang waits for.
#include <map>
#include <nlohmann/json.hpp>

#include "absl/strings/str_join.h"
#include "btx/common/strings.h"
#include "store_internal.h"

namespace btx::storage {
using namespace internal;
using json = nlohmann::json;

namespace {

// The lease of member `node_rank` of `job_id`'s current attempt, as ClaimJobs hands a job out.
absl::StatusOr<std::optional<ClaimedJob>> ReadClaimed(pqxx::transaction_base& tx, const std::string& job_id, int node_rank) {
  auto r = tx.exec_params(
      "SELECT " + kJobColumns + ", p.name, (SELECT coalesce(json_object_agg(d.name, d.artifact_uri), '{}')::text "
      "FROM job_deps x JOIN jobs d ON d.id = x.depends_on WHERE x.job_id = j.id) "
      "FROM jobs j JOIN pipelines p ON p.id = j.pipeline_id WHERE j.id = $1::uuid",
      UuidParam(job_id));
  if (r.empty()) return std::optional<ClaimedJob>();
  ClaimedJob c;
  c.job = JobFromRow(r[0]);
  c.pipeline_name = r[0][kJobColumnCount + 1].as<std::string>();
  const json parents = json::parse(r[0][kJobColumnCount + 2].as<std::string>(), nullptr, false);
  if (parents.is_object()) {
    for (const auto& [name, uri] : parents.items()) c.parent_artifacts[name] = uri.is_string() ? uri.get<std::string>() : "";
  }
  c.node_rank = node_rank;
  // The job's lease_deadline is the earliest member's; this member's own is the one it renews.
  auto m = tx.exec_params("SELECT " + Us("lease_deadline") + " FROM job_members WHERE job_id = $1::uuid AND attempt = $2 "
                          "AND node_rank = $3", UuidParam(job_id), c.job.attempt, node_rank);
  if (!m.empty()) c.job.lease_deadline = FromUnixMicros(m[0][0].as<int64_t>());
  return std::optional<ClaimedJob>(std::move(c));
}

}  // namespace

ClaimOutcome Store::TakeMemberLease(const std::string& worker_id, TimePoint now) {
  return InTx<std::optional<ClaimedJob>>(pool_, "take member lease", [&](pqxx::work& tx) -> ClaimOutcome {
    auto r = tx.exec_params("SELECT o_job::text, o_node_rank FROM btx_take_member_lease($1::uuid, " + Ts(2) + ")",
                            UuidParam(worker_id), Micros(now));
    if (r.empty()) return std::optional<ClaimedJob>();
    return ReadClaimed(tx, r[0][0].as<std::string>(), r[0][1].as<int>());
  });
}

absl::StatusOr<GangOffer> Store::OfferToGangs(const std::string& worker_id, int free_gpus, TimePoint offer_until,
                                              Duration lease, TimePoint now) {
  return InTx<GangOffer>(pool_, "offer to gangs", [&](pqxx::work& tx) -> absl::StatusOr<GangOffer> {
    auto r = tx.exec_params("SELECT o_job::text, o_node_rank FROM btx_offer_gang($1::uuid, $2, " + Ts(3) + ", " + Ts(4) +
                                ", " + Ts(5) + ")",
                            UuidParam(worker_id), free_gpus, Micros(offer_until), Micros(now), Micros(now + lease));
    GangOffer out;
    if (r.empty()) return out;
    out.formed_job_id = r[0][0].as<std::string>();
    if (r[0][1].is_null()) return out;
    auto claimed = ReadClaimed(tx, out.formed_job_id, r[0][1].as<int>());
    if (!claimed.ok()) return claimed.status();
    out.mine = std::move(*claimed);
    return out;
  });
}

absl::StatusOr<std::pair<int, std::vector<std::string>>> Store::WorkersWithGpus(int gpus) {
  using Out = std::pair<int, std::vector<std::string>>;
  return InTx<Out>(pool_, "workers with gpus", [&](pqxx::work& tx) -> absl::StatusOr<Out> {
    Out out{0, {}};
    for (const auto& r : tx.exec_params("SELECT name, count(*) OVER () FROM workers WHERE cap_gpus >= $1 ORDER BY name LIMIT 8", gpus)) {
      out.first = r[1].as<int>();
      out.second.push_back(r[0].as<std::string>());
    }
    return out;
  });
}

absl::Status Store::DescribeGangs(std::vector<JobRecord>& jobs, TimePoint now) {
  std::vector<JobRecord*> waiting;
  std::map<std::string, JobRecord*> by_id;
  std::vector<std::string> leased_ids, leased_attempts;
  for (auto& j : jobs) {
    if (j.nodes <= 1) continue;
    if (j.state == job_state::kLeased) {
      by_id[j.id] = &j;
      leased_ids.push_back(UuidParam(j.id));
      leased_attempts.push_back(std::to_string(j.attempt));
    } else if (j.state == job_state::kReady || j.state == job_state::kRetryWait) {
      waiting.push_back(&j);
    }
  }
  if (by_id.empty() && waiting.empty()) return absl::OkStatus();
  return InTx<bool>(pool_, "describe gangs", [&](pqxx::work& tx) -> absl::StatusOr<bool> {
    // The current attempt's members of every leased gang, in one query.
    if (!by_id.empty()) {
      for (const auto& m : tx.exec_params(
               "SELECT m.job_id::text, m.node_rank, m.worker_id::text, w.name, " + Us("m.lease_deadline") + ", m.delivered "
               "FROM job_members m JOIN workers w ON w.id = m.worker_id "
               "WHERE (m.job_id, m.attempt) IN (SELECT * FROM unnest($1::uuid[], $2::int[])) ORDER BY m.job_id, m.node_rank",
               ArrayLiteral(leased_ids), ArrayLiteral(leased_attempts))) {
        by_id.at(m[0].as<std::string>())->members.push_back(
            {m[1].as<int>(), m[2].as<std::string>(), m[3].as<std::string>(), FromUnixMicros(m[4].as<int64_t>()),
             m[5].as<bool>()});
      }
    }
    if (waiting.empty()) return true;
    // Why each waiting gang waits: the head gang, and the fleet's offers.
    std::string head_id, head_name;
    if (auto h = tx.exec_params("SELECT h.id::text, p.name || '/' || j.name FROM btx_head_gang(" + Ts(1) + ") h "
                                "JOIN jobs j ON j.id = h.id JOIN pipelines p ON p.id = j.pipeline_id", Micros(now));
        !h.empty()) {
      head_id = h[0][0].as<std::string>();
      head_name = h[0][1].as<std::string>();
    }
    struct W {
      std::string name, state;
      int gpus = 0;
      bool offering = false;
      int offer_gpus = 0;
      int undelivered = 0;
    };
    std::vector<W> fleet;
    for (const auto& w : tx.exec_params("SELECT name, state, cap_gpus, coalesce(offer_until >= " + Ts(1) +
                                        ", false), coalesce(offer_gpus, 0), undelivered_members FROM workers ORDER BY name",
                                        Micros(now))) {
      fleet.push_back({w[0].as<std::string>(), w[1].as<std::string>(), w[2].as<int>(), w[3].as<bool>(), w[4].as<int>(),
                       w[5].as<int>()});
    }
    for (JobRecord* j : waiting) {
      std::vector<std::string> offered, busy;
      int active_fit = 0;
      for (const auto& w : fleet) {
        if (w.state != "ACTIVE" || w.gpus < j->gpus) continue;
        ++active_fit;
        if (w.offering && w.offer_gpus >= j->gpus && w.undelivered == 0) {
          offered.push_back(w.name);
        } else {
          busy.push_back(w.name);
        }
      }
      const std::string fit = j->gpus > 0 ? Cat(" with ", j->gpus, " free GPU", j->gpus == 1 ? "" : "s") : "";
      if (active_fit < j->nodes) {
        j->pending_reason = Cat("needs ", j->nodes, " workers", fit, " at once; the fleet has ", active_fit,
                                " active worker", active_fit == 1 ? "" : "s", " that fit", fit.empty() ? "" : " (by GPUs)",
                                ": it waits for more to register, holding nothing");
      } else if (j->ready_at && *j->ready_at > now) {
        j->pending_reason = "backing off after a failed attempt";
      } else if (j->id != head_id) {
        j->pending_reason = Cat("queued behind the gang ", head_id.empty() ? std::string("ahead of it") : Cat(head_name, " (", head_id, ")"),
                                ", which forms first");
      } else {
        j->pending_reason = Cat("waiting for ", j->nodes, " idle workers", fit, ": ", offered.size(), " idle (",
                                offered.empty() ? std::string("none") : absl::StrJoin(offered, ", "), "), waiting for ",
                                j->nodes - std::min<int>(j->nodes, static_cast<int>(offered.size())), " of the busy (",
                                busy.empty() ? std::string("none") : absl::StrJoin(busy, ", "),
                                ") to finish; meanwhile they take no job queued after this one");
      }
    }
    return true;
  }).status();
}

}  // namespace btx::storage
