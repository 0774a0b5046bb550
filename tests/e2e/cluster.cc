#include "cluster.h"

#include <signal.h>

#include <cerrno>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "pg_fixture.h"

#include <pqxx/pqxx>

namespace btx::e2e {
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

std::string Bin(const std::string& name) { return Cat(BTX_BIN_DIR, "/", name); }

std::string Tail(const std::string& path, size_t bytes) {
  auto text = ReadFile(path);
  if (!text.ok()) return "";
  return text->size() > bytes ? text->substr(text->size() - bytes) : *text;
}

}  // namespace

Cluster::Cluster(ClusterOptions options) : options_(options) {
  dir_ = *MakeTempDir("btx-e2e");
  artifact_root_ = dir_ + "/artifacts";
  fs::create_directories(artifact_root_);
}

Cluster::~Cluster() {
  for (auto& [i, w] : workers_) {
    if (w) w->Signal(SIGKILL);
  }
  if (scheduler_) scheduler_->Signal(SIGKILL);
  workers_.clear();
  scheduler_.reset();
  if (std::getenv("BTX_KEEP_E2E") == nullptr) fs::remove_all(dir_);
}

absl::Status Cluster::Start() {
  conninfo_ = btx::testing::NewMigratedDatabase();
  pool_ = std::make_unique<storage::ConnectionPool>(conninfo_, 4);
  store_ = std::make_unique<storage::Store>(*pool_);
  if (auto s = StartScheduler(); !s.ok()) return s;
  for (int i = 0; i < options_.workers; ++i) {
    if (auto s = StartWorker(i); !s.ok()) return s;
  }
  // Every worker registered before the test submits: submit checks the registered fleet (a gang larger
  // than it is refused), so a spec would otherwise be judged against whichever workers were quick.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  for (;;) {
    auto workers = store_->ListWorkers();
    if (workers.ok() && static_cast<int>(workers->size()) >= options_.workers) return absl::OkStatus();
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::DeadlineExceededError(Cat("only ", workers.ok() ? workers->size() : 0, " of ", options_.workers,
                                             " workers registered within 60 s\n", DaemonLogs()));
    }
    std::this_thread::sleep_for(10ms);
  }
}

absl::StatusOr<int> Cluster::ReadPortFile(const std::string& path, Process& proc) {
  // The daemon writes the file by rename once it is serving; poll for it, or for the daemon's death.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline) {
    if (auto text = ReadFile(path); text.ok() && !text->empty()) return std::stoi(*text);
    if (auto code = proc.Poll()) return absl::InternalError(Cat(path, ": daemon exited with ", *code, "\n", DaemonLogs()));
    std::this_thread::sleep_for(10ms);
  }
  return absl::DeadlineExceededError(Cat("no port file ", path, "\n", DaemonLogs()));
}

absl::Status Cluster::StartScheduler() {
  const std::string port_file = dir_ + "/scheduler.port";
  fs::remove(port_file);
  fs::remove(dir_ + "/scheduler-metrics.port");
  ProcessSpec ps;
  // A restart reuses the first port: workers keep the address they were given.
  ps.argv = {Bin("btx-scheduler"), "--listen", Cat("127.0.0.1:", scheduler_port_), "--database-url", conninfo_,
             "--artifact-root", "file://" + artifact_root_, "--lease-seconds", std::to_string(options_.lease_seconds),
             "--heartbeat-seconds", std::to_string(options_.heartbeat_seconds), "--port-file", port_file,
             "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", dir_ + "/scheduler-metrics.port"};
  if (options_.tls) {
    const ClusterTls& t = *options_.tls;
    ps.argv.insert(ps.argv.end(), {"--tls-cert", t.server_cert, "--tls-key", t.server_key, "--tls-client-ca", t.ca_file});
    if (!t.tokens_file.empty()) ps.argv.insert(ps.argv.end(), {"--tokens-file", t.tokens_file});
  }
  ps.stdout_path = ps.stderr_path = dir_ + "/scheduler.log";
  auto proc = launcher_.Launch(ps);
  if (!proc.ok()) return proc.status();
  scheduler_ = std::move(*proc);
  auto port = ReadPortFile(port_file, *scheduler_);
  if (!port.ok()) return port.status();
  scheduler_port_ = *port;
  auto metrics_port = ReadPortFile(dir_ + "/scheduler-metrics.port", *scheduler_);
  if (!metrics_port.ok()) return metrics_port.status();
  scheduler_metrics_port_ = *metrics_port;
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options_.tls) {
    auto roots = ReadFile(options_.tls->ca_file);
    if (!roots.ok()) return ToAbsl(roots.status());
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = *roots;
    credentials = grpc::SslCredentials(ssl);
  }
  channel_ = grpc::CreateChannel(scheduler_address(), credentials);
  pipelines_ = v1::PipelineService::NewStub(channel_);
  return absl::OkStatus();
}

