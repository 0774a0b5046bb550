// Memory-bound pieces of the MoE layer: row gather into expert order, per-token combine (slots summed in
// order, float accumulation: deterministic), and the SwiGLU element-wise forward / fused backward.
#include <type_traits>

#include "common.cuh"

namespace btx::kernels::cuda {
namespace {

template <typename T>
__global__ void gather_kernel(const T* src, int64_t width, const int64_t* sorted_assign, int64_t rows, int64_t k,
                              T* dst) {
  const int64_t n = rows * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / width, c = i - r * width;
    dst[i] = src[(sorted_assign[r] / k) * width + c];
  }
}

template <typename T>
__global__ void combine_kernel(const T* rows, int64_t width, const int64_t* row_of_assign, const T* gates,
                               int64_t k, T* out) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t r = row_of_assign[t * k + s];
      if (r < 0) continue;
      const float g = gates ? detail::load(gates, t * k + s) : 1.f;
      sum += g * detail::load(rows, r * width + c);
    }
    detail::store(out, t * width + c, sum);
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

template <typename T>
__global__ void swiglu_forward_kernel(const T* h1, const T* h3, int64_t n, T* act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = detail::load(h1, i);
    detail::store(act, i, a * sigmoid(a) * detail::load(h3, i));
  }
}

constexpr int kBwdThreads = 256;

// One block per sorted row; the dot product uses a fixed reduction tree, so dgate is deterministic.
template <typename T>
__global__ void swiglu_backward_kernel(const T* h1, const T* h3, const T* gin, const T* gates,
                                       const int64_t* sorted_assign, int64_t hidden, T* dh1, T* dh3, T* act_gated,
                                       float* dgate_rows) {
  __shared__ float partial[kBwdThreads];
  const int64_t row = blockIdx.x;
  const float g = detail::load(gates, sorted_assign[row]);
  float dot = 0.f;
  for (int64_t f = threadIdx.x; f < hidden; f += blockDim.x) {
    const int64_t i = row * hidden + f;
    const float v1 = detail::load(h1, i), v3 = detail::load(h3, i), gi = detail::load(gin, i);
    const float sg = sigmoid(v1), silu = v1 * sg;
    dot += gi * silu * v3;
    if (act_gated) detail::store(act_gated, i, g * silu * v3);
    const float da = g * gi;
    if (dh3) detail::store(dh3, i, da * silu);
    if (dh1) detail::store(dh1, i, da * v3 * sg * (1.f + v1 * (1.f - sg)));
  }
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kBwdThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dgate_rows[row] = partial[0];
}

}  // namespace

cudaError_t gather_rows(const void* src, DType dtype, int64_t width, const int64_t* sorted_assign, int64_t rows,
                        int64_t k, void* dst, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  return detail::with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gather_kernel<T><<<detail::blocks_for(rows * width, 256), 256, 0, stream>>>(
        static_cast<const T*>(src), width, sorted_assign, rows, k, static_cast<T*>(dst));
    return cudaGetLastError();
  });
}

cudaError_t combine_rows(const void* rows, DType dtype, int64_t width, const int64_t* row_of_assign,
                         const void* gates, int64_t tokens, int64_t k, void* out, cudaStream_t stream) {
  if (tokens == 0 || width == 0) return cudaSuccess;
  if (tokens > 2147483647LL) return cudaErrorInvalidValue;
  const int threads = width >= 256 ? 256 : 128;
  return detail::with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    combine_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        static_cast<const T*>(rows), width, row_of_assign, static_cast<const T*>(gates), k, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t swiglu_forward(const void* h1, const void* h3, DType dtype, int64_t n, void* act, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return detail::with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_forward_kernel<T><<<detail::blocks_for(n, 256), 256, 0, stream>>>(
        static_cast<const T*>(h1), static_cast<const T*>(h3), n, static_cast<T*>(act));
    return cudaGetLastError();
  });
}

cudaError_t swiglu_backward(const void* h1, const void* h3, const void* gin, const void* gates,
                            const int64_t* sorted_assign, int64_t rows, int64_t hidden, DType dtype, void* dh1,
                            void* dh3, void* act_gated, float* dgate_rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 2147483647LL) return cudaErrorInvalidValue;
  return detail::with_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_backward_kernel<T><<<static_cast<unsigned>(rows), kBwdThreads, 0, stream>>>(
        static_cast<const T*>(h1), static_cast<const T*>(h3), static_cast<const T*>(gin),
        static_cast<const T*>(gates), sorted_assign, hidden, static_cast<T*>(dh1), static_cast<T*>(dh3),
        static_cast<T*>(act_gated), dgate_rows);
    return cudaGetLastError();
  });
}

}  // namespace btx::kernels::cuda
