// Merge throughput against `cp` of the same input files, measured in the same run on the same filesystem.
// Writes a synthetic dense seed and N experts (float32 safetensors, published with manifests like every btx
// artifact), then alternates, `--reps` times:
//   cp              `cp` of the input model.safetensors files into a scratch dir
//   cp + sync       the same followed by `sync FILE...` (fsync), since the merge writes its output durably
//   merge           btx::model::MergeToDir (BTX, seed kept as an expert) on inputs without manifests: tensor by tensor
//                   from the mapped inputs, output fsynced
//   merge + checks  the same with manifests: the sha256 of every input byte is checked beside the merge
//   merge job       the whole `btx-train` merge job: + the output's manifest and publication (the output's sha256
//                   is taken while it is written, so publication hashes only the small files)
//   durable write   write(2) of as many bytes as the merge's output, from one 8 MiB buffer of random bytes, to
//                   one file in the same scratch dir, then fsync: what the disk takes to make the output's bytes
//                   durable when nothing else is done (the merge starts write-back early, so it can come in
//                   under it; `cp` never waits for the disk at all)
// Throughput is input bytes / wall seconds for every row but durable write (each reads all input bytes once), and
// output bytes / wall seconds for durable write (it reads nothing); best and median of the reps, after one
// unmeasured round. The ratio line compares with cp (throughput) and gives merge / durable write (time).
// Memory: the merge job once more, run by btx-train (next to this binary) in a process of its own: its anonymous
// RSS (heap; not the mapped inputs, which the kernel can drop) sampled every 2 ms and its peak RSS (wait4),
// against the output size and the largest tensor. A streaming merge holds about one tensor per input at a time,
// so its anonymous peak follows the largest tensor, not the model size.
// --cold drops the page cache before every measurement (root only; refused otherwise); the default measures
// with the inputs in the page cache, as a merge that follows the branch jobs on one machine sees them.
//   btx_bench_merge [--dir /tmp/btx-bench-merge] [--experts 2] [--hidden 512] [--ffn 2048] [--layers 8]
//                   [--vocab 8192] [--reps 3] [--threads 2] [--cold] [--method btx|upcycle|btm] [--keep]
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/job.h"
#include "btx/model/merge.h"
#include "btx/model/tokenizer.h"

namespace fs = std::filesystem;

namespace {

// A field of /proc/PID/status in bytes ("VmHWM:  1234 kB"), or -1.
int64_t StatusBytes(const std::string& field, pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  }
  return -1;
}

