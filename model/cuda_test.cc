// The model and trainer on a GPU: float32 and bf16-autocast forward against the CPU, MoE through the CUDA
// kernels, training that learns, checkpoint and resume on the device. Skips itself without a GPU.
#include "btx/kernels/autocast.h"
#include <torch/cuda.h>

#include <atomic>
#include <nlohmann/json.hpp>

#include "btx/model/llama.h"
#include "btx/model/tokenizer.h"
#include "btx/model/trainer.h"
#include "test_util.h"

namespace btx::model {
namespace {
using testing::TempDir;

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }
};

double RelErr(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.detach().cpu().to(at::kDouble), bd = b.detach().cpu().to(at::kDouble);
  return (ad - bd).norm().item<double>() / bd.norm().item<double>();
}

TEST_F(Cuda, ForwardMatchesCpuInFloat32AndAutocast) {
  for (int64_t experts : {0, 4}) {
    SCOPED_TRACE("experts=" + std::to_string(experts));
    auto cpu = LlamaModel::Init(testing::TinyConfig(experts), 5);
    auto gpu = LlamaModel::Init(testing::TinyConfig(experts), 5);
    ASSERT_TRUE(cpu.ok() && gpu.ok());
    gpu->To(at::Device(at::kCUDA, 0));
    const at::Tensor tokens = at::randint(0, 259, {2, 24}, at::kLong);
    at::NoGradGuard ng;
    const ForwardOutput want = cpu->Forward(tokens);
    const ForwardOutput got = gpu->Forward(tokens.cuda());
    ASSERT_TRUE(got.logits.is_cuda());
    EXPECT_LT(RelErr(got.logits, want.logits), 1e-4);
    if (experts) {
      for (size_t l = 0; l < want.expert_counts.size(); ++l)
        EXPECT_TRUE(at::equal(got.expert_counts[l], want.expert_counts[l])) << "layer " << l;
    }
    ForwardOutput amp;
    {
      kernels::CudaAutocastScope scope(true);
      amp = gpu->Forward(tokens.cuda());
    }
    EXPECT_EQ(amp.logits.scalar_type(), at::kBFloat16);
    EXPECT_LT(RelErr(amp.logits, want.logits), 3e-2);
  }
}

std::vector<DomainData> Domains(int n) {
  auto tok = MakeByteTokenizer();
  std::vector<DomainData> data;
  for (int d = 0; d < n; ++d) {
    auto ids = std::make_shared<std::vector<int32_t>>(tok->Encode(testing::SampleText(60, d * 5)));
    data.push_back({"d" + std::to_string(d), 1.0, ids, ids});
  }
  return data;
}

// The bf16-autocast step on the GPU follows the float32 CPU step closely, learns, and checkpoints taken on
// the device resume on the device.
TEST_F(Cuda, MoeTrainerLearnsAndResumesOnGpu) {
  for (const std::string router : {"softmax_topk", "sparsemixer"}) {
    SCOPED_TRACE(router);
    ModelConfig cfg = testing::TinyConfig(4);
    cfg.router = router;
    TrainConfig tc;
    tc.batch_tokens = 256;
    tc.seq_len = 32;
    tc.lr = 1e-2;
    tc.warmup = 2;
    tc.checkpoint_every = 10;
    tc.log_every = 1;
    tc.valid_tokens = 512;
    TempDir dir;
    TrainOptions o;
    o.steps = 30;
    o.device = "cuda";
    o.checkpoint_dir = dir / "ckpt";

    std::vector<double> gpu_losses, cpu_losses;
    auto collect = [](std::vector<double>* out) {
      TrainHooks h;
      h.emit = [out](const nlohmann::json& ev) {
        if (ev["event"] == "progress") out->push_back(ev["loss"].get<double>());
      };
      return h;
    };
    auto gpu = LlamaModel::Init(cfg, 31);
    Trainer tg(&*gpu, tc, o, Domains(2), collect(&gpu_losses));
    ASSERT_TRUE(tg.Init().ok());
    const double before = tg.Validate().at("d0");
    auto r = tg.Run();
    ASSERT_TRUE(r.ok()) << r.status().message();
    ASSERT_EQ(gpu_losses.size(), 30u);
    const double after = tg.Validate().at("d0");
    EXPECT_TRUE(std::isfinite(after));
    EXPECT_LT(after, before - 1.0) << "valid loss " << before << " -> " << after;
    EXPECT_TRUE(gpu->params().front().second.is_cuda());

    if (router == "softmax_topk") {  // SparseMixer samples: its first losses differ by design
      TrainOptions oc = o;
      oc.device = "cpu";
      oc.steps = 1;
      oc.checkpoint_dir.clear();
      auto cpu = LlamaModel::Init(cfg, 31);
      Trainer tcpu(&*cpu, tc, oc, Domains(2), collect(&cpu_losses));
      ASSERT_TRUE(tcpu.Init().ok());
      ASSERT_TRUE(tcpu.Run().ok());
      ASSERT_EQ(cpu_losses.size(), 1u);
      EXPECT_NEAR(gpu_losses[0], cpu_losses[0], 2e-2 * cpu_losses[0]);
    }

    auto resumed = LlamaModel::Init(cfg, 999);
    o.steps = 40;
    Trainer tr(&*resumed, tc, o, Domains(2), {});
    ASSERT_TRUE(tr.Init().ok());
    ASSERT_TRUE(tr.ResumeFromLatest().ok());
    EXPECT_EQ(tr.step(), 30);
    for (const auto& [name, t] : resumed->params()) {
      ASSERT_TRUE(t.is_cuda()) << name;
      EXPECT_TRUE(at::equal(t, gpu->param(name))) << name;
    }
    ASSERT_TRUE(tr.Run().ok());
    EXPECT_EQ(tr.step(), 40);
  }
}

}  // namespace
}  // namespace btx::model
