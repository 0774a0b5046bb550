// One AdamW step over a flat float32 parameter segment in a single pass over memory (read w, g, m, v;
// write w, m, v), instead of the ~6 ATen ops (and their temporaries) of the plain sequence.
//   w *= 1 - lr * weight_decay                       (decoupled decay, before the update; skipped at 0)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   w += (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// with the bias corrections bc1 = 1 - beta1^t, bc2 = 1 - beta2^t passed in. Arithmetic is float32 in the
// same operation order as the ATen sequence (scalars rounded to float32 the way ATen rounds them), so the
// two agree to about an ulp (ATen's vectorised kernels may use FMA); it is element-wise, so the result does
// not depend on the thread count. (PyTorch >= 2.0 has at::_fused_adamw_; LibTorch 1.13 does not, and this
// operator does not depend on it.)
#pragma once

#include <ATen/core/Tensor.h>

namespace btx::kernels {

struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled; the caller passes 0 for segments it does not decay
  double bc1 = 1.0;           // 1 - beta1^t
  double bc2 = 1.0;           // 1 - beta2^t
};

// w, g, m, v: float32, contiguous, 1-D, equal length, same device; w, m, v are updated in place.
// CPU: one at::parallel_for pass. CUDA: a raw kernel when the build has one (BTX_TORCH_HAS_CUDA), else the
// ATen sequence. Other inputs are refused (c10::Error via TORCH_CHECK, like the other operators).
void FusedAdamW(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                const AdamWParams& p);

// Whether FusedAdamW accepts these tensors (callers with other layouts use AdamWAtenSequence).
bool FusedAdamWAccepts(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v);

// The plain ATen op sequence (the trainer's former loop): any dtype / layout / device ATen supports.
// The baseline of the tests and of bench/train's btx_bench_adamw.
void AdamWAtenSequence(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                       const AdamWParams& p);

}  // namespace btx::kernels
