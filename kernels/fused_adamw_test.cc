// FusedAdamW against a float64 loop reference over several steps, against the ATen op sequence it
// replaces (to about an ulp), thread-count independence, and input checks.
#include "btx/kernels/fused_adamw.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class FusedAdamWTest : public testing::SeededTest {};

// Tolerances. Each element's error is measured against its own magnitude scale: the sum of the absolute
// values of the terms that made it (so that cancellation, e.g. m = 0.9 m + 0.1 g passing near zero, is judged
// against the size of its terms, as any float32 evaluation must be). In units of float32's epsilon 2^-23:
constexpr double kEps32 = 1.1920928955078125e-07;
// Against float64 loops after kSteps steps (errors compound over steps): |x - ref| <= kRefUlps * eps32 * scale.
constexpr int kSteps = 5;
constexpr double kRefUlps = 8;  // = 9.5e-7 relative to the scale
// Against the ATen sequence from the same float32 inputs, one step at a time: |x - aten| <= kAtenUlps * eps32 *
// scale (the same operations in the same order; ATen's vectorised add_ may use an FMA, and a 1-ulp difference
// in m carries into w). Measured: m, v <= 1.0, w <= 2.2.
constexpr double kAtenUlps = 4;

// Largest |a - b| / (eps32 * scale) (in float64): the error in float32 ulps of the element's scale.
double worst_ulps(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale) {
  const at::Tensor err = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  const at::Tensor ulps = err / (scale.to(at::kDouble) * kEps32).clamp_min(1e-300);
  TORCH_CHECK(!ulps.isnan().any().item<bool>(), "NaN in the comparison");
  return ulps.max().item<double>();
}

struct Reference {
  at::Tensor w, m, v;       // float64 state
  at::Tensor w_mag, m_mag;  // float64 magnitude scales: the same recurrences on absolute values
};

// The trainer's step in plain float64 loops.
void reference_step(Reference& s, const at::Tensor& g32, const AdamWParams& p) {
  const at::Tensor gd = g32.to(at::kDouble);
  double* w = s.w.data_ptr<double>();
  double* m = s.m.data_ptr<double>();
  double* v = s.v.data_ptr<double>();
  double* wm = s.w_mag.data_ptr<double>();
  double* mm = s.m_mag.data_ptr<double>();
  const double* g = gd.data_ptr<double>();
  for (int64_t i = 0; i < s.w.numel(); ++i) {
    w[i] *= 1.0 - p.lr * p.weight_decay;
    m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * g[i];
    v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * g[i] * g[i];
    const double denom = std::sqrt(v[i]) / std::sqrt(p.bc2) + p.eps;
    w[i] -= p.lr / p.bc1 * m[i] / denom;
    mm[i] = p.beta1 * mm[i] + (1.0 - p.beta1) * std::abs(g[i]);
    wm[i] = wm[i] * (1.0 - p.lr * p.weight_decay) + p.lr / p.bc1 * mm[i] / denom;
  }
}

AdamWParams params_at(int64_t step, double lr, double weight_decay) {
  AdamWParams p;
  p.lr = lr;
  p.beta1 = 0.9;
  p.beta2 = 0.95;
  p.eps = 1e-8;
  p.weight_decay = weight_decay;
  p.bc1 = 1.0 - std::pow(p.beta1, static_cast<double>(step));
  p.bc2 = 1.0 - std::pow(p.beta2, static_cast<double>(step));
  return p;
}

TEST_F(FusedAdamWTest, MatchesFloat64LoopsOverSeveralSteps) {
  double worst[3] = {0, 0, 0};
  for (int64_t n : {1, 7, 1000003}) {
    for (double wd : {0.0, 0.1}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " weight_decay " << wd);
      at::Tensor w = at::randn({n}), m = at::zeros({n}), v = at::zeros({n});
      Reference ref{w.to(at::kDouble), m.to(at::kDouble), v.to(at::kDouble), w.to(at::kDouble).abs(),
                    m.to(at::kDouble)};
      for (int64_t t = 1; t <= kSteps; ++t) {
        // Fresh gradients each step, with a spread of magnitudes (some near zero, some large).
        const at::Tensor g = at::randn({n}) * at::exp(at::randn({n}) * 2.0);
        const AdamWParams p = params_at(t, 1e-2, wd);
        FusedAdamW(w, g, m, v, p);
        reference_step(ref, g, p);
      }
      const double um = worst_ulps(m, ref.m, ref.m_mag), uv = worst_ulps(v, ref.v, ref.v),
                   uw = worst_ulps(w, ref.w, ref.w_mag);
      EXPECT_LE(um, kRefUlps) << "m";
      EXPECT_LE(uv, kRefUlps) << "v";
      EXPECT_LE(uw, kRefUlps) << "w";
      worst[0] = std::max(worst[0], um), worst[1] = std::max(worst[1], uv), worst[2] = std::max(worst[2], uw);
    }
  }
  std::printf("[ measured ] worst error vs float64 after %d steps (eps32 units of the scale): m %.2f v %.2f w %.2f\n",
              kSteps, worst[0], worst[1], worst[2]);
}

