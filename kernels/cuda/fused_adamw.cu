// One-pass AdamW step: each element reads w, g, m, v once and writes w, m, v once.
#include <cstdint>

#include "btx/kernels/cuda/fused_adamw_cuda.h"
#include "common.cuh"

namespace btx::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Same operation order as the ATen sequence (m*b1 + (1-b1)*g; v*b2 + ((1-b2)*g)*g;
// sqrt(v)/sqrt(bc2) + eps; w + (step*m)/denom). nvcc may contract a*b+c into an FMA, as ATen's own
// CUDA kernels may: agreement with them is to about an ulp.
template <bool kDecay>
__device__ __forceinline__ void update(float& w, float g, float& m, float& v, const AdamWCoeffs& c) {
  m = m * c.beta1 + c.one_minus_beta1 * g;
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / c.sqrt_bc2 + c.eps;
  if (kDecay) w = w * c.decay;
  w = w + c.step * m / denom;
}

template <bool kDecay>
__global__ void adamw_scalar_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, int64_t n, AdamWCoeffs c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float wi = w[i], mi = m[i], vi = v[i];
    update<kDecay>(wi, g[i], mi, vi, c);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
  }
}

// n4 float4 groups, then the n % 4 tail elements starting at 4 * n4.
template <bool kDecay>
__global__ void adamw_vec4_kernel(float4* __restrict__ w, const float4* __restrict__ g, float4* __restrict__ m,
                                  float4* __restrict__ v, int64_t n4, int64_t n, AdamWCoeffs c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < n4; i += stride) {
    float4 wi = w[i], mi = m[i], vi = v[i];
    const float4 gi = g[i];
    update<kDecay>(wi.x, gi.x, mi.x, vi.x, c);
    update<kDecay>(wi.y, gi.y, mi.y, vi.y, c);
    update<kDecay>(wi.z, gi.z, mi.z, vi.z, c);
    update<kDecay>(wi.w, gi.w, mi.w, vi.w, c);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
  }
  float* ws = reinterpret_cast<float*>(w);
  const float* gs = reinterpret_cast<const float*>(g);
  float* ms = reinterpret_cast<float*>(m);
  float* vs = reinterpret_cast<float*>(v);
  for (int64_t i = 4 * n4 + first; i < n; i += stride) {
    float wi = ws[i], mi = ms[i], vi = vs[i];
    update<kDecay>(wi, gs[i], mi, vi, c);
    ws[i] = wi;
    ms[i] = mi;
    vs[i] = vi;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <bool kDecay>
cudaError_t launch(float* w, const float* g, float* m, float* v, int64_t n, const AdamWCoeffs& c,
                   cudaStream_t stream) {
  if (aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v)) {
    const int64_t n4 = n / 4;
    adamw_vec4_kernel<kDecay><<<detail::blocks_for(n4 > 0 ? n4 : n, kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<float4*>(w), reinterpret_cast<const float4*>(g), reinterpret_cast<float4*>(m),
        reinterpret_cast<float4*>(v), n4, n, c);
  } else {
    adamw_scalar_kernel<kDecay><<<detail::blocks_for(n, kThreads), kThreads, 0, stream>>>(w, g, m, v, n, c);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t fused_adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWCoeffs& c,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return c.decayed ? launch<true>(w, g, m, v, n, c, stream) : launch<false>(w, g, m, v, n, c, stream);
}

}  // namespace btx::kernels::cuda
