// Helpers shared by the scheduler's integration tests.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <pqxx/pqxx>
#include <string>
#include <thread>

#include "btx/common/strings.h"

namespace btx::scheduler::testing {

// A five-job BTX pipeline: two branches, merge, finetune, eval.
inline const char* kDagSpec = R"(
name: dag
seed: {model: /models/seed}
experts:
  - {name: code, data: {train: [/d/code]}, steps: 3}
  - {name: math, data: {train: [/d/math]}, steps: 3}
evaluate: {baselines: []}
)";

// Prometheus text -> {"name{labels}": value}; comments skipped.
inline std::map<std::string, double> ParseExposition(const std::string& text) {
  std::map<std::string, double> out;
  for (const auto& line : Split(text, '\n', true)) {
    if (line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    out[line.substr(0, sp)] = std::stod(line.substr(sp + 1));
  }
  return out;
}

// Polls `done` until it holds or `timeout` passes; the state is read, never waited for blindly.
inline bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds every = std::chrono::milliseconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(every);
  }
  return true;
}

inline int64_t QueryInt(const std::string& conninfo, const std::string& sql) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  return tx.exec(sql)[0][0].as<int64_t>();
}

}  // namespace btx::scheduler::testing
