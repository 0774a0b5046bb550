// CUDA back end of FusedAdamW (compiled only when BTX_TORCH_HAS_CUDA): the raw kernel of
// btx_kernels_cuda on the tensors' device and current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include "btx/kernels/fused_adamw.h"

namespace btx::kernels::detail {

// Inputs already checked by FusedAdamW (float32, contiguous, 1-D, same length, same CUDA device).
void fused_adamw_cuda(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const AdamWParams& p);

}  // namespace btx::kernels::detail
