#include "btx/model/memory_model.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <iostream>
#include <vector>

#include "btx/kernels/chunked_loss.h"
#include "test_util.h"

namespace btx::model {
namespace {

MemoryModelInput Tiny() {
  MemoryModelInput in;
  in.model.hidden_size = 8;
  in.model.intermediate_size = 16;
  in.model.num_attention_heads = 2;
  in.model.num_key_value_heads = 1;
  in.model.num_hidden_layers = 1;
  in.model.vocab_size = 10;
  in.rows = 1;
  in.seq_len = 4;
  in.params = 1000;
  in.trainable = 600;
  return in;
}

TEST(MemoryModel, HandComputedTinyCase) {
  const MemoryModelInput in = Tiny();  // N = 4 tokens, hd = 4
  // norm 32+4, qkv 32+64, rope 48, naive scores 2*16 + GQA repeat 64, o/residual/norm 32+32+4, FFN 32+256
  EXPECT_EQ(LayerActivationElements(in), 36 + 96 + 48 + 96 + 68 + 288);
  const MemoryModel m = EstimateMemory(in);
  EXPECT_EQ(m.params, 4000);
  EXPECT_EQ(m.grads, 2400);
  EXPECT_EQ(m.optimizer, 4800);
  // embeddings 32 + one layer 632 + final norm 36 + logits and their gradient 2*4*10, float32
  EXPECT_EQ(m.activations, (32 + 632 + 36 + 80) * 4);
  EXPECT_EQ(m.total(), 4000 + 2400 + 4800 + 3120);
}

TEST(MemoryModel, OptionsShrinkWhatTheyShouldAtLength) {
  MemoryModelInput in = Tiny();
  in.model.hidden_size = 512;
  in.model.intermediate_size = 1408;
  in.model.num_attention_heads = 8;
  in.model.num_key_value_heads = 2;
  in.model.num_hidden_layers = 8;
  in.model.vocab_size = 128256;
  in.rows = 2;
  in.seq_len = 4096;
  const int64_t full = EstimateMemory(in).activations;
  in.loss_chunk_tokens = 1024;
  const int64_t chunked_loss = EstimateMemory(in).activations;
  EXPECT_GT(full - chunked_loss, int64_t{4} * 8192 * 128256);  // 2 N V floats gone, 2 chunk V kept
  in.attention = "chunked";
  const int64_t chunked = EstimateMemory(in).activations;
  EXPECT_LT(chunked, chunked_loss / 2);  // then the T^2 probabilities dominate at 4k tokens
  in.checkpointing = true;
  EXPECT_LT(EstimateMemory(in).activations, chunked / 2);
  in.activation_bytes = 2;
  in.optimizer_shards = 4;
  in.trainable = 1000;
  EXPECT_EQ(EstimateMemory(in).optimizer, 2000);
  in.optimizer_shards = 1;
  EXPECT_EQ(EstimateMemory(in).optimizer, 8000);
}

// ZeRO-3 at size: Llama-3-8B (8.03e9 parameters, all trained) on 8 ranks, as shape-only (meta) tensors. The
// shards are 16 B / 8 per parameter; on top, the outer unit (embeddings and lm_head, 1.05e9) and the largest layer
// (2.18e8) are whole: weights and gradients. The numbers quoted in docs/btx-train-protocol.md.
TEST(MemoryModel, Zero3ShardsParametersAndGradientsOfAn8BModelOn8Ranks) {
  ModelConfig c;
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.max_position_embeddings = 8192;
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (auto& [name, shape] : LlamaModel::Layout(c))
    t.emplace_back(name, at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(at::kMeta)));
  auto model = LlamaModel::FromTensors(c, std::move(t));
  ASSERT_TRUE(model.ok()) << model.status().message();
  int64_t params = 0;
  for (auto& [name, p] : model->params()) {
    p.requires_grad_(true);
    params += p.numel();
  }
  ASSERT_EQ(params, 8030261248);
  const int64_t outer = 2 * 128256 * 4096 + 4096, layer = 218112000;
  contract::TrainConfig train;
  train.zero = 3;
  train.seq_len = 8192;
  train.batch_tokens = 8 * 8192;  // one sequence per rank
  train.precision = "bf16";
  train.attention = "chunked";
  train.loss_chunk_tokens = 1024;
  const std::string line = DescribeTrainingMemory(*model, train, 8, "cuda:0");
  std::cout << line << "\n";
  MemoryModelInput in;
  in.model = c;
  in.params = in.trainable = params;
  in.param_shards = in.optimizer_shards = 8;
  in.gathered = outer + layer;
  const MemoryModel m = EstimateMemory(in);
  EXPECT_EQ(m.params, params * 4 / 8 + (outer + layer) * 4);
  EXPECT_EQ(m.grads, params * 4 / 8 + (outer + layer) * 4);
  EXPECT_EQ(m.optimizer, params);
  EXPECT_LT(m.params + m.grads + m.optimizer, int64_t{27} << 30);  // vs 104 GB per GPU with ZeRO-1
  EXPECT_NE(line.find("params " + FormatBytes(m.params) + " (1/8 + " + FormatBytes((outer + layer) * 4) + " gathered, ZeRO-3)"),
            std::string::npos) << line;
  EXPECT_NE(line.find("optimizer " + FormatBytes(m.optimizer) + " (1/8)"), std::string::npos) << line;
  EXPECT_NE(line.find("activation checkpointing on"), std::string::npos) << line;  // ZeRO-3 recomputes every layer
  // ZeRO-1 on the same ranks: whole weights and gradients.
  train.zero = 1;
  const std::string zero1 = DescribeTrainingMemory(*model, train, 8, "cuda:0");
  std::cout << zero1 << "\n";
  EXPECT_NE(zero1.find("params " + FormatBytes(params * 4) + ", grads"), std::string::npos) << zero1;
}

TEST(MemoryModel, FormatsAndDescribes) {
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(3 << 20), "3.0 MiB");
  EXPECT_EQ(FormatBytes(-1), "unknown");
  const MemoryModelInput in = Tiny();
  const std::string line = DescribeMemoryModel(in, EstimateMemory(in));
  EXPECT_NE(line.find("params 3.9 KiB"), std::string::npos) << line;
  EXPECT_NE(line.find("attention naive"), std::string::npos) << line;
  EXPECT_NE(DescribeMeasuredPeak(c10::Device("cpu")).find("host resident"), std::string::npos);
  contract::TrainConfig t;
  t.attention = "chunked";
  t.loss_chunk_tokens = 128;
  ForwardOptions fo;
  ApplyMemoryOptions(t, fo);
  EXPECT_EQ(fo.attention, AttentionKind::kChunked);
  EXPECT_TRUE(fo.return_hidden);
  EXPECT_EQ(ResolvedAttention("naive", 1 << 16), "naive");
}

