#include "btx/storage/local_postgres.h"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <pqxx/pqxx>

#include "btx/common/strings.h"
#include "btx/common/fs.h"

namespace btx::storage {
namespace fs = std::filesystem;
namespace {

std::string FindBinDir(const std::string& configured) {
  if (!configured.empty()) return configured;
  if (const char* env = std::getenv("BTX_PG_BIN")) return env;
  // Newest installed major version first.
  std::vector<fs::path> candidates;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) candidates.push_back(e.path() / "bin");
  std::sort(candidates.begin(), candidates.end(), [](const fs::path& a, const fs::path& b) {
    return std::stoi(a.parent_path().filename().string()) > std::stoi(b.parent_path().filename().string());
  });
  for (const auto& c : candidates) {
    if (fs::exists(c / "pg_ctl")) return c.string();
  }
  return "";
}

// PostgreSQL's server user must be able to reach the state dir through every ancestor.
absl::Status CheckTraversable(const fs::path& dir, uid_t uid, gid_t gid) {
  for (fs::path p = dir; !p.empty() && p != p.root_path(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) continue;
    bool ok = (st.st_uid == uid && (st.st_mode & S_IXUSR)) || (st.st_gid == gid && (st.st_mode & S_IXGRP)) ||
              (st.st_mode & S_IXOTH);
    if (!ok) {
      return absl::FailedPreconditionError(Cat(
          "state dir ", dir.string(), ": the PostgreSQL server user (uid ", uid, ") cannot enter ", p.string(),
          "; choose a state dir outside it (--state-dir or BTX_STATE_DIR) or run as a non-root user"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

ProcessSpec LocalPostgres::AsServerUser(std::vector<std::string> argv) const {
  ProcessSpec spec;
  spec.argv = std::move(argv);
  spec.uid = uid_;
  spec.gid = gid_;
  // The server must not die with the terminal session of whoever started it.
  spec.new_session = true;
  spec.env = {{"LC_ALL", "C.UTF-8"}, {"PGTZ", "UTC"}};
  return spec;
}

absl::StatusOr<std::unique_ptr<LocalPostgres>> LocalPostgres::Start(LocalPostgresConfig config,
                                                                   ProcessLauncher& launcher) {
  if (config.state_dir.empty()) return absl::InvalidArgumentError("local postgres: state_dir is empty");
  config.state_dir = fs::absolute(config.state_dir).lexically_normal().string();
  config.bin_dir = FindBinDir(config.bin_dir);
  if (config.bin_dir.empty()) {
    return absl::FailedPreconditionError(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and $BTX_PG_BIN); "
        "install them with scripts/install-deps");
  }
  std::unique_ptr<LocalPostgres> pg(new LocalPostgres(std::move(config), launcher));
  std::error_code ec;
  fs::create_directories(pg->config_.state_dir + "/run", ec);
  if (ec) return absl::InternalError(Cat("create ", pg->config_.state_dir, ": ", ec.message()));
  if (::geteuid() == 0) {
    std::string user = pg->config_.run_as_user.empty() ? "postgres" : pg->config_.run_as_user;
    if (const char* env = std::getenv("BTX_PG_USER"); env && pg->config_.run_as_user.empty()) user = env;
    struct passwd* pw = ::getpwnam(user.c_str());
    if (!pw) {
      return absl::FailedPreconditionError(Cat(
          "running as root, PostgreSQL needs an unprivileged user to run as; user '", user,
          "' does not exist (set BTX_PG_USER)"));
    }
    pg->uid_ = pw->pw_uid;
    pg->gid_ = pw->pw_gid;
    // The state dir is ours to hand over; its ancestors are not, so those are only checked.
    for (const char* sub : {"", "/run", "/pgdata"}) {
      std::string p = pg->config_.state_dir + sub;
      if (fs::exists(p)) (void)::chown(p.c_str(), pw->pw_uid, pw->pw_gid);
    }
    if (auto s = CheckTraversable(pg->config_.state_dir, pw->pw_uid, pw->pw_gid); !s.ok()) return s;
  }
  if (auto s = pg->InitIfNeeded(); !s.ok()) return s;
  if (auto s = pg->StartServer(); !s.ok()) return s;
  if (auto s = pg->CreateDatabase(pg->config_.database); !s.ok()) return s;
  return pg;
}

absl::Status LocalPostgres::InitIfNeeded() {
  const std::string data = config_.state_dir + "/pgdata";
  if (fs::exists(data + "/PG_VERSION")) return absl::OkStatus();
  std::vector<std::string> argv = {config_.bin_dir + "/initdb", "-D", data, "-U", "btx", "-A", "trust",
                                   "-E", "UTF8", "--locale=C"};
  if (!config_.durable) argv.push_back("--no-sync");
  auto r = RunAndCapture(launcher_, AsServerUser(argv));
  if (!r.ok()) return r.status();
  if (r->exit_code != 0) return absl::InternalError(Cat("initdb failed (exit ", r->exit_code, "): ", r->output));
  return absl::OkStatus();
}

absl::Status LocalPostgres::PgCtl(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {config_.bin_dir + "/pg_ctl", "-D", config_.state_dir + "/pgdata"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = RunAndCapture(launcher_, AsServerUser(argv));
  if (!r.ok()) return r.status();
  if (r->exit_code != 0) {
    std::string log;
    if (auto l = ReadFile(config_.state_dir + "/postgres.log"); l.ok()) log = l->substr(l->size() > 2000 ? l->size() - 2000 : 0);
    return absl::InternalError(Cat("pg_ctl ", args.front(), " failed (exit ", r->exit_code, "): ", r->output, log));
  }
  return absl::OkStatus();
}

absl::Status LocalPostgres::StartServer() {
  // Already running on this data dir (e.g. left by an earlier btxctl)? Reuse it.
  auto st = RunAndCapture(launcher_, AsServerUser({config_.bin_dir + "/pg_ctl", "-D", config_.state_dir + "/pgdata", "status"}));
  if (st.ok() && st->exit_code == 0) {
    try {
      pqxx::connection c(ConnectionString("postgres"));
      return absl::OkStatus();
    } catch (const std::exception&) {
      // Running with other settings (another socket dir): fall through and let pg_ctl report it.
    }
  }
  std::string opts = Cat("-c listen_addresses='' -k ", config_.state_dir, "/run -p ", config_.port,
                                  " -c max_connections=300 -c shared_buffers=64MB");
  if (!config_.durable) opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off";
  auto s = PgCtl({"start", "-w", "-t", "60", "-l", config_.state_dir + "/postgres.log", "-o", opts});
  if (s.ok()) started_by_us_ = true;
  return s;
}

absl::Status LocalPostgres::Stop() {
  if (!started_by_us_) return absl::OkStatus();
  started_by_us_ = false;
  return PgCtl({"stop", "-w", "-m", "fast"});
}

absl::Status LocalPostgres::StopImmediate() {
  started_by_us_ = false;
  return PgCtl({"stop", "-w", "-m", "immediate"});
}

absl::Status LocalPostgres::Restart() {
  if (started_by_us_) {
    if (auto s = Stop(); !s.ok()) return s;
  }
  return StartServer();
}

LocalPostgres::~LocalPostgres() { (void)Stop(); }

std::string LocalPostgres::ConnectionString(const std::string& database) const {
  return Cat("host=", config_.state_dir, "/run port=", config_.port, " user=btx dbname=",
                      database.empty() ? config_.database : database);
}

absl::Status LocalPostgres::CreateDatabase(const std::string& name) {
  try {
    pqxx::connection c(ConnectionString("postgres"));
    pqxx::nontransaction tx(c);
    auto r = tx.exec_params("SELECT 1 FROM pg_database WHERE datname = $1", name);
    if (r.empty()) tx.exec("CREATE DATABASE " + tx.quote_name(name));
    return absl::OkStatus();
  } catch (const pqxx::sql_error& e) {
    // Another process created it between the check and ours (two clients starting on one state dir).
    if (e.sqlstate() == "42P04" || e.sqlstate() == "23505") return absl::OkStatus();
    return absl::InternalError(Cat("create database ", name, ": ", e.what()));
  } catch (const std::exception& e) {
    return absl::InternalError(Cat("create database ", name, ": ", e.what()));
  }
}

}  // namespace btx::storage
