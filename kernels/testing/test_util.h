// Shared test helpers: fresh seeds (printed on failure), tolerance checks, a float64 finite-difference
// gradient checker (LibTorch's C++ API has no gradcheck).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace btx::kernels::testing {

// Fresh seed per test, seeded into ATen's default generator; tests add it to SCOPED_TRACE.
inline uint64_t fresh_seed() {
  std::random_device rd;
  const uint64_t seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  at::manual_seed(seed);
  return seed;
}

class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(2);
    seed_ = fresh_seed();
    trace_ = std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, "seed=" + std::to_string(seed_));
  }
  void TearDown() override { trace_.reset(); }
  uint64_t seed_ = 0;
  std::unique_ptr<::testing::ScopedTrace> trace_;
};

// |a - b| <= atol + rtol * |b| element-wise; reports the worst element.
inline ::testing::AssertionResult all_close(const at::Tensor& a, const at::Tensor& b, double atol, double rtol) {
  if (a.sizes() != b.sizes()) {
    std::ostringstream msg;
    msg << "shape " << a.sizes() << " vs " << b.sizes();
    return ::testing::AssertionFailure() << msg.str();
  }
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor ad = a.detach().to(at::kDouble).cpu(), bd = b.detach().to(at::kDouble).cpu();
  const at::Tensor excess = (ad - bd).abs() - (atol + rtol * bd.abs());
  const int64_t worst = excess.reshape({-1}).argmax().item<int64_t>();
  if (excess.reshape({-1})[worst].item<double>() <= 0.0 && !ad.isnan().any().item<bool>()) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "worst flat index " << worst << ": " << ad.reshape({-1})[worst].item<double>()
                                       << " vs " << bd.reshape({-1})[worst].item<double>() << " (atol " << atol
                                       << ", rtol " << rtol << ")";
}

inline ::testing::AssertionResult bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return ::testing::AssertionFailure() << "shape/dtype";
  const at::Tensor ac = a.cpu().contiguous(), bc = b.cpu().contiguous();  // memcmp needs host memory
  if (std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "tensors differ bitwise";
}

// Central differences of a scalar float64 function w.r.t. each input, against autograd's gradients.
inline void expect_gradients_match_fd(const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn,
                                      std::vector<at::Tensor> inputs, double eps = 1e-6, double atol = 1e-6,
                                      double rtol = 1e-5) {
  for (auto& in : inputs) in = in.detach().clone().to(at::kDouble).set_requires_grad(true);
  const at::Tensor out = fn(inputs);
  ASSERT_EQ(out.numel(), 1);
  std::vector<at::Tensor> analytic = torch::autograd::grad({out}, inputs, {}, /*retain_graph=*/false,
                                                           /*create_graph=*/false, /*allow_unused=*/true);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor flat = inputs[i].view({-1});
    at::Tensor numeric = at::zeros_like(flat);
    for (int64_t j = 0; j < flat.numel(); ++j) {
      const double orig = flat[j].item<double>();
      flat[j] = orig + eps;
      const double plus = fn(inputs).item<double>();
      flat[j] = orig - eps;
      const double minus = fn(inputs).item<double>();
      flat[j] = orig;
      numeric[j] = (plus - minus) / (2 * eps);
    }
    const at::Tensor got = analytic[i].defined() ? analytic[i].reshape({-1}) : at::zeros_like(numeric);
    EXPECT_TRUE(all_close(got, numeric, atol, rtol)) << "gradient of input " << i;
  }
}

}  // namespace btx::kernels::testing
