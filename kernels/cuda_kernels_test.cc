// Raw CUDA kernels against plain CPU loops (float32). Needs a GPU; skips itself when none is visible.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "btx/kernels/cuda/moe_cuda.h"

namespace btx::kernels::cuda {
namespace {

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(1, n) * sizeof(T)), cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> host() const {
    std::vector<T> out(n);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
};

class CudaKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) GTEST_SKIP() << "no CUDA device";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    trace_ = std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed=" + std::to_string(seed_));
    ASSERT_EQ(cublasCreate(&blas_), CUBLAS_STATUS_SUCCESS);
  }
  void TearDown() override {
    if (blas_) cublasDestroy(blas_);
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
  cublasHandle_t blas_ = nullptr;
};

void expect_near_all(const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], atol + rtol * std::abs(want[i])) << "index " << i;
  }
}

TEST_F(CudaKernels, SoftmaxTopKMatchesLoops) {
  const int64_t tokens = 300, experts = 40, k = 3;
  const std::vector<float> logits = randn(tokens * experts, 2.f);
  DeviceBuffer<float> d_logits(logits), d_probs(tokens * experts), d_gates(tokens * k);
  DeviceBuffer<int64_t> d_index(tokens * k);
  ASSERT_EQ(softmax_topk(d_logits.ptr, DType::kFloat32, tokens, experts, k, d_probs.ptr, d_index.ptr, d_gates.ptr,
                         nullptr),
            cudaSuccess);
  const auto probs = d_probs.host();
  const auto index = d_index.host();
  const auto gates = d_gates.host();
  for (int64_t t = 0; t < tokens; ++t) {
    double m = -INFINITY, z = 0;
    for (int64_t e = 0; e < experts; ++e) m = std::max<double>(m, logits[t * experts + e]);
    std::vector<double> p(experts);
    for (int64_t e = 0; e < experts; ++e) z += p[e] = std::exp(logits[t * experts + e] - m);
    std::vector<int64_t> order(experts);
    for (int64_t e = 0; e < experts; ++e) order[e] = e, p[e] /= z;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double kept = 0;
    for (int64_t s = 0; s < k; ++s) kept += p[order[s]];
    for (int64_t s = 0; s < k; ++s) {
      EXPECT_EQ(index[t * k + s], order[s]);
      EXPECT_NEAR(gates[t * k + s], p[order[s]] / kept, 1e-5);
    }
    for (int64_t e = 0; e < experts; ++e) EXPECT_NEAR(probs[t * experts + e], p[e], 1e-6);
  }
}

TEST_F(CudaKernels, DispatchIsAStableCountingSortWithCapacity) {
  for (int64_t capacity : {-1, 0, 7, 400}) {
    const int64_t assignments = 5000, experts = 13;
    std::vector<int64_t> index(assignments);
    std::discrete_distribution<int64_t> skew({5, 1, 1, 0, 3, 1, 1, 1, 2, 1, 1, 1, 4});
    for (auto& e : index) e = skew(rng_);
    DeviceBuffer<int64_t> d_index(index), d_offsets(experts + 1), d_sorted(assignments), d_row(assignments);
    DeviceBuffer<char> work(dispatch_workspace_bytes(assignments, experts));
    ASSERT_EQ(build_dispatch(d_index.ptr, assignments, experts, capacity, work.ptr, d_offsets.ptr, d_sorted.ptr,
                             d_row.ptr, nullptr),
              cudaSuccess);
    const auto offsets = d_offsets.host(), sorted = d_sorted.host(), row = d_row.host();
    std::vector<int64_t> expected_sorted, expected_row(assignments, -1), expected_offsets{0};
    for (int64_t e = 0; e < experts; ++e) {
      int64_t taken = 0;
      for (int64_t a = 0; a < assignments; ++a) {
        if (index[a] != e || (capacity >= 0 && taken >= capacity)) continue;
        ++taken;
        expected_row[a] = static_cast<int64_t>(expected_sorted.size());
        expected_sorted.push_back(a);
      }
      expected_offsets.push_back(static_cast<int64_t>(expected_sorted.size()));
    }
    EXPECT_EQ(offsets, expected_offsets);
    EXPECT_EQ(std::vector<int64_t>(sorted.begin(), sorted.begin() + expected_sorted.size()), expected_sorted);
    EXPECT_EQ(row, expected_row);
  }
}

