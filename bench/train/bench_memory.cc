// Memory-efficient training kernels against the plain path, measured in the same run (CPU, float32):
//   attention: naive (T x T scores) vs chunked (online softmax, O(T) saved) — forward + backward time and the
//              peak resident memory above the inputs;
//   loss:      full logits + log_softmax + nll vs the chunked cross-entropy — same measures.
// Times are medians over interleaved repetitions; peaks come from VmHWM reset before each measured call
// (/proc/self/clear_refs), with glibc returning large blocks at once so the resident size follows live tensors.
//   btx_bench_memory [--seq T] [--batch B] [--heads H] [--kv-heads Hkv] [--head-dim hd] [--block N]
//                    [--tokens N] [--hidden D] [--vocab V] [--chunk C] [--reps R] [--threads N]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <malloc.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "btx/kernels/attention.h"
#include "btx/kernels/chunked_loss.h"
#include "bench_timing.h"

namespace {

struct Args {
  int64_t seq = 2048, batch = 1, heads = 4, kv_heads = 2, head_dim = 16, block = 0;
  int64_t tokens = 2048, hidden = 256, vocab = 128256, chunk = 512;
  int reps = 5, threads = 2;
};

int64_t StatusKb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(std::string(key).size()));
  return -1;
}

// Peak resident bytes fn adds over what is resident when it starts; -1 where the peak cannot be reset.
int64_t PeakAbove(const std::function<void()>& fn) {
  std::ofstream reset("/proc/self/clear_refs");
  reset << "5";
  reset.close();
  const int64_t base = StatusKb("VmRSS:");
  if (!reset || StatusKb("VmHWM:") > base + 1024) {  // the reset did not take
    fn();
    return -1;
  }
  fn();
  return (StatusKb("VmHWM:") - base) * 1024;
}

using btx::bench::Median;
using btx::bench::Seconds;

std::string Mib(int64_t bytes) {
  if (bytes < 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// Times both (one warm-up each, then `reps` interleaved runs), measures each one's peak, and prints the ratios.
void CompareNaiveAndChunked(const char* what, const std::function<void()>& naive, const std::function<void()>& chunked,
                            int reps) {
  const char *base_name = "naive", *new_name = "chunked";
  naive();
  chunked();
  std::vector<double> base_t, new_t;
  for (int r = 0; r < reps; ++r) {
    base_t.push_back(Seconds(naive));
    new_t.push_back(Seconds(chunked));
  }
  const int64_t base_peak = PeakAbove(naive), new_peak = PeakAbove(chunked);
  const double bt = Median(base_t), nt = Median(new_t);
  std::printf("%s\n  %-8s fwd+bwd %8.1f ms   peak +%s\n  %-8s fwd+bwd %8.1f ms   peak +%s\n", what, base_name, bt * 1e3,
              Mib(base_peak).c_str(), new_name, nt * 1e3, Mib(new_peak).c_str());
  std::printf("  time %s / %s: %.2fx", new_name, base_name, nt / bt);
  if (base_peak > 0 && new_peak > 0)
    std::printf("   peak %s / %s: %.3fx", new_name, base_name, static_cast<double>(new_peak) / base_peak);
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int64_t v = std::atoll(argv[i + 1]);
    if (k == "--seq") a.seq = v;
    else if (k == "--batch") a.batch = v;
    else if (k == "--heads") a.heads = v;
    else if (k == "--kv-heads") a.kv_heads = v;
    else if (k == "--head-dim") a.head_dim = v;
    else if (k == "--block") a.block = v;
    else if (k == "--tokens") a.tokens = v;
    else if (k == "--hidden") a.hidden = v;
    else if (k == "--vocab") a.vocab = v;
    else if (k == "--chunk") a.chunk = v;
    else if (k == "--reps") a.reps = static_cast<int>(v);
    else if (k == "--threads") a.threads = static_cast<int>(v);
    else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  at::set_num_threads(a.threads);
  at::manual_seed(1);
  std::printf("threads %d, reps %d (median), float32 on CPU\n", a.threads, a.reps);

  // Attention: gradients of all three inputs for a random upstream gradient.
  {
    const at::Tensor q = at::randn({a.batch, a.heads, a.seq, a.head_dim}).requires_grad_();
    const at::Tensor k = at::randn({a.batch, a.kv_heads, a.seq, a.head_dim}).requires_grad_();
    const at::Tensor v = at::randn({a.batch, a.kv_heads, a.seq, a.head_dim}).requires_grad_();
    const at::Tensor up = at::randn({a.batch, a.heads, a.seq, a.head_dim});
    const int64_t bq = a.block > 0 ? a.block : btx::kernels::kDefaultBlockQ;
    const int64_t bk = a.block > 0 ? a.block : btx::kernels::kDefaultBlockK;
    auto naive = [&] { torch::autograd::grad({btx::kernels::naive_causal_attention(q, k, v)}, {q, k, v}, {up}); };
    auto chunked = [&] {
      torch::autograd::grad({btx::kernels::chunked_causal_attention(q, k, v, 0, 0, bq, bk)}, {q, k, v}, {up});
    };
    char what[160];
    std::snprintf(what, sizeof what, "attention B %lld, H %lld / Hkv %lld, T %lld, head_dim %lld, blocks %lld x %lld",
                  static_cast<long long>(a.batch), static_cast<long long>(a.heads), static_cast<long long>(a.kv_heads),
                  static_cast<long long>(a.seq), static_cast<long long>(a.head_dim), static_cast<long long>(bq),
                  static_cast<long long>(bk));
    CompareNaiveAndChunked(what, naive, chunked, a.reps);
  }

  // Cross-entropy of the LM head: gradients of the hidden states and the head.
  {
    const at::Tensor h = at::randn({a.tokens, a.hidden}).requires_grad_();
    const at::Tensor w = (at::randn({a.vocab, a.hidden}) * 0.05).requires_grad_();
    const at::Tensor t = at::randint(a.vocab, {a.tokens}, at::kLong);
    auto naive = [&] { torch::autograd::grad({btx::kernels::naive_cross_entropy(h, w, t).loss}, {h, w}); };
    auto chunked = [&] {
      torch::autograd::grad({btx::kernels::chunked_cross_entropy(h, w, t, a.chunk).loss}, {h, w});
    };
    char what[160];
    std::snprintf(what, sizeof what, "cross-entropy N %lld tokens, D %lld, V %lld, chunk %lld",
                  static_cast<long long>(a.tokens), static_cast<long long>(a.hidden), static_cast<long long>(a.vocab),
                  static_cast<long long>(a.chunk));
    CompareNaiveAndChunked(what, naive, chunked, a.reps);
  }
  return 0;
}
