// Element access helpers shared by the .cu files: storage type T, arithmetic in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "btx/kernels/cuda/moe_cuda.h"

namespace btx::kernels::cuda::detail {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

inline size_t element_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

// Calls fn with a typed null pointer selecting the storage type.
template <typename Fn>
cudaError_t with_type(DType d, Fn&& fn) {
  if (d == DType::kFloat32) return fn(static_cast<float*>(nullptr));
  return fn(static_cast<__nv_bfloat16*>(nullptr));
}

}  // namespace btx::kernels::cuda::detail
