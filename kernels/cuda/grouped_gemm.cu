// Grouped GEMM over the experts' contiguous row slices with one cuBLAS call per non-empty expert (row
// counts are known on the host, so no padding and no device-side size reads). Row-major operands are
// passed to column-major cuBLAS as their transposes: C = op(A) op(B) becomes C^T = op(B)^T op(A)^T.
#include "common.cuh"

namespace btx::kernels::cuda {
namespace {

cudaDataType_t cuda_type(DType d) { return d == DType::kFloat32 ? CUDA_R_32F : CUDA_R_16BF; }

// Row-major C[m, n] = beta C + op(A) op(B), with row strides lda / ldb / ldc.
cublasStatus_t gemm_row_major(cublasHandle_t h, DType d, bool trans_a, bool trans_b, int64_t m, int64_t n,
                              int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, void* c,
                              int64_t ldc, float beta) {
  const float alpha = 1.f;
  const cudaDataType_t t = cuda_type(d);
  return cublasGemmEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b, t,
                      static_cast<int>(ldb), a, t, static_cast<int>(lda), &beta, c, t, static_cast<int>(ldc),
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

}  // namespace

cublasStatus_t grouped_gemm(cublasHandle_t handle, GroupedOp op, DType dtype, const int64_t* host_offsets,
                            int64_t experts, int64_t n_cols, int64_t k_cols, const void* a, const void* b, void* c,
                            float beta, cudaStream_t stream) {
  cublasStatus_t status = cublasSetStream(handle, stream);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  const size_t es = detail::element_size(dtype);
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  auto* pc = static_cast<char*>(c);
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = host_offsets[e], rows = host_offsets[e + 1] - begin;
    switch (op) {
      case GroupedOp::kRowsTimesWeightT:  // [rows, K] x [N, K]^T
        if (rows == 0) continue;
        status = gemm_row_major(handle, dtype, false, true, rows, n_cols, k_cols, pa + begin * k_cols * es, k_cols,
                                pb + e * n_cols * k_cols * es, k_cols, pc + begin * n_cols * es, n_cols, beta);
        break;
      case GroupedOp::kRowsTimesWeight:  // [rows, K] x [K, N]
        if (rows == 0) continue;
        status = gemm_row_major(handle, dtype, false, false, rows, n_cols, k_cols, pa + begin * k_cols * es,
                                k_cols, pb + e * k_cols * n_cols * es, n_cols, pc + begin * n_cols * es, n_cols,
                                beta);
        break;
      case GroupedOp::kWeightGrad:  // [rows, N]^T x [rows, K]
        if (rows == 0) {
          if (cudaMemsetAsync(pc + e * n_cols * k_cols * es, 0, n_cols * k_cols * es, stream) != cudaSuccess) {
            return CUBLAS_STATUS_EXECUTION_FAILED;
          }
          continue;
        }
        status = gemm_row_major(handle, dtype, true, false, n_cols, k_cols, rows, pa + begin * n_cols * es, n_cols,
                                pb + begin * k_cols * es, k_cols, pc + e * n_cols * k_cols * es, k_cols, beta);
        break;
    }
    if (status != CUBLAS_STATUS_SUCCESS) return status;
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace btx::kernels::cuda