absl::Status Cluster::StartWorker(int index) {
  const std::string port_file = Cat(dir_, "/worker-", index, ".port");
  fs::remove(port_file);
  ProcessSpec ps;
  ps.argv = {Bin("btx-worker"), "--scheduler", scheduler_address(), "--name", Cat("w", index), "--work-dir",
             Cat(dir_, "/work-", index), "--threads-per-job", std::to_string(options_.threads_per_job),
             "--poll-seconds", "2", "--stop-grace-seconds", "30", "--metrics-listen", "127.0.0.1:0",
             "--metrics-port-file", port_file};
  if (options_.tls) {
    const ClusterTls& t = *options_.tls;
    ps.argv.insert(ps.argv.end(), {"--tls-ca", t.ca_file, "--tls-cert", t.worker_cert, "--tls-key", t.worker_key});
  }
  ps.argv.insert(ps.argv.end(), options_.worker_args.begin(), options_.worker_args.end());
  ps.stdout_path = ps.stderr_path = Cat(dir_, "/worker-", index, ".log");
  auto proc = launcher_.Launch(ps);
  if (!proc.ok()) return proc.status();
  workers_[index] = std::move(*proc);
  auto port = ReadPortFile(port_file, *workers_[index]);
  if (!port.ok()) return port.status();
  worker_metrics_ports_[index] = *port;
  return absl::OkStatus();
}

void Cluster::SignalScheduler(int sig) { ::kill(scheduler_->pid(), sig); }
void Cluster::SignalWorker(int index, int sig) { ::kill(workers_.at(index)->pid(), sig); }
int Cluster::WaitWorker(int index) { return workers_.at(index)->Wait(); }
int Cluster::WaitScheduler() { return scheduler_->Wait(); }
std::optional<int> Cluster::PollWorker(int index) { return workers_.at(index)->Poll(); }
std::optional<int> Cluster::PollScheduler() { return scheduler_->Poll(); }

std::string Cluster::DaemonLogs(size_t tail_bytes) const {
  std::string out;
  for (const auto& e : fs::directory_iterator(dir_)) {
    if (e.path().extension() == ".log") out += Cat("==== ", e.path().filename().string(), "\n", Tail(e.path(), tail_bytes));
  }
  return out;
}

void Cluster::AddAuth(grpc::ClientContext& ctx) const {
  if (options_.tls && !options_.tls->client_token.empty()) {
    ctx.AddMetadata("authorization", "Bearer " + options_.tls->client_token);
  }
}

absl::StatusOr<std::string> Cluster::Submit(const std::string& spec) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 30s);
  AddAuth(ctx);
  v1::SubmitRequest req;
  req.set_spec(spec);
  v1::SubmitResponse resp;
  const grpc::Status s = pipelines_->Submit(&ctx, req, &resp);
  if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return resp.pipeline().id();
}

std::string Cluster::WaitForPipeline(const std::string& id, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  std::string state;
  while (std::chrono::steady_clock::now() < deadline) {
    auto p = store_->GetPipeline(id);
    if (p.ok()) {
      state = p->state;
      if (state == "SUCCEEDED" || state == "FAILED" || state == "CANCELLED") return state;
    }
    std::this_thread::sleep_for(50ms);
  }
  return state;
}

