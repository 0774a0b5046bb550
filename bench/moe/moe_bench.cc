// Forward + backward wall time of one MoE SwiGLU layer, three ways, measured in the same run:
//   moe    btx::kernels::moe_swiglu (sorted dispatch, per-expert GEMMs, hand-written backward)
//   naive  loop over experts: select its tokens, run the expert, index_add (transformers' Mixtral block),
//          differentiated by autograd
//   dense  a SwiGLU FFN with hidden size k * F: the same active parameters and FLOPs per token
// Methods are interleaved rep by rep so that background load hits all three alike; medians are reported.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "btx/kernels/moe.h"

// OpenBLAS keeps its own thread pool; pin it to the requested thread count when it is the BLAS in use.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace {

struct Args {
  int64_t tokens = 4096, dim = 512, hidden = 1024, experts = 8, top_k = 2;
  int threads = 2, reps = 7, warmup = 2;
  uint64_t seed = 1234;
  std::string device = "cpu";   // cpu | cuda
  std::string dtype = "float32";  // float32 | bfloat16
};

[[noreturn]] void usage(const char* prog) {
  std::fprintf(stderr,
               "usage: %s [--tokens T] [--dim D] [--hidden F] [--experts E] [--top-k k] [--threads N] [--reps R]"
               " [--warmup W] [--seed S] [--device cpu|cuda] [--dtype float32|bfloat16]\n",
               prog);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage(argv[0]);
    const std::string value = argv[++i];
    const long long v = std::atoll(value.c_str());
    if (flag == "--device") a.device = value;
    else if (flag == "--dtype") a.dtype = value;
    else if (flag == "--tokens") a.tokens = v;
    else if (flag == "--dim") a.dim = v;
    else if (flag == "--hidden") a.hidden = v;
    else if (flag == "--experts") a.experts = v;
    else if (flag == "--top-k") a.top_k = v;
    else if (flag == "--threads") a.threads = static_cast<int>(v);
    else if (flag == "--reps") a.reps = static_cast<int>(v);
    else if (flag == "--warmup") a.warmup = static_cast<int>(v);
    else if (flag == "--seed") a.seed = static_cast<uint64_t>(v);
    else usage(argv[0]);
  }
  if (a.tokens <= 0 || a.dim <= 0 || a.hidden <= 0 || a.experts <= 0 || a.top_k <= 0 || a.top_k > a.experts ||
      a.threads <= 0 || a.reps <= 0 || a.warmup < 0 || (a.device != "cpu" && a.device != "cuda") ||
      (a.dtype != "float32" && a.dtype != "bfloat16")) {
    usage(argv[0]);
  }
  return a;
}

at::Tensor leaf(at::Tensor t) { return t.set_requires_grad(true); }

void clear_grads(const std::vector<at::Tensor>& params) {
  for (const at::Tensor& p : params) p.mutable_grad().reset();
}

