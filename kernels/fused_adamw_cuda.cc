// CUDA back end of FusedAdamW for a LibTorch built with CUDA. Compiled only when BTX_TORCH_HAS_CUDA.
#include "fused_adamw_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "btx/kernels/cuda/fused_adamw_cuda.h"

namespace btx::kernels::detail {

void fused_adamw_cuda(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const AdamWParams& p) {
  c10::cuda::CUDAGuard guard(w.device());
  const auto c = AdamWCoeffsOf<btx::kernels::cuda::AdamWCoeffs>(p);
  const cudaError_t status = btx::kernels::cuda::fused_adamw(w.data_ptr<float>(), g.data_ptr<float>(),
                                                             m.data_ptr<float>(), v.data_ptr<float>(), w.numel(), c,
                                                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "fused_adamw kernel: ", cudaGetErrorString(status));
}

}  // namespace btx::kernels::detail
