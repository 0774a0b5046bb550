// CUDA back end of FusedAdamW (compiled only when BTX_TORCH_HAS_CUDA): the raw kernel of
// btx_kernels_cuda on the tensors' device and current stream; and the scalars both paths share.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#include "btx/kernels/fused_adamw.h"

namespace btx::kernels::detail {

// The step's scalars rounded to float32 as ATen rounds double Scalars, into the CPU loop's struct or the
// raw kernel's (cuda::AdamWCoeffs): the same fields, so both paths round identically.
template <typename Coeffs>
Coeffs AdamWCoeffsOf(const AdamWParams& p) {
  Coeffs c{};
  c.decayed = p.weight_decay != 0.0;
  c.decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  c.beta1 = static_cast<float>(p.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - p.beta1);
  c.beta2 = static_cast<float>(p.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  c.sqrt_bc2 = static_cast<float>(std::sqrt(p.bc2));
  c.eps = static_cast<float>(p.eps);
  c.step = static_cast<float>(-p.lr / p.bc1);
  return c;
}

// Inputs already checked by FusedAdamW (float32, contiguous, 1-D, same length, same CUDA device).
void fused_adamw_cuda(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const AdamWParams& p);

}  // namespace btx::kernels::detail