// GPU work is asynchronous: the device is drained before the clock starts and before it is read.
double seconds_of(const std::function<void()>& fn, bool cuda) {
  if (cuda) torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  if (cuda) torch::cuda::synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  at::set_num_threads(a.threads);
  if (openblas_set_num_threads) openblas_set_num_threads(a.threads);
  at::manual_seed(a.seed);
  const bool cuda = a.device == "cuda";
  if (cuda && !torch::cuda::is_available()) {
    std::fprintf(stderr, "btx_bench_moe: --device cuda but no CUDA device (or LibTorch without CUDA)\n");
    return 1;
  }
  // Inputs are drawn in float32 on the target device (fast for large shapes), then cast.
  const at::TensorOptions to = at::TensorOptions()
                                   .device(cuda ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU))
                                   .dtype(a.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
  auto randn = [&](at::IntArrayRef shape) {
    return at::randn(shape, at::TensorOptions().device(to.device()).dtype(at::kFloat)).to(to.dtype());
  };

  const double s_in = 1.0 / std::sqrt(static_cast<double>(a.dim));
  const double s_out = 1.0 / std::sqrt(static_cast<double>(a.hidden));
  const at::Tensor x = leaf(randn({a.tokens, a.dim}));
  const at::Tensor dy = randn({a.tokens, a.dim});
  // Router output is an input here: its cost is identical for every method and not what is measured.
  btx::kernels::RoutingOptions ro;
  ro.top_k = a.top_k;
  const btx::kernels::Routing routing = btx::kernels::route(randn({a.tokens, a.experts}), ro);
  const at::Tensor index = routing.expert_index;
  const at::Tensor gates = leaf(routing.gates.detach().to(to).clone());
  const at::Tensor w1 = leaf(randn({a.experts, a.hidden, a.dim}) * s_in);
  const at::Tensor w3 = leaf(randn({a.experts, a.hidden, a.dim}) * s_in);
  const at::Tensor w2 = leaf(randn({a.experts, a.dim, a.hidden}) * s_out);
  const int64_t dense_hidden = a.top_k * a.hidden;
  const at::Tensor d1 = leaf(randn({dense_hidden, a.dim}) * s_in);
  const at::Tensor d3 = leaf(randn({dense_hidden, a.dim}) * s_in);
  const at::Tensor d2 = leaf(randn({a.dim, dense_hidden}) * s_out);

  // The naive loop gets one parameter tensor per expert, as transformers' ModuleList of experts has:
  // slicing the stacked [E, ...] tensors would add a full-size select backward per expert to its time.
  std::vector<at::Tensor> e1, e3, e2;
  for (int64_t e = 0; e < a.experts; ++e) {
    e1.push_back(leaf(w1[e].detach().clone()));
    e3.push_back(leaf(w3[e].detach().clone()));
    e2.push_back(leaf(w2[e].detach().clone()));
  }
  std::vector<at::Tensor> naive_params{x, gates};
  naive_params.insert(naive_params.end(), e1.begin(), e1.end());
  naive_params.insert(naive_params.end(), e3.begin(), e3.end());
  naive_params.insert(naive_params.end(), e2.begin(), e2.end());
  const std::vector<at::Tensor> moe_params{x, gates, w1, w3, w2}, dense_params{x, d1, d3, d2};

  auto run_moe = [&] {
    clear_grads(moe_params);
    const at::Tensor y = btx::kernels::moe_swiglu(x, index, gates, w1, w3, w2);
    torch::autograd::backward({y}, {dy});
  };
  auto run_naive = [&] {
    clear_grads(naive_params);
    at::Tensor y = at::zeros_like(x, x.options().requires_grad(false));
    for (int64_t e = 0; e < a.experts; ++e) {
      const std::vector<at::Tensor> hit = at::where(index == e);  // (token, slot) pairs routed to e
      const at::Tensor& tok = hit[0];
      if (tok.numel() == 0) continue;
      const at::Tensor xe = x.index_select(0, tok);
      const at::Tensor h = at::silu(at::mm(xe, e1[e].t())) * at::mm(xe, e3[e].t());
      const at::Tensor out = at::mm(h, e2[e].t()) * gates.index({tok, hit[1]}).unsqueeze(1);
      y = y.index_add(0, tok, out);
    }
    torch::autograd::backward({y}, {dy});
  };
  auto run_dense = [&] {
    clear_grads(dense_params);
    const at::Tensor h = at::silu(at::mm(x, d1.t())) * at::mm(x, d3.t());
    const at::Tensor y = at::mm(h, d2.t());
    torch::autograd::backward({y}, {dy});
  };

  for (int i = 0; i < a.warmup; ++i) {
    run_moe();
    run_naive();
    run_dense();
  }
  std::vector<double> t_moe, t_naive, t_dense;
  for (int i = 0; i < a.reps; ++i) {
    t_moe.push_back(seconds_of(run_moe, cuda));
    t_naive.push_back(seconds_of(run_naive, cuda));
    t_dense.push_back(seconds_of(run_dense, cuda));
  }
  const double moe = median(t_moe), naive = median(t_naive), dense = median(t_dense);

  btx::kernels::MoeStats stats;
  {
    at::NoGradGuard no_grad;
    btx::kernels::moe_swiglu(x, index, gates, w1, w3, w2, {}, &stats);
  }
  const at::Tensor load = stats.tokens_per_expert;
  std::printf("btx_bench_moe: T=%lld D=%lld F=%lld E=%lld k=%lld device=%s dtype=%s threads=%d reps=%d"
              " (median of reps, fwd+bwd)\n",
              static_cast<long long>(a.tokens), static_cast<long long>(a.dim), static_cast<long long>(a.hidden),
              static_cast<long long>(a.experts), static_cast<long long>(a.top_k), a.device.c_str(), a.dtype.c_str(),
              a.threads, a.reps);
  std::printf("  rows per expert: min %lld max %lld\n", static_cast<long long>(load.min().item<int64_t>()),
              static_cast<long long>(load.max().item<int64_t>()));
  std::printf("  moe_swiglu          %9.2f ms\n", moe * 1e3);
  std::printf("  naive expert loop   %9.2f ms\n", naive * 1e3);
  std::printf("  dense SwiGLU (k*F)  %9.2f ms\n", dense * 1e3);
  // fwd+bwd of a SwiGLU FFN: 3 GEMMs forward, 6 backward, 2 * rows * D * F FLOPs each.
  const double flops = 18.0 * static_cast<double>(a.tokens * a.top_k) * a.dim * a.hidden;
  std::printf("  active TFLOP/s: moe %.1f, dense %.1f\n", flops / moe / 1e12, flops / dense / 1e12);
  std::printf("  speed-up vs naive loop: %.2fx (CPU target >= 3x)\n", naive / moe);
  std::printf("  time vs dense equivalent: %.2fx (CPU target <= 1.25x)\n", moe / dense);
  std::printf("  throughput vs dense equivalent: %.0f%% (GPU target >= 80%%)\n", 100.0 * dense / moe);
  return 0;
}