TEST_F(FusedAdamWTest, AgreesWithTheAtenSequenceToAnUlp) {
  double worst[3] = {0, 0, 0};
  for (int64_t n : {1, 7, 1000003}) {
    for (double wd : {0.0, 0.1}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " weight_decay " << wd);
      at::Tensor w = at::randn({n}), m = at::randn({n}) * 0.1, v = at::rand({n}) * 0.01;
      for (int64_t t = 1; t <= kSteps; ++t) {
        const at::Tensor g = at::randn({n}) * at::exp(at::randn({n}));
        const AdamWParams p = params_at(t, 3e-4, wd);
        // Scales of the terms, from the step's inputs (float64).
        const at::Tensor gd = g.to(at::kDouble), md = m.to(at::kDouble), vd = v.to(at::kDouble);
        const at::Tensor m_scale = p.beta1 * md.abs() + (1 - p.beta1) * gd.abs();
        const at::Tensor v_scale = p.beta2 * vd + (1 - p.beta2) * gd * gd;
        at::Tensor w2 = w.clone(), m2 = m.clone(), v2 = v.clone();
        const at::Tensor w_in = w.to(at::kDouble);
        FusedAdamW(w, g, m, v, p);
        AdamWAtenSequence(w2, g, m2, v2, p);
        const at::Tensor denom = v2.to(at::kDouble).sqrt() / std::sqrt(p.bc2) + p.eps;
        const at::Tensor w_scale =
            w_in.abs() * (1 - p.lr * p.weight_decay) + p.lr / p.bc1 * m_scale / denom;
        const double um = worst_ulps(m, m2, m_scale), uv = worst_ulps(v, v2, v_scale),
                     uw = worst_ulps(w, w2, w_scale);
        EXPECT_LE(um, kAtenUlps) << "m, step " << t;
        EXPECT_LE(uv, kAtenUlps) << "v, step " << t;
        EXPECT_LE(uw, kAtenUlps) << "w, step " << t;
        worst[0] = std::max(worst[0], um), worst[1] = std::max(worst[1], uv), worst[2] = std::max(worst[2], uw);
        // Continue from the ATen state so that each step compares the same inputs.
        w.copy_(w2);
        m.copy_(m2);
        v.copy_(v2);
      }
    }
  }
  std::printf("[ measured ] worst difference vs the ATen sequence per step (eps32 units of the scale): m %.2f v %.2f "
              "w %.2f\n", worst[0], worst[1], worst[2]);
}

TEST_F(FusedAdamWTest, IndependentOfThreadCountAndWritesInPlace) {
  const int64_t n = 300001;
  const at::Tensor w0 = at::randn({n}), m0 = at::randn({n}), v0 = at::rand({n}), g = at::randn({n});
  const AdamWParams p = params_at(3, 1e-3, 0.05);
  std::vector<at::Tensor> results;
  for (int threads : {1, 2, 3}) {
    at::set_num_threads(threads);
    at::Tensor w = w0.clone(), m = m0.clone(), v = v0.clone();
    const void* wp = w.data_ptr();
    FusedAdamW(w, g, m, v, p);
    EXPECT_EQ(w.data_ptr(), wp);
    results.push_back(at::cat({w, m, v}));
  }
  at::set_num_threads(2);
  EXPECT_TRUE(testing::bitwise_equal(results[0], results[1]));
  EXPECT_TRUE(testing::bitwise_equal(results[0], results[2]));
  EXPECT_FALSE(testing::bitwise_equal(results[0].narrow(0, 0, n), w0));  // it did update w
}

