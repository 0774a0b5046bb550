// Raw CUDA AdamW step (see btx/kernels/fused_adamw.h for the formula): plain device pointers and a stream,
// no torch types, so it builds with nvcc alone. Asynchronous on `stream`; returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace btx::kernels::cuda {

// The step's scalars, already rounded to float32 by the caller (as ATen rounds double Scalars):
//   decay = 1 - lr * weight_decay (used only when decayed), one_minus_beta* = 1 - beta*,
//   sqrt_bc2 = sqrt(1 - beta2^t), step = -lr / (1 - beta1^t).
struct AdamWCoeffs {
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step;
  bool decayed;
};

// In place over n float32 elements: w, m, v written; g read. float4 loads where all four pointers are
// 16-byte aligned, scalar otherwise; grid-stride loops.
cudaError_t fused_adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWCoeffs& c,
                        cudaStream_t stream);

}  // namespace btx::kernels::cuda