// Loss and the gradients of every parameter for one forward configuration (float32, CPU).
struct LossRun {
  double loss = 0;
  std::vector<at::Tensor> grads;
};
LossRun LossAndGrads(LlamaModel& m, const at::Tensor& tokens, const at::Tensor& targets, ForwardOptions fo,
                 int64_t loss_chunk, uint64_t seed) {
  at::manual_seed(seed);  // SparseMixer samples: the same draws for every configuration
  std::vector<at::Tensor> ps;
  for (auto& [n, p] : m.params()) ps.push_back(p.requires_grad_(true));
  fo.return_hidden = loss_chunk > 0;
  ForwardOutput out = m.Forward(tokens, fo);
  at::Tensor ce;
  if (loss_chunk > 0) {
    ce = kernels::chunked_cross_entropy(out.hidden.reshape({-1, out.hidden.size(-1)}), m.lm_head(), targets.reshape({-1}),
                                        loss_chunk).loss;
  } else {
    ce = at::nll_loss(at::log_softmax(out.logits.reshape({-1, out.logits.size(-1)}), -1), targets.reshape({-1}));
  }
  const at::Tensor loss = ce + out.aux_loss;
  LossRun r;
  r.loss = loss.item<double>();
  r.grads = torch::autograd::grad({loss}, ps, {}, false, false, /*allow_unused=*/true);
  for (auto& p : ps) p.requires_grad_(false);
  return r;
}

