// Fused softmax + top-k router: one warp per token, so E up to a few hundred needs no shared memory and
// the reductions are fixed shuffle trees (deterministic).
#include <cfloat>

#include "common.cuh"

namespace btx::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxK = 32;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void softmax_topk_kernel(const T* logits, int64_t tokens, int64_t experts, int64_t k, float* probs,
                                    int64_t* index, float* gates) {
  const int64_t token = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (token >= tokens) return;  // whole warps exit together: token is uniform within a warp
  const T* row = logits + token * experts;
  float m = -FLT_MAX;
  for (int64_t e = lane; e < experts; e += kWarp) m = fmaxf(m, detail::load(row, e));
  m = warp_max(m);
  float z = 0.f;
  for (int64_t e = lane; e < experts; e += kWarp) z += __expf(detail::load(row, e) - m);
  z = warp_sum(z);
  float* prow = probs + token * experts;
  for (int64_t e = lane; e < experts; e += kWarp) prow[e] = __expf(detail::load(row, e) - m) / z;
  __syncwarp();

  int64_t chosen[kMaxK];
  float chosen_p[kMaxK];
  float kept = 0.f;
  for (int64_t s = 0; s < k; ++s) {
    float best = -1.f;
    int64_t best_e = experts;
    for (int64_t e = lane; e < experts; e += kWarp) {
      bool taken = false;
      for (int64_t r = 0; r < s; ++r) taken |= chosen[r] == e;
      const float p = prow[e];
      if (!taken && (p > best || (p == best && e < best_e))) {
        best = p;
        best_e = e;
      }
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    chosen[s] = best_e;
    chosen_p[s] = best;
    kept += best;
  }
  if (lane == 0) {
    for (int64_t s = 0; s < k; ++s) {
      index[token * k + s] = chosen[s];
      gates[token * k + s] = chosen_p[s] / kept;
    }
  }
}

}  // namespace

cudaError_t softmax_topk(const void* logits, DType dtype, int64_t tokens, int64_t experts, int64_t k, float* probs,
                         int64_t* index, float* gates, cudaStream_t stream) {
  if (k < 1 || k > kMaxK || k > experts) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>((tokens * kWarp + threads - 1) / threads);
  return detail::with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    softmax_topk_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(logits), tokens, experts, k, probs,
                                                           index, gates);
    return cudaGetLastError();
  });
}

}  // namespace btx::kernels::cuda