// Full forward of the SwiGLU MoE layer from the raw pieces, against a float64 loop.
TEST_F(CudaKernels, ForwardPipelineAndBackwardPiecesMatchLoops) {
  const int64_t tokens = 97, dim = 24, hidden = 40, experts = 5, k = 2;
  const std::vector<float> x = randn(tokens * dim), w1 = randn(experts * hidden * dim, 0.2f),
                           w3 = randn(experts * hidden * dim, 0.2f), w2 = randn(experts * dim * hidden, 0.15f);
  std::vector<int64_t> index(tokens * k);
  std::vector<float> gates(tokens * k);
  std::uniform_int_distribution<int64_t> pick(0, experts - 2);  // the last expert stays empty
  for (int64_t t = 0; t < tokens; ++t) {
    index[t * k] = pick(rng_);
    index[t * k + 1] = (index[t * k] + 1) % (experts - 1);
    gates[t * k] = 0.7f;
    gates[t * k + 1] = 0.3f;
  }
  const int64_t assignments = tokens * k;
  DeviceBuffer<int64_t> d_index(index), d_offsets(experts + 1), d_sorted(assignments), d_row(assignments);
  DeviceBuffer<char> work(dispatch_workspace_bytes(assignments, experts));
  ASSERT_EQ(build_dispatch(d_index.ptr, assignments, experts, -1, work.ptr, d_offsets.ptr, d_sorted.ptr, d_row.ptr,
                           nullptr),
            cudaSuccess);
  const auto offsets = d_offsets.host();
  const int64_t rows = offsets[experts];
  ASSERT_EQ(rows, assignments);
  DeviceBuffer<float> d_x(x), d_w1(w1), d_w3(w3), d_w2(w2), d_gates(gates), xs(rows * dim), h1(rows * hidden),
      h3(rows * hidden), act(rows * hidden), ys(rows * dim), y(tokens * dim);
  ASSERT_EQ(gather_rows(d_x.ptr, DType::kFloat32, dim, d_sorted.ptr, rows, k, xs.ptr, nullptr), cudaSuccess);
  ASSERT_EQ(grouped_gemm(blas_, GroupedOp::kRowsTimesWeightT, DType::kFloat32, offsets.data(), experts, hidden, dim,
                         xs.ptr, d_w1.ptr, h1.ptr, 0.f, nullptr),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(grouped_gemm(blas_, GroupedOp::kRowsTimesWeightT, DType::kFloat32, offsets.data(), experts, hidden, dim,
                         xs.ptr, d_w3.ptr, h3.ptr, 0.f, nullptr),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(swiglu_forward(h1.ptr, h3.ptr, DType::kFloat32, rows * hidden, act.ptr, nullptr), cudaSuccess);
  ASSERT_EQ(grouped_gemm(blas_, GroupedOp::kRowsTimesWeightT, DType::kFloat32, offsets.data(), experts, dim, hidden,
                         act.ptr, d_w2.ptr, ys.ptr, 0.f, nullptr),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(combine_rows(ys.ptr, DType::kFloat32, dim, d_row.ptr, d_gates.ptr, tokens, k, y.ptr, nullptr),
            cudaSuccess);

  // Loop reference, also producing the per-assignment activations for the backward checks.
  std::vector<double> y_ref(tokens * dim, 0.0);
  std::vector<std::vector<double>> h1_ref(assignments, std::vector<double>(hidden)),
      h3_ref(assignments, std::vector<double>(hidden));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = index[t * k + s], a = t * k + s;
      std::vector<double> av(hidden);
      for (int64_t f = 0; f < hidden; ++f) {
        double p = 0, q = 0;
        for (int64_t d = 0; d < dim; ++d) {
          p += double(w1[(e * hidden + f) * dim + d]) * x[t * dim + d];
          q += double(w3[(e * hidden + f) * dim + d]) * x[t * dim + d];
        }
        h1_ref[a][f] = p;
        h3_ref[a][f] = q;
        av[f] = p / (1 + std::exp(-p)) * q;
      }
      for (int64_t d = 0; d < dim; ++d) {
        double o = 0;
        for (int64_t f = 0; f < hidden; ++f) o += double(w2[(e * dim + d) * hidden + f]) * av[f];
        y_ref[t * dim + d] += gates[a] * o;
      }
    }
  }
  expect_near_all(y.host(), y_ref, 1e-4, 1e-3);

  // Backward pieces: upstream gin = ones, check dgate and dh1 / dh3 against the closed forms.
  const auto sorted = d_sorted.host();
  DeviceBuffer<float> gin(std::vector<float>(rows * hidden, 1.f)), dh1(rows * hidden), dh3(rows * hidden),
      ag(rows * hidden);
  DeviceBuffer<float> dgate(rows);
  ASSERT_EQ(swiglu_backward(h1.ptr, h3.ptr, gin.ptr, d_gates.ptr, d_sorted.ptr, rows, hidden, DType::kFloat32,
                            dh1.ptr, dh3.ptr, ag.ptr, dgate.ptr, nullptr),
            cudaSuccess);
  const auto g_dh1 = dh1.host(), g_dh3 = dh3.host(), g_dgate = dgate.host();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = sorted[r];
    double dot = 0;
    for (int64_t f = 0; f < hidden; ++f) {
      const double p = h1_ref[a][f], q = h3_ref[a][f], sg = 1 / (1 + std::exp(-p));
      dot += p * sg * q;
      ASSERT_NEAR(g_dh3[r * hidden + f], gates[a] * p * sg, 1e-4);
      ASSERT_NEAR(g_dh1[r * hidden + f], gates[a] * q * sg * (1 + p * (1 - sg)), 1e-4);
    }
    ASSERT_NEAR(g_dgate[r], dot, 1e-3 + 1e-4 * std::abs(dot));
  }

  // Weight gradient of W1 with gin = xs rows: dW1[e] = sum over e's rows of dh1^T xs.
  DeviceBuffer<float> dw1(experts * hidden * dim);
  ASSERT_EQ(grouped_gemm(blas_, GroupedOp::kWeightGrad, DType::kFloat32, offsets.data(), experts, hidden, dim,
                         dh1.ptr, xs.ptr, dw1.ptr, 0.f, nullptr),
            CUBLAS_STATUS_SUCCESS);
  std::vector<double> dw1_ref(experts * hidden * dim, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = sorted[r], t = a / k, e = index[a];
    for (int64_t f = 0; f < hidden; ++f) {
      for (int64_t d = 0; d < dim; ++d) dw1_ref[(e * hidden + f) * dim + d] += double(g_dh1[r * hidden + f]) * x[t * dim + d];
    }
  }
  expect_near_all(dw1.host(), dw1_ref, 1e-4, 1e-3);

  // Input gradient pattern: dxs = dh1 W1 (kRowsTimesWeight), combined per token without gates.
  DeviceBuffer<float> dxs(rows * dim), dx(tokens * dim);
  ASSERT_EQ(grouped_gemm(blas_, GroupedOp::kRowsTimesWeight, DType::kFloat32, offsets.data(), experts, dim, hidden,
                         dh1.ptr, d_w1.ptr, dxs.ptr, 0.f, nullptr),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(combine_rows(dxs.ptr, DType::kFloat32, dim, d_row.ptr, nullptr, tokens, k, dx.ptr, nullptr), cudaSuccess);
  const auto row_of = d_row.host();
  std::vector<double> dx_ref(tokens * dim, 0.0);
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t r = row_of[a], t = a / k, e = index[a];
    for (int64_t d = 0; d < dim; ++d) {
      double v = 0;
      for (int64_t f = 0; f < hidden; ++f) v += double(g_dh1[r * hidden + f]) * w1[(e * hidden + f) * dim + d];
      dx_ref[t * dim + d] += v;
    }
  }
  expect_near_all(dx.host(), dx_ref, 1e-4, 1e-3);
}

}  // namespace
}  // namespace btx::kernels::cuda