void ExpectSame(const LossRun& a, const LossRun& b, double rtol) {
  EXPECT_NEAR(a.loss, b.loss, rtol * std::abs(b.loss));
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    ASSERT_EQ(a.grads[i].defined(), b.grads[i].defined()) << "parameter " << i;
    if (!a.grads[i].defined()) continue;
    const double scale = b.grads[i].abs().max().item<double>() + 1e-12;
    EXPECT_LE((a.grads[i] - b.grads[i]).abs().max().item<double>(), rtol * scale) << "parameter " << i;
  }
}

// Every memory option computes the same model: chunked attention, per-layer checkpointing and the chunked loss
// against today's path (naive attention, full logits), dense and MoE (SparseMixer: random routing in training,
// which the checkpointed re-run must reproduce).
TEST(MemoryOptions, SameLossAndGradientsAsThePlainPath) {
  for (const char* kind : {"dense", "moe", "sparsemixer"}) {
    SCOPED_TRACE(kind);
    ModelConfig cfg = testing::TinyConfig(std::string(kind) == "dense" ? 0 : 4);
    if (std::string(kind) == "sparsemixer") cfg.router = "sparsemixer";
    auto m = LlamaModel::Init(cfg, 11);
    ASSERT_TRUE(m.ok()) << m.status().message();
    at::manual_seed(3);
    const at::Tensor batch = at::randint(cfg.vocab_size, {2, 38}, at::kLong);
    const at::Tensor tokens = batch.narrow(1, 0, 37), targets = batch.narrow(1, 1, 37).clone();
    targets.narrow(1, 0, 5).fill_(kernels::kIgnoreIndex);  // a masked prompt
    ForwardOptions plain;
    plain.training = true;
    plain.attention = AttentionKind::kNaive;
    const LossRun base = LossAndGrads(*m, tokens, targets, plain, 0, 5);
    ForwardOptions chunked = plain;
    chunked.attention = AttentionKind::kChunked;
    ExpectSame(LossAndGrads(*m, tokens, targets, chunked, 0, 5), base, 2e-5);
    ForwardOptions ckpt = plain;
    ckpt.activation_checkpointing = true;
    ExpectSame(LossAndGrads(*m, tokens, targets, ckpt, 0, 5), base, 1e-6);
    ExpectSame(LossAndGrads(*m, tokens, targets, plain, 16, 5), base, 2e-5);
    ckpt.attention = AttentionKind::kChunked;
    ExpectSame(LossAndGrads(*m, tokens, targets, ckpt, 7, 5), base, 2e-5);
  }
}

TEST(MemoryOptions, CheckpointingKeepsRoutingCountsAndInferenceUnchanged) {
  auto m = LlamaModel::Init(testing::TinyConfig(4), 12);
  ASSERT_TRUE(m.ok());
  const at::Tensor tokens = at::randint(259, {1, 20}, at::kLong);
  ForwardOptions a, b;
  b.activation_checkpointing = true;
  for (auto& [n, p] : m->params()) p.requires_grad_(true);
  const ForwardOutput x = m->Forward(tokens, a), y = m->Forward(tokens, b);
  for (auto& [n, p] : m->params()) p.requires_grad_(false);
  ASSERT_EQ(x.expert_counts.size(), y.expert_counts.size());
  for (size_t l = 0; l < x.expert_counts.size(); ++l) EXPECT_TRUE(x.expert_counts[l].equal(y.expert_counts[l]));
  EXPECT_TRUE(at::allclose(x.logits, y.logits, 1e-6, 1e-6));
}

}  // namespace
}  // namespace btx::model
