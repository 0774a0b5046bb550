// Encode throughput of btx::model::HfTokenizer against the Python `tokenizers` library (Rust, called from Python,
// one thread: TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), on the same tokenizer.json and the same text in
// the same run. Both must produce the same ids (count and checksum are compared).
// Two shapes of input: the whole text as one string, and the text cut at newlines into documents of >= 4 KiB (what
// data preparation feeds it); tokenizers gets those as one encode_batch call.
// "cold" is the first encode after loading (empty BPE caches), "best" the fastest of --reps encodes that follow.
// Without --tokenizer/--text it makes its inputs with tests/python/tokenizers_hf.py --make-assets: GPT-2, Llama 3,
// Qwen2 and SmolLM-style tokenizers trained (32k vocab) on generated text, and a 4 MB corpus of prose, code, math,
// many scripts, emoji and whitespace.
//   btx_bench_tokenizer --python VENV/bin/python [--workdir /tmp/btx-bench-tokenizer] [--reps 5]
//                       [--tokenizer FILE]... [--text FILE]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "hf_tokenizer.h"

namespace fs = std::filesystem;

namespace {

#ifndef BTX_SOURCE_DIR
#define BTX_SOURCE_DIR "."
#endif

constexpr const char* kPythonBench = R"PY(
import sys, time
from tokenizers import Tokenizer
path, text_path, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(text_path, "rb").read()
docs, start = [], 0
while start < len(data):
    end = data.find(b"\n", start + 4096)
    end = len(data) if end < 0 else end + 1
    docs.append(data[start:end].decode("utf-8"))
    start = end
text = data.decode("utf-8")
def checksum(seqs):
    h, n = 0, 0
    for ids in seqs:
        for i in ids:
            h = (h * 1000003 + i + 1) & 0xFFFFFFFFFFFFFFFF
            n += 1
    return n, h
for shape in ("string", "docs"):
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(path)
    load = time.perf_counter() - t0
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        if shape == "string":
            out = [tok.encode(text, add_special_tokens=False)]
        else:
            out = tok.encode_batch(docs, add_special_tokens=False)
        times.append(time.perf_counter() - t0)
    n, h = checksum(e.ids for e in out)
    print(shape, load, times[0], min(times[1:]), n, h, len(docs), flush=True)
)PY";

