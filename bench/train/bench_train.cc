// Trainer throughput vs a baseline measured in the same run with the same model shape, batch shape and threads.
// Dense: the baseline is written directly with torch::nn modules + torch::optim::AdamW (+ clip_grad_norm_).
// MoE (--experts E): the baseline is the same trainer with the FFN as a plain-ATen per-expert loop, so the
// ratio isolates the btx::kernels MoE operators. Prints tokens/s and the ratio (best of 3 alternating rounds).
//   btx_bench_train [--threads N] [--steps N] [--hidden D] [--layers L] [--seq T] [--batch B] [--experts E]
//                   [--device cpu|cuda]   (cuda: both sides train with bf16 autocast)
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "btx/kernels/autocast.h"
#include "btx/model/llama.h"
#include "btx/model/trainer.h"

namespace {

struct Args {
  int threads = 2, steps = 20, warmup = 3;
  int64_t hidden = 128, layers = 2, seq = 128, batch = 8, vocab = 259, experts = 0;
  std::string device = "cpu";
};

// Baseline: a textbook Llama block with torch::nn building blocks.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t d, int64_t f, int64_t h, int64_t hkv)
      : heads(h), kv_heads(hkv), hd(d / h),
        q(register_module("q", torch::nn::Linear(torch::nn::LinearOptions(d, d).bias(false)))),
        k(register_module("k", torch::nn::Linear(torch::nn::LinearOptions(d, hkv * (d / h)).bias(false)))),
        v(register_module("v", torch::nn::Linear(torch::nn::LinearOptions(d, hkv * (d / h)).bias(false)))),
        o(register_module("o", torch::nn::Linear(torch::nn::LinearOptions(d, d).bias(false)))),
        gate(register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(d, f).bias(false)))),
        up(register_module("up", torch::nn::Linear(torch::nn::LinearOptions(d, f).bias(false)))),
        down(register_module("down", torch::nn::Linear(torch::nn::LinearOptions(f, d).bias(false)))),
        n1(register_parameter("n1", torch::ones({d}))), n2(register_parameter("n2", torch::ones({d}))) {}
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin) {
    const int64_t B = x.size(0), T = x.size(1);
    auto h = btx::model::RmsNorm(x, n1, 1e-5);
    auto qq = btx::model::ApplyRope(q(h).view({B, T, heads, hd}).transpose(1, 2), cos, sin);
    auto kk = btx::model::ApplyRope(k(h).view({B, T, kv_heads, hd}).transpose(1, 2), cos, sin);
    auto vv = v(h).view({B, T, kv_heads, hd}).transpose(1, 2);
    kk = kk.repeat_interleave(heads / kv_heads, 1);
    vv = vv.repeat_interleave(heads / kv_heads, 1);
    auto s = torch::matmul(qq, kk.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    s = s.masked_fill(torch::ones({T, T}, s.options().dtype(torch::kBool)).triu(1), -INFINITY);
    x = x + o(torch::matmul(torch::softmax(s, -1), vv).transpose(1, 2).reshape({B, T, -1}));
    h = btx::model::RmsNorm(x, n2, 1e-5);
    return x + down(torch::silu(gate(h)) * up(h));
  }
  int64_t heads, kv_heads, hd;
  torch::nn::Linear q, k, v, o, gate, up, down;
  torch::Tensor n1, n2;
};
TORCH_MODULE(Block);

struct BaselineImpl : torch::nn::Module {
  BaselineImpl(const btx::model::ModelConfig& c)
      : emb(register_module("emb", torch::nn::Embedding(c.vocab_size, c.hidden_size))),
        head(register_module("head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)))),
        norm(register_parameter("norm", torch::ones({c.hidden_size}))) {
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      blocks.push_back(register_module("b" + std::to_string(l),
                                       Block(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads)));
  }
  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& cos, const torch::Tensor& sin) {
    auto x = emb(tokens);
    for (auto& b : blocks) x = b->forward(x, cos, sin);
    return head(btx::model::RmsNorm(x, norm, 1e-5));
  }
  torch::nn::Embedding emb;
  torch::nn::Linear head;
  torch::Tensor norm;
  std::vector<Block> blocks;
};
TORCH_MODULE(Baseline);

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    long long v = std::atoll(argv[i + 1]);
    if (k == "--device") a.device = argv[i + 1];
    else if (k == "--threads") a.threads = static_cast<int>(v);
    else if (k == "--steps") a.steps = static_cast<int>(v);
    else if (k == "--hidden") a.hidden = v;
    else if (k == "--layers") a.layers = v;
    else if (k == "--seq") a.seq = v;
    else if (k == "--batch") a.batch = v;
    else if (k == "--experts") a.experts = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  at::set_num_threads(a.threads);
  const bool cuda = a.device == "cuda";
  if (a.device != "cpu" && !(cuda && torch::cuda::is_available())) {
    std::fprintf(stderr, "--device %s: expected cpu, or cuda with a visible GPU\n", a.device.c_str());
    return 2;
  }
  const torch::Device dev = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  btx::model::ModelConfig c;
  c.hidden_size = a.hidden;
  c.intermediate_size = a.hidden * 8 / 3 / 16 * 16;
  c.num_hidden_layers = a.layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.num_local_experts = a.experts;
  const int64_t total_steps = a.warmup + a.steps;
  // Shared data: a long pseudo-random token stream; both sides see batches of the same shape.
  auto tokens = std::make_shared<std::vector<int32_t>>((a.seq + 1) * a.batch * (total_steps + 2));
  for (size_t i = 0; i < tokens->size(); ++i) (*tokens)[i] = static_cast<int32_t>((i * 2654435761u >> 7) % 256);