TEST_F(FusedAdamWTest, UpdatesViewsOfALargerBuffer) {
  // The trainer passes contiguous narrow()s of flat parameters and states: only the window changes.
  const at::Tensor flat = at::randn({100}), state_m = at::zeros({100}), state_v = at::zeros({100});
  const at::Tensor before = flat.clone();
  const at::Tensor g = at::randn({30});
  FusedAdamW(flat.narrow(0, 40, 30), g, state_m.narrow(0, 40, 30), state_v.narrow(0, 40, 30), params_at(1, 1e-2, 0.0));
  EXPECT_TRUE(testing::bitwise_equal(flat.narrow(0, 0, 40), before.narrow(0, 0, 40)));
  EXPECT_TRUE(testing::bitwise_equal(flat.narrow(0, 70, 30), before.narrow(0, 70, 30)));
  EXPECT_FALSE(testing::bitwise_equal(flat.narrow(0, 40, 30), before.narrow(0, 40, 30)));
  EXPECT_EQ(state_v.narrow(0, 0, 40).count_nonzero().item<int64_t>(), 0);
  // Zero-length segments are a no-op.
  const at::Tensor e = at::empty({0});
  FusedAdamW(e, e, e, e, params_at(1, 1e-2, 0.1));
}

TEST_F(FusedAdamWTest, RefusesOtherLayoutsAndDtypes) {
  const AdamWParams p = params_at(1, 1e-3, 0.0);
  const at::Tensor a = at::zeros({8}), b = at::zeros({8}), c = at::zeros({8}), d = at::zeros({8});
  const at::Tensor strided = at::zeros({16}).slice(0, 0, 16, 2);
  const auto message_of = [&](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "";
  };
  EXPECT_NE(message_of([&] { FusedAdamW(strided, b, c, d, p); }).find("w must be contiguous"), std::string::npos);
  EXPECT_NE(message_of([&] { FusedAdamW(a, strided, c, d, p); }).find("g must be contiguous"), std::string::npos);
  EXPECT_NE(message_of([&] { FusedAdamW(a, b, c, at::zeros({8}, at::kDouble), p); }).find("v must be float32"),
            std::string::npos);
  EXPECT_NE(message_of([&] { FusedAdamW(a, at::zeros({8}, at::kBFloat16), c, d, p); }).find("g must be float32"),
            std::string::npos);
  EXPECT_NE(message_of([&] { FusedAdamW(a, b, at::zeros({7}), d, p); }).find("m has 7 elements"), std::string::npos);
  EXPECT_NE(message_of([&] { FusedAdamW(at::zeros({2, 4}), b, c, d, p); }).find("must be 1-D"), std::string::npos);
  EXPECT_FALSE(FusedAdamWAccepts(strided, b, c, d));
  EXPECT_FALSE(FusedAdamWAccepts(a.to(at::kDouble), b, c, d));
  EXPECT_TRUE(FusedAdamWAccepts(a, b, c, d));
  // Nothing was written by a refused call.
  EXPECT_EQ(a.count_nonzero().item<int64_t>(), 0);
}

// The LibTorch CUDA path (the raw kernel, or the ATen sequence in a build without it) against the CPU
// operator. Skips without a CUDA LibTorch and a GPU.
TEST_F(FusedAdamWTest, CudaTensorsMatchTheCpuPath) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device / CUDA LibTorch";
  for (int64_t n : {1, 7, 1000003}) {
    for (double wd : {0.0, 0.1}) {
      SCOPED_TRACE(::testing::Message() << "n " << n << " weight_decay " << wd);
      at::Tensor w = at::randn({n}), m = at::zeros({n}), v = at::zeros({n});
      at::Tensor wc = w.cuda(), mc = m.cuda(), vc = v.cuda();
      for (int64_t t = 1; t <= kSteps; ++t) {
        const at::Tensor g = at::randn({n});
        const AdamWParams p = params_at(t, 1e-2, wd);
        FusedAdamW(w, g, m, v, p);
        FusedAdamW(wc, g.cuda(), mc, vc, p);
      }
      // Both float32 against each other, relative to the element's scale (|w| + the summed |updates| ~ |w|
      // here, |m| + the g terms): twice the float64 tolerance (nvcc contracts to FMAs).
      const double tol = 2 * kRefUlps * kEps32;
      EXPECT_TRUE(all_close(mc.cpu(), m, tol, tol)) << "m";
      EXPECT_TRUE(all_close(vc.cpu(), v, 1e-12, tol)) << "v";
      EXPECT_TRUE(all_close(wc.cpu(), w, tol, tol)) << "w";
    }
  }
}

}  // namespace
}  // namespace btx::kernels