std::vector<std::string> MakeCorpora(const std::string& dir, size_t train_bytes) {
  std::mt19937 rng(1234);
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  const std::vector<std::string> types = {"int", "float", "size_t", "char*", "bool"};
  const std::vector<std::string> names = {"count", "index", "buffer", "length", "offset", "value", "node", "next"};
  const std::vector<std::string> words = {"the", "river", "quietly", "morning", "walked", "across", "old", "bridge",
                                          "a", "village", "under", "light", "and", "stories", "of", "children"};
  auto code = [&] {
    std::ostringstream s;
    s << pick(types) << " " << pick(names) << "_" << rng() % 9 << "(" << pick(types) << " " << pick(names) << ") {\n"
      << "  for (int i = 0; i < " << pick(names) << "; ++i) " << pick(names) << " += i;\n  return " << pick(names)
      << ";\n}\n";
    return s.str();
  };
  auto math = [&] {
    const int a = static_cast<int>(rng() % 100), b = static_cast<int>(rng() % 100);
    std::ostringstream s;
    s << a << " + " << b << " = " << a + b << "\n" << a << " * " << b % 10 << " = " << a * (b % 10) << "\n";
    return s.str();
  };
  auto prose = [&] {
    std::string s;
    for (int i = 0; i < 12; ++i) s += pick(words) + (i == 11 ? ".\n" : " ");
    s[0] = static_cast<char>(std::toupper(s[0]));
    return s;
  };
  const std::vector<std::pair<std::string, std::function<std::string()>>> domains = {
      {"code", code}, {"math", math}, {"prose", prose}};
  std::vector<std::string> out;
  for (const auto& [name, gen] : domains) {
    fs::create_directories(Cat(dir, "/", name));
    for (const auto& [split, bytes] : {std::pair<std::string, size_t>{"train", train_bytes}, {"valid", train_bytes / 8}}) {
      std::string text;
      while (text.size() < bytes) text += gen();
      std::ofstream(Cat(dir, "/", name, "/", split, ".txt")) << text;
    }
    out.push_back(name);
  }
  return out;
}

std::vector<AttemptRow> Attempts(const std::string& conninfo, const std::string& pipeline_id) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  std::vector<AttemptRow> out;
  for (const auto& r : tx.exec_params(
           "SELECT j.name, j.id::text, coalesce(a.worker_id::text, ''), a.outcome, a.attempt FROM job_attempts a "
           "JOIN jobs j ON j.id = a.job_id WHERE j.pipeline_id = $1::uuid ORDER BY j.name, a.attempt",
           pipeline_id)) {
    out.push_back({r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<std::string>(),
                   r[4].as<int>()});
  }
  return out;
}

std::string TinySpec(const std::string& name, const std::string& data, int branch_steps, int checkpoint_every,
                     const std::string& resources) {
  return "name: " + name + R"(
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [)" + data + "/code/train.txt, " + data + R"(/math/train.txt]}, steps: 4}
experts:
  - {name: code, data: {train: )" + data + "/code/train.txt, valid: " + data + "/code/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
  - {name: math, data: {train: )" + data + "/math/train.txt, valid: " + data + "/math/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: )" + std::to_string(checkpoint_every) +
         R"(, log_every: 1, valid_tokens: 2048, threads: 1}
merge: {method: btx, keep_seed_expert: true, router_init: random}
finetune: {top_k: 2, steps: 4}
evaluate: {baselines: [seed, experts], max_tokens: 2048}
resources: )" + resources + "\n";
}

namespace {
std::string ReadProc(pid_t pid, const char* what) {
  auto text = ReadFile(Cat("/proc/", pid, "/", what));
  std::string s = text.ok() ? *text : "";
  for (char& c : s) {
    if (c == '\0') c = '\n';
  }
  return s;
}
}  // namespace

std::map<int, pid_t> AttemptProcesses(const std::string& job_id, int attempt) {
  namespace fs = std::filesystem;
  std::map<int, pid_t> out;
  const std::string attempt_dir = Cat(job_id, "-attempt-", attempt);
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename();
    if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    const std::string cmd = ReadProc(pid, "cmdline");
    if (cmd.find("btx-train") == std::string::npos) continue;
    std::error_code ec;
    if (cmd.find("--store-server") != std::string::npos) {
      if (fs::read_symlink(Cat("/proc/", pid, "/cwd"), ec).filename() == attempt_dir) out[-1] = pid;
      continue;
    }
    if (cmd.find(attempt_dir + "/JOB.json") == std::string::npos && cmd.find(attempt_dir + "-node-") == std::string::npos) {
      continue;
    }
    const std::string env = ReadProc(pid, "environ");
    const size_t at = env.find("\nBTX_RANK=");
    if (at != std::string::npos) out[std::stoi(env.substr(at + 10))] = pid;
  }
  return out;
}

bool Gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

std::string JobLogs(storage::Store& store, const std::string& job_id) {
  auto logs = store.LogsAfter(job_id, 0, 100000);
  std::string out;
  if (logs.ok()) {
    for (const auto& l : *logs) out += Cat(l.attempt, " [", l.stream, "] ", l.line, "\n");
  }
  return out;
}

}  // namespace btx::e2e