  btx::model::TrainConfig tc;
  tc.seq_len = a.seq;
  tc.batch_tokens = a.seq * a.batch;
  tc.warmup = 2;
  tc.checkpoint_every = 0;
  tc.log_every = 1000000;
  btx::model::TrainOptions to;
  to.device = a.device;
  to.backend = btx::model::KernelsAvailable() ? btx::model::MoeBackend::kKernels : btx::model::MoeBackend::kReference;

  auto model = btx::model::LlamaModel::Init(c, 1);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().message().c_str());
    return 1;
  }
  // Both sides run `rounds` alternating timed rounds after a warm-up; the best round of each is reported,
  // so a noisy neighbour on a shared machine penalises neither side systematically.
  const int rounds = 3;
  const double tokens_per_round = static_cast<double>(a.steps * a.seq * a.batch);
  auto run_btx = [&](int64_t steps, btx::model::MoeBackend backend) {
    to.steps = steps;
    to.backend = backend;
    btx::model::Trainer t(&*model, tc, to, {{"bench", 1.0, tokens, nullptr}}, {});
    if (!t.Init().ok()) std::abort();
    const double t0 = Now();
    if (!t.Run().ok()) std::abort();
    return Now() - t0;
  };
  const btx::model::MoeBackend main_backend = to.backend;
  run_btx(a.warmup, main_backend);
  double ours = 0, base = 0;
  std::function<double()> base_round;
  if (a.experts == 0) {
    Baseline net(c);
    net->to(dev);
    torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(3e-4).betas({0.9, 0.95}).weight_decay(0.1));
    auto [cos, sin] = btx::model::RopeTables(a.seq, c.head_dim(), c.rope_theta, dev);
    auto all = torch::from_blob(tokens->data(), {static_cast<int64_t>(tokens->size())}, torch::kInt)
                   .to(torch::kLong)
                   .to(dev);
    auto step = [&, net, cos = cos, sin = sin](int64_t s) mutable {
      auto batch = all.narrow(0, s * a.batch * (a.seq + 1), a.batch * (a.seq + 1)).view({a.batch, a.seq + 1});
      opt.zero_grad();
      torch::Tensor loss;
      {
        btx::kernels::CudaAutocastScope amp(cuda);  // the same mixed precision as btx::model::Trainer on a GPU
        auto logits = net->forward(batch.narrow(1, 0, a.seq), cos, sin).to(torch::kFloat);
        loss = torch::nn::functional::cross_entropy(logits.reshape({-1, c.vocab_size}),
                                                    batch.narrow(1, 1, a.seq).reshape({-1}));
      }
      loss.backward();
      torch::nn::utils::clip_grad_norm_(net->parameters(), 1.0);
      opt.step();
      return loss.item<double>();
    };
    for (int s = 0; s < a.warmup; ++s) step(s);
    base_round = [&, step]() mutable {
      const double t0 = Now();
      for (int s = 0; s < a.steps; ++s) step(a.warmup + s);
      return Now() - t0;
    };
    for (int r = 0; r < rounds; ++r) {
      ours = std::max(ours, tokens_per_round / run_btx(a.steps, main_backend));
      base = std::max(base, tokens_per_round / base_round());
    }
  } else {
    // MoE: the baseline is the same trainer with the FFN as a plain-ATen per-expert loop (ReferenceMoe).
    run_btx(a.warmup, btx::model::MoeBackend::kReference);
    for (int r = 0; r < rounds; ++r) {
      ours = std::max(ours, tokens_per_round / run_btx(a.steps, main_backend));
      base = std::max(base, tokens_per_round / run_btx(a.steps, btx::model::MoeBackend::kReference));
    }
  }
  std::printf("model: D=%lld layers=%lld experts=%lld seq=%lld batch=%lld threads=%d steps=%d device=%s\n",
              static_cast<long long>(a.hidden), static_cast<long long>(a.layers), static_cast<long long>(a.experts),
              static_cast<long long>(a.seq), static_cast<long long>(a.batch), a.threads, a.steps, a.device.c_str());
  std::printf("btx trainer%s: %10.1f tokens/s\n",
              a.experts ? (btx::model::KernelsAvailable() ? " (MoE kernels)" : " (MoE reference)") : "", ours);
  std::printf("%s: %10.1f tokens/s\n",
              a.experts ? "baseline (btx trainer, plain-ATen per-expert MoE loop)" : "baseline (torch::nn + torch::optim::AdamW)",
              base);
  std::printf("ratio btx/baseline: %.3f\n", ours / base);
  return 0;
}
