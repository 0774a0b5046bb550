// The raw CUDA fused AdamW kernel against a float64 CPU loop (several steps, odd sizes, with and without
// weight decay, float4 and misaligned scalar paths). Needs a GPU; skips itself when none is visible.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "btx/kernels/cuda/fused_adamw_cuda.h"

namespace btx::kernels::cuda {
namespace {

class CudaFusedAdamW : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) GTEST_SKIP() << "no CUDA device";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    trace_ = std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed=" + std::to_string(seed_));
  }
  std::vector<float> randn(size_t n, float scale = 1.f) {
    std::normal_distribution<float> d(0.f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }
  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<::testing::ScopedTrace> trace_;
};

TEST_F(CudaFusedAdamW, MatchesFloat64LoopsOverSeveralSteps) {
  constexpr int kSteps = 5;
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  for (int64_t n : {1, 7, 1000003}) {
    for (double wd : {0.0, 0.1}) {
      for (int64_t offset : {0, 1}) {  // offset 1: pointers not 16-byte aligned, the scalar kernel
        SCOPED_TRACE(::testing::Message() << "n " << n << " wd " << wd << " offset " << offset);
        const size_t total = static_cast<size_t>(n + offset);
        std::vector<float> w = randn(total), m(total, 0.f), v(total, 0.f);
        std::vector<double> rw(w.begin(), w.end()), rm(total, 0.0), rv(total, 0.0);
        float *dw, *dg, *dm, *dv;
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dw), total * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dg), total * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dm), total * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dv), total * 4), cudaSuccess);
        cudaMemcpy(dw, w.data(), total * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dm, m.data(), total * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dv, v.data(), total * 4, cudaMemcpyHostToDevice);
        for (int t = 1; t <= kSteps; ++t) {
          const std::vector<float> g = randn(total);
          cudaMemcpy(dg, g.data(), total * 4, cudaMemcpyHostToDevice);
          const double bc1 = 1 - std::pow(beta1, t), bc2 = 1 - std::pow(beta2, t);
          AdamWCoeffs c;
          c.decayed = wd != 0.0;
          c.decay = static_cast<float>(1.0 - lr * wd);
          c.beta1 = static_cast<float>(beta1);
          c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
          c.beta2 = static_cast<float>(beta2);
          c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
          c.sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
          c.eps = static_cast<float>(eps);
          c.step = static_cast<float>(-lr / bc1);
          ASSERT_EQ(fused_adamw(dw + offset, dg + offset, dm + offset, dv + offset, n, c, nullptr), cudaSuccess);
          for (size_t i = offset; i < total; ++i) {
            rw[i] *= 1.0 - lr * wd;
            rm[i] = beta1 * rm[i] + (1 - beta1) * g[i];
            rv[i] = beta2 * rv[i] + (1 - beta2) * double(g[i]) * g[i];
            rw[i] -= lr / bc1 * rm[i] / (std::sqrt(rv[i]) / std::sqrt(bc2) + eps);
          }
        }
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        cudaMemcpy(w.data(), dw, total * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(m.data(), dm, total * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(v.data(), dv, total * 4, cudaMemcpyDeviceToHost);
        cudaFree(dw);
        cudaFree(dg);
        cudaFree(dm);
        cudaFree(dv);
        // Same tolerances as the CPU operator's test (kernels/fused_adamw_test.cc).
        for (size_t i = 0; i < total; ++i) {
          if (i < static_cast<size_t>(offset)) {  // outside the range: untouched
            EXPECT_EQ(m[i], 0.f);
            continue;
          }
          ASSERT_NEAR(m[i], rm[i], 1e-7 + 1e-5 * std::abs(rm[i])) << i;
          ASSERT_NEAR(v[i], rv[i], 1e-12 + 1e-5 * std::abs(rv[i])) << i;
          ASSERT_NEAR(w[i], rw[i], 1e-7 + 1e-6 * std::abs(rw[i])) << i;
        }
      }
    }
  }
}

}  // namespace
}  // namespace btx::kernels::cuda