struct Args {
  std::string python = "python3";
  std::string workdir = "/tmp/btx-bench-tokenizer";
  std::vector<std::string> tokenizers;
  std::string text;
  int reps = 5;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct Measure {
  double load = 0, cold = 0, best = 0;
  uint64_t tokens = 0, checksum = 0;
};

void Accumulate(const std::vector<int32_t>& ids, Measure* m) {
  for (int32_t i : ids) {
    m->checksum = m->checksum * 1000003 + static_cast<uint64_t>(i) + 1;
    ++m->tokens;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--python") {
      a.python = next();
    } else if (k == "--workdir") {
      a.workdir = next();
    } else if (k == "--tokenizer") {
      a.tokenizers.push_back(next());
    } else if (k == "--text") {
      a.text = next();
    } else if (k == "--reps") {
      a.reps = std::max(1, std::atoi(next().c_str()));
    } else {
      std::fprintf(stderr,
                   "usage: btx_bench_tokenizer --python VENV/bin/python [--workdir DIR] [--reps N] "
                   "[--tokenizer FILE]... [--text FILE]\n");
      return 2;
    }
  }
  fs::create_directories(a.workdir);
  if (a.tokenizers.empty() || a.text.empty()) {
    const std::string assets = a.workdir + "/assets";
    if (!fs::exists(assets + "/corpus.txt") || !fs::exists(assets + "/smollm.json")) {
      const std::string cmd = Quote(a.python) + " " + Quote(std::string(BTX_SOURCE_DIR) + "/tests/python/tokenizers_hf.py") +
                              " --make-assets " + Quote(assets) + " --vocab 32000 --mb 4";
      std::printf("making inputs: %s\n", cmd.c_str());
      std::fflush(stdout);
      if (std::system(cmd.c_str()) != 0) {
        std::fprintf(stderr, "btx_bench_tokenizer: making the inputs failed\n");
        return 1;
      }
    }
    if (a.tokenizers.empty()) {
      for (const char* n : {"gpt2", "llama3", "qwen2", "smollm"}) a.tokenizers.push_back(assets + "/" + n + ".json");
    }
    if (a.text.empty()) a.text = assets + "/corpus.txt";
  }
  const std::string text = ReadAll(a.text);
  std::vector<std::string_view> docs;
  for (size_t start = 0; start < text.size();) {
    size_t end = start + 4096 < text.size() ? text.find('\n', start + 4096) : std::string::npos;
    end = end == std::string::npos ? text.size() : end + 1;
    docs.emplace_back(text.data() + start, end - start);
    start = end;
  }
  const std::string script = a.workdir + "/hf_bench.py";
  std::ofstream(script) << kPythonBench;
  const double mb = static_cast<double>(text.size()) / 1e6;
  std::printf("text: %s, %.2f MB (%zu documents of >= 4 KiB); best of %d encodes after a cold one; one thread\n",
              a.text.c_str(), mb, docs.size(), a.reps);
  std::printf("%-12s %-7s %10s %12s %12s %12s %12s %8s %s\n", "tokenizer", "input", "tokens", "btx cold",
              "btx best", "tok. cold", "tok. best", "ratio", "ids");
  bool all_same = true;
  for (const auto& path : a.tokenizers) {
    const std::string name = fs::path(path).stem().string();
    // tokenizers first: a separate process, so the two never share a core's caches or a CPU frequency boost.
    const std::string cmd = "TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 " + Quote(a.python) + " " +
                            Quote(script) + " " + Quote(path) + " " + Quote(a.text) + " " + std::to_string(a.reps);
    FILE* p = popen(cmd.c_str(), "r");
    if (p == nullptr) return 1;
    Measure hf[2];
    char shape[16];
    size_t ndocs = 0;
    for (int s = 0; s < 2; ++s) {
      unsigned long long n = 0, h = 0;
      if (std::fscanf(p, "%15s %lf %lf %lf %llu %llu %zu", shape, &hf[s].load, &hf[s].cold, &hf[s].best, &n, &h,
                      &ndocs) != 7) {
        std::fprintf(stderr, "btx_bench_tokenizer: no result from %s\n", cmd.c_str());
        pclose(p);
        return 1;
      }
      hf[s].tokens = n;
      hf[s].checksum = h;
    }
    pclose(p);
    for (int s = 0; s < 2; ++s) {
      Measure m;
      double t0 = Now();
      auto tok = btx::model::HfTokenizer::Load(path);
      m.load = Now() - t0;
      if (!tok.ok()) {
        std::fprintf(stderr, "btx_bench_tokenizer: %s\n", tok.status().ToString().c_str());
        return 1;
      }
      m.best = 1e30;
      for (int r = 0; r <= a.reps; ++r) {
        Measure run;
        t0 = Now();
        if (s == 0) {
          Accumulate(tok->Encode(text), &run);
        } else {
          for (auto d : docs) Accumulate(tok->Encode(d), &run);
        }
        const double dt = Now() - t0;
        if (r == 0) {
          m.cold = dt;
          m.tokens = run.tokens;
          m.checksum = run.checksum;
        } else {
          m.best = std::min(m.best, dt);
        }
      }
      const bool same = m.tokens == hf[s].tokens && m.checksum == hf[s].checksum && ndocs == docs.size();
      all_same &= same;
      std::printf("%-12s %-7s %10llu %7.1f MB/s %7.1f MB/s %7.1f MB/s %7.1f MB/s %7.2fx %s\n", name.c_str(),
                  s == 0 ? "string" : "docs", static_cast<unsigned long long>(m.tokens), mb / m.cold, mb / m.best,
                  mb / hf[s].cold, mb / hf[s].best, hf[s].best / m.best, same ? "identical" : "DIFFERENT");
      if (s == 1) {
        std::printf("%-12s %-7s load: btx %.3f s, tokenizers %.3f s\n", "", "", m.load, hf[s].load);
      }
      std::fflush(stdout);
    }
  }
  std::printf("ratio = tokenizers best time / btx best time (> 1: btx is faster)\n");
  return all_same ? 0 : 1;
}
