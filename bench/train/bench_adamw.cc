// AdamW optimizer step on one flat float32 buffer: btx::kernels::FusedAdamW (one pass) against the ATen op
// sequence the trainer used before (weight decay mul_, m mul_/add_, v mul_/addcmul_, sqrt, div, add_,
// addcdiv_), measured in the same run on the same buffers. Times are medians over interleaved repetitions
// (after one warm-up each); the ratio is baseline / fused (> 1: the fused step is faster).
//   btx_bench_adamw [--sizes N1,N2,...] [--threads T1,T2,...] [--reps R] [--weight-decay WD]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "btx/kernels/fused_adamw.h"
#include "bench_timing.h"

namespace {

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::atoll(item.c_str()));
  return out;
}

using btx::bench::Median;
using btx::bench::Seconds;

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sizes = {25'000'000, 100'000'000}, threads = {1, 2};
  int reps = 5;
  double weight_decay = 0.1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--sizes") {
      sizes = ParseList(argv[i + 1]);
    } else if (k == "--threads") {
      threads = ParseList(argv[i + 1]);
    } else if (k == "--reps") {
      reps = std::max(1, std::atoi(argv[i + 1]));
    } else if (k == "--weight-decay") {
      weight_decay = std::atof(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  std::printf("| elements | threads | ATen sequence | fused | ATen / fused |\n|---|---|---|---|---|\n");
  for (int64_t n : sizes) {
    // One set of buffers for both variants: each step continues from the previous one's state.
    at::Tensor w = at::randn({n}), g = at::randn({n}), m = at::zeros({n}), v = at::zeros({n});
    int64_t step = 0;
    auto params = [&] {
      ++step;
      btx::kernels::AdamWParams p;
      p.lr = 1e-4;
      p.beta1 = 0.9;
      p.beta2 = 0.95;
      p.eps = 1e-8;
      p.weight_decay = weight_decay;
      p.bc1 = 1 - std::pow(p.beta1, static_cast<double>(step));
      p.bc2 = 1 - std::pow(p.beta2, static_cast<double>(step));
      return p;
    };
    for (int64_t t : threads) {
      at::set_num_threads(static_cast<int>(t));
      auto aten = [&] { btx::kernels::AdamWAtenSequence(w, g, m, v, params()); };
      auto fused = [&] { btx::kernels::FusedAdamW(w, g, m, v, params()); };
      aten();  // warm-up: first touch of the temporaries' pages, thread pool start
      fused();
      std::vector<double> base_t, fused_t;
      for (int r = 0; r < reps; ++r) {
        base_t.push_back(Seconds(aten));
        fused_t.push_back(Seconds(fused));
      }
      const double bt = Median(base_t), ft = Median(fused_t);
      std::printf("| %lld | %lld | %.1f ms | %.1f ms | %.2fx |\n", static_cast<long long>(n),
                  static_cast<long long>(t), bt * 1e3, ft * 1e3, bt / ft);
      std::fflush(stdout);
    }
  }
  return 0;
}
