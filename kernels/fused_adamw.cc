#include "btx/kernels/fused_adamw.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "fused_adamw_cuda.h"  // AdamWCoeffsOf; the CUDA back end itself is built only with BTX_TORCH_HAS_CUDA

namespace btx::kernels {
namespace {

// Elements per parallel_for task: large enough to amortise the scheduling, small enough to balance.
constexpr int64_t kGrain = 1 << 15;

// Scalars rounded to float32 once, as ATen rounds a double Scalar for a float32 tensor.
struct Coeffs {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step;
  bool decayed;
};

// The inner loop, kept free of aliasing and branches so that it vectorises (this file is built with
// -fno-math-errno so the sqrt needs no scalar errno path; v >= 0 here, so results do not change).
template <bool kDecay>
void adamw_range(float* __restrict w, const float* __restrict g, float* __restrict m, float* __restrict v,
                 int64_t n, const Coeffs c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    // Same order as the ATen ops: m.mul_(b1).add_(g, 1-b1); v.mul_(b2).addcmul_(g, g, 1-b2);
    // denom = v.sqrt() / sqrt(bc2) + eps; w.addcdiv_(m, denom, step) = w + step * m / denom.
    const float mi = m[i] * c.beta1 + c.one_minus_beta1 * gi;
    const float vi = v[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
    const float denom = std::sqrt(vi) / c.sqrt_bc2 + c.eps;
    float wi = w[i];
    if constexpr (kDecay) wi = wi * c.decay;
    m[i] = mi;
    v[i] = vi;
    w[i] = wi + c.step * mi / denom;
  }
}

void check_inputs(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v) {
  const at::Tensor* all[] = {&w, &g, &m, &v};
  const char* names[] = {"w", "g", "m", "v"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *all[i];
    TORCH_CHECK(t.defined(), "FusedAdamW: ", names[i], " is undefined");
    TORCH_CHECK(t.scalar_type() == at::kFloat, "FusedAdamW: ", names[i], " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1, "FusedAdamW: ", names[i], " must be 1-D, got sizes ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "FusedAdamW: ", names[i], " must be contiguous (strides ", t.strides(), ")");
    TORCH_CHECK(t.numel() == w.numel(), "FusedAdamW: ", names[i], " has ", t.numel(), " elements, w has ",
                w.numel());
    TORCH_CHECK(t.device() == w.device(), "FusedAdamW: ", names[i], " is on ", t.device(), ", w on ", w.device());
  }
}

void fused_adamw_cpu(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                     const AdamWParams& p) {
  const Coeffs c = detail::AdamWCoeffsOf<Coeffs>(p);
  float* wp = w.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (c.decayed) {
      adamw_range<true>(wp + begin, gp + begin, mp + begin, vp + begin, end - begin, c);
    } else {
      adamw_range<false>(wp + begin, gp + begin, mp + begin, vp + begin, end - begin, c);
    }
  });
}

}  // namespace

bool FusedAdamWAccepts(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v) {
  for (const at::Tensor* t : {&w, &g, &m, &v}) {
    if (!t->defined() || t->scalar_type() != at::kFloat || t->dim() != 1 || !t->is_contiguous() ||
        t->numel() != w.numel() || t->device() != w.device())
      return false;
  }
  return true;
}

void AdamWAtenSequence(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                       const AdamWParams& p) {
  at::Tensor wt = w, mt = m, vt = v;  // shallow handles: the in-place ops below write the callers' storage
  if (p.weight_decay != 0.0) wt.mul_(1.0 - p.lr * p.weight_decay);
  mt.mul_(p.beta1).add_(g, 1.0 - p.beta1);
  vt.mul_(p.beta2).addcmul_(g, g, 1.0 - p.beta2);
  at::Tensor denom = (vt.sqrt() / std::sqrt(p.bc2)).add_(p.eps);
  wt.addcdiv_(mt, denom, -p.lr / p.bc1);
}

void FusedAdamW(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                const AdamWParams& p) {
  check_inputs(w, g, m, v);
  if (w.numel() == 0) return;
  if (w.device().is_cpu()) {
    fused_adamw_cpu(w, g, m, v, p);
    return;
  }
#ifdef BTX_TORCH_HAS_CUDA
  if (w.is_cuda()) {
    detail::fused_adamw_cuda(w, g, m, v, p);
    return;
  }
#endif
  // A device without our kernel (e.g. CUDA tensors with a build that has none): the ATen sequence.
  AdamWAtenSequence(w, g, m, v, p);
}

}  // namespace btx::kernels