struct Args {
  std::string dir = "/tmp/btx-bench-merge";
  std::string method = "btx";
  int experts = 2, reps = 3, threads = 2;
  int64_t hidden = 512, ffn = 2048, layers = 8, vocab = 8192;
  bool cold = false, keep = false;
  std::string only;  // "merge": time the streaming merge alone (for profiling)
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int Sh(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  if (rc != 0) std::fprintf(stderr, "btx_bench_merge: `%s` failed (%d)\n", cmd.c_str(), rc);
  return rc;
}

bool DropCaches() {
  Sh("sync");
  std::ofstream f("/proc/sys/vm/drop_caches");
  if (!f) return false;
  f << "3\n";
  f.flush();
  return static_cast<bool>(f);
}

// A dense model whose every tensor is random (so nothing compresses or deduplicates), published with a manifest.
void WriteModel(const btx::model::ModelConfig& cfg, const std::string& dir, uint64_t seed) {
  auto staged = btx::StagedDir::Create(dir);
  if (!staged.ok()) throw std::runtime_error(staged.status().message());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto specs = btx::model::HfSpecs(cfg);
  btx::Status st = btx::WriteFileDurable(staged->path() + "/config.json", btx::model::ConfigToHfJson(cfg).dump(2));
  if (st.ok())
    st = btx::model::WriteHfWeights(
        staged->path(), specs,
        [&](size_t i) -> btx::StatusOr<at::Tensor> { return at::normal(0.0, 0.02, specs[i].shape, gen, at::kFloat); },
        0);
  if (st.ok()) st = btx::model::MakeByteTokenizer()->SaveTo(staged->path());
  if (st.ok()) st = staged->Publish();
  if (!st.ok()) throw std::runtime_error(st.message());
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

// Writes `bytes` to a new file from `buf` (reused) with write(2), then fsyncs it; returns the wall seconds.
double WriteDurably(const std::string& path, uint64_t bytes, const std::vector<char>& buf) {
  const double s = Now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  for (uint64_t left = bytes; left > 0;) {
    const ssize_t w = ::write(fd, buf.data(), std::min<uint64_t>(left, buf.size()));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      throw std::runtime_error("write " + path + ": " + why);
    }
    left -= static_cast<uint64_t>(w);
  }
  const bool synced = ::fsync(fd) == 0;
  if (::close(fd) != 0 || !synced) throw std::runtime_error("fsync " + path + " failed");
  return Now() - s;
}

// Random, so that nothing on the way to the disk can compress or deduplicate it.
std::vector<char> RandomBytes(size_t n) {
  std::vector<char> buf(n);
  std::mt19937_64 gen(42);
  for (size_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t x = gen();
    std::memcpy(buf.data() + i, &x, 8);
  }
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "btx_bench_merge: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--dir") a.dir = next();
    else if (k == "--method") a.method = next();
    else if (k == "--experts") a.experts = std::stoi(next());
    else if (k == "--reps") a.reps = std::stoi(next());
    else if (k == "--threads") a.threads = std::stoi(next());
    else if (k == "--hidden") a.hidden = std::stoll(next());
    else if (k == "--ffn") a.ffn = std::stoll(next());
    else if (k == "--layers") a.layers = std::stoll(next());
    else if (k == "--vocab") a.vocab = std::stoll(next());
    else if (k == "--cold") a.cold = true;
    else if (k == "--keep") a.keep = true;
    else if (k == "--only") a.only = next();
    else {
      std::fprintf(stderr, "usage: btx_bench_merge [--dir D] [--experts N] [--hidden D] [--ffn F] [--layers L] "
                           "[--vocab V] [--reps R] [--threads T] [--cold] [--method btx|upcycle|btm] [--keep]\n");
      return 2;
    }
  }
  at::set_num_threads(a.threads);
  btx::model::ModelConfig cfg;
  cfg.vocab_size = a.vocab;
  cfg.hidden_size = a.hidden;
  cfg.intermediate_size = a.ffn;
  cfg.num_hidden_layers = a.layers;
  cfg.num_attention_heads = std::max<int64_t>(1, a.hidden / 64);
  cfg.num_key_value_heads = cfg.num_attention_heads;
  if (auto v = cfg.Validate(); !v.ok()) {
    std::fprintf(stderr, "btx_bench_merge: %s\n", v.message().c_str());
    return 2;
  }

  fs::remove_all(a.dir);
  fs::create_directories(a.dir);
  const std::string in = a.dir + "/in", scratch = a.dir + "/scratch";
  fs::create_directories(in);
  double t0 = Now();
  std::vector<std::string> inputs = {in + "/seed"};
  WriteModel(cfg, inputs[0], 1);
  for (int e = 0; e < a.experts; ++e) {
    inputs.push_back(in + "/expert-" + std::to_string(e));
    WriteModel(cfg, inputs.back(), 2 + e);
  }
  // The merge reads every byte of every input (the seed is an expert and is averaged into the shared tensors;
  // upcycle reads only the seed, btm only the experts).
  std::vector<std::string> read;
  if (a.method == "upcycle") read = {inputs[0]};
  else if (a.method == "btm") read.assign(inputs.begin() + 1, inputs.end());
  else read = inputs;
  uint64_t in_bytes = 0;
  std::string cp_cmd, copies;
  for (size_t i = 0; i < read.size(); ++i) {
    in_bytes += fs::file_size(read[i] + "/model.safetensors");
    const std::string to = Quote(scratch + "/in-" + std::to_string(i) + ".safetensors");
    cp_cmd += (i ? " && cp " : "cp ") + Quote(read[i] + "/model.safetensors") + " " + to;
    copies += " " + to;
  }
  Sh("sync");
  std::printf("btx_bench_merge: method %s, seed + %d experts (D=%lld, F=%lld, L=%lld, V=%lld), %d threads, %s cache\n",
              a.method.c_str(), a.experts, static_cast<long long>(a.hidden), static_cast<long long>(a.ffn),
              static_cast<long long>(a.layers), static_cast<long long>(a.vocab), a.threads, a.cold ? "cold" : "warm");
  std::printf("inputs: %zu files, %.3f GB read per run (written in %.1f s); filesystem of %s\n", read.size(),
              static_cast<double>(in_bytes) / 1e9, Now() - t0, a.dir.c_str());
  if (a.cold && !DropCaches()) {
    std::fprintf(stderr, "btx_bench_merge: --cold needs a writable /proc/sys/vm/drop_caches (root)\n");
    return 2;
  }

  btx::model::MergeSpec spec;
  spec.method = a.method;
  spec.seed = a.method == "btm" ? "" : inputs[0];
  // Upcycling copies the seed into as many experts as there are inputs; the others merge the experts.
  if (a.method == "upcycle") spec.num_experts = a.experts + 1;
  else
    for (int e = 0; e < a.experts; ++e) spec.experts.emplace_back(std::string("e").append(std::to_string(e)), inputs[1 + e]);
  spec.keep_seed_expert = a.method == "btx";
  spec.max_shard_bytes = 0;
  nlohmann::json job = {{"kind", "merge"}, {"output_dir", scratch + "/job-out"}, {"threads", a.threads},
                        {"spec",
                         {{"method", spec.method}, {"keep_seed_expert", spec.keep_seed_expert}, {"top_k", 2},
                          {"num_experts", spec.num_experts}, {"experts", nlohmann::json::array()}}}};
  if (!spec.seed.empty()) job["spec"]["seed"] = spec.seed;
  for (auto& [name, dir] : spec.experts) job["spec"]["experts"].push_back({{"name", name}, {"model", dir}});
  const std::string job_path = a.dir + "/merge-job.json";
  std::ofstream(job_path) << job.dump(2);

  // Each row is a function that does the work once and returns its wall seconds.
  auto fresh = [&] {
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    Sh("sync");
    if (a.cold) DropCaches();
  };
  uint64_t out_bytes = 0;
  auto merge_once = [&]() -> double {
    const double s = Now();
    auto staged = btx::StagedDir::Create(scratch + "/merged");
    if (!staged.ok()) throw std::runtime_error(staged.status().message());
    btx::Status st = btx::model::MergeToDir(spec, staged->path());
    if (!st.ok()) throw std::runtime_error("merge: " + st.message());
    const double t = Now() - s;
    out_bytes = fs::file_size(staged->path() + "/model.safetensors");
    return t;
  };
  // Without manifests the merge skips the input checks: the streaming merge alone.
  auto set_manifests = [&](bool on) {
    for (const auto& d : inputs) {
      const std::string m = d + "/" + btx::kManifestName, off = m + ".off";
      if (on && fs::exists(off)) fs::rename(off, m);
      if (!on && fs::exists(m)) fs::rename(m, off);
    }
  };
  struct Row {
    Row(std::string n, std::string w, std::function<double()> r, bool out = false)
        : name(std::move(n)), what(std::move(w)), run(std::move(r)), output_rate(out) {}
    std::string name, what;
    std::function<double()> run;
    bool output_rate;  // GB/s of output bytes instead of input bytes
    std::vector<double> t;
  };
  std::vector<Row> rows;
  rows.push_back({"cp", "cp of the input files", [&] {
                    const double s = Now();
                    if (Sh(cp_cmd) != 0) throw std::runtime_error("cp failed");
                    return Now() - s;
                  }});
  rows.push_back({"cp + sync", "the same, then sync (fsync) of the copies", [&] {
                    const double s = Now();
                    if (Sh(cp_cmd) != 0 || Sh("sync" + copies) != 0) throw std::runtime_error("cp failed");
                    return Now() - s;
                  }});
  rows.push_back({"merge", "MergeToDir, inputs without manifests: the streaming merge, output fsynced", [&] {
                    set_manifests(false);
                    const double t = merge_once();
                    set_manifests(true);
                    return t;
                  }});
  rows.push_back({"merge + checks", "MergeToDir with the inputs' sha256 manifests verified beside it", merge_once});
  rows.push_back({"merge job", "btx-train merge job: + output manifest, publish", [&] {
                    const double s = Now();
                    if (int rc = btx::model::RunJobFile(job_path, -1, nullptr); rc != 0)
                      throw std::runtime_error("merge job: exit " + std::to_string(rc));
                    return Now() - s;
                  }});
  // After the merges in every round, so the output size is known (the warm-up round measures it first).
  const std::vector<char> random_bytes = RandomBytes(8u << 20);
  rows.push_back({"durable write", "write(2) + fsync of the output's size from memory (GB/s = output GB / s)",
                  [&] {
                    if (out_bytes == 0) throw std::runtime_error("durable write: the merge's output size is unknown");
                    return WriteDurably(scratch + "/durable-write.bin", out_bytes, random_bytes);
                  },
                  true});
  if (a.only == "merge") rows.erase(rows.begin(), rows.begin() + 2), rows.erase(rows.begin() + 1, rows.end());
  try {
    // One unmeasured round first: the first write of a fresh file set is often slower here (page allocation).
    for (int r = -1; r < a.reps; ++r) {
      std::string line = r < 0 ? "  warm-up:" : "  rep " + std::to_string(r + 1) + ":";
      for (auto& row : rows) {
        fresh();
        const double t = row.run();
        if (r >= 0) row.t.push_back(t);
        char b[96];
        std::snprintf(b, sizeof b, " %s %.3f s,", row.name.c_str(), t);
        line += b;
      }
      line.pop_back();
      std::printf("%s\n", line.c_str());
    }
  } catch (const std::exception& e) {
    set_manifests(true);
    std::fprintf(stderr, "btx_bench_merge: %s\n", e.what());
    return 1;
  }
  auto gbs = [&](const Row& r, double t) {
    return static_cast<double>(r.output_rate ? out_bytes : in_bytes) / 1e9 / t;
  };
  auto best = [](const Row& r) { return *std::min_element(r.t.begin(), r.t.end()); };
  auto median = [](Row r) {
    std::sort(r.t.begin(), r.t.end());
    return r.t[r.t.size() / 2];
  };
  std::printf("output: %.3f GB (model.safetensors); GB/s = input GB / s (durable write: output GB / s); "
              "best (median) of %d\n",
              static_cast<double>(out_bytes) / 1e9, a.reps);
  for (const auto& r : rows)
    std::printf("%-15s %6.3f s  %5.2f GB/s   (%6.3f s  %5.2f GB/s)   %s\n", (r.name + ":").c_str(), best(r),
                gbs(r, best(r)), median(r), gbs(r, median(r)), r.what.c_str());
  if (rows.size() == 6) {
    const double cp = best(rows[0]), cps = best(rows[1]);
    std::printf("ratio (best) to cp / to cp + sync:  merge %.2f / %.2f   merge + checks %.2f / %.2f   merge job %.2f / %.2f"
                "   (target >= 0.7 of cp);   merge / durable write (time) %.2f\n",
                cp / best(rows[2]), cps / best(rows[2]), cp / best(rows[3]), cps / best(rows[3]), cp / best(rows[4]),
                cps / best(rows[4]), best(rows[2]) / best(rows[5]));
  }
  // Memory of one merge job, in a process of its own (this one's heap is warm from the rows above): btx-train
  // runs the merge job while its anonymous RSS is sampled; the kernel's peak RSS comes from wait4.
  {
    fresh();
    const std::string train = (fs::read_symlink("/proc/self/exe").parent_path() / "btx-train").string();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::execl(train.c_str(), train.c_str(), "--job", job_path.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int64_t anon_peak = 0;
    int status = 0;
    struct rusage ru {};
    while (::wait4(pid, &status, WNOHANG, &ru) == 0) {
      anon_peak = std::max(anon_peak, StatusBytes("RssAnon", pid));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    const double largest = static_cast<double>(std::max(a.vocab * a.hidden, a.ffn * a.hidden)) * 4;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "btx_bench_merge: %s --job %s failed (status %d)\n", train.c_str(), job_path.c_str(), status);
    } else {
      std::printf("memory of the merge job (btx-train): peak anonymous RSS %.1f MB (sampled every 2 ms) = %.3f of the "
                  "%.3f GB output, %.1f x its largest tensor (%.1f MB); peak RSS incl. mapped inputs %.1f MB\n",
                  static_cast<double>(anon_peak) / 1e6, static_cast<double>(anon_peak) / static_cast<double>(out_bytes),
                  static_cast<double>(out_bytes) / 1e9, static_cast<double>(anon_peak) / largest, largest / 1e6,
                  static_cast<double>(ru.ru_maxrss) * 1024 / 1e6);
    }
  }
  if (!a.keep) fs::remove_all(a.dir);
  return 0;
}
