// The scheduler benchmarks' database: a private PostgreSQL in a fresh temporary directory (or an
// existing one at `url`), stopped before its directory is removed, on every way out.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/storage/database.h"

namespace btx::bench {

struct BenchDatabase {
  PosixProcessLauncher launcher;  // starts the private server
  std::string dir;                // the server's data and the benchmark's files
  std::unique_ptr<storage::Database> db;
  ~BenchDatabase() {
    db.reset();  // the server stops before its directory goes
    if (dir.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

inline absl::Status OpenBenchDatabase(BenchDatabase& out, const std::string& dir_prefix, const std::string& url,
                                      bool durable, int connections) {
  auto dir = MakeTempDir(dir_prefix);
  if (!dir.ok()) return dir.status();
  out.dir = *dir;
  storage::DatabaseOptions options;
  options.url = url;
  options.local.state_dir = out.dir;
  options.local.durable = durable;
  options.connections = connections;
  auto opened = storage::OpenDatabase(std::move(options), out.launcher);
  if (!opened.ok()) return opened.status();
  out.db = std::move(*opened);
  return absl::OkStatus();
}

}  // namespace btx::bench
