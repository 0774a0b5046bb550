// Raw CUDA building blocks of the MoE operators: plain device pointers and a stream, no torch types, so
// they build with nvcc alone. Every launcher is asynchronous on `stream` and returns the launch status.
// Row-major layouts throughout; "assignment" a = t * k + s indexes a [T, k] routing tensor.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace btx::kernels::cuda {

enum class DType { kFloat32, kBFloat16 };

// probs[T, E] = softmax(logits) (float32), index[T, k] = top-k experts (ties: lower index first),
// gates[T, k] = probs of the chosen experts renormalised over the k (float32). k <= 32.
cudaError_t softmax_topk(const void* logits, DType dtype, int64_t tokens, int64_t experts, int64_t k, float* probs,
                         int64_t* index, float* gates, cudaStream_t stream);

// Deterministic stable counting sort of assignments by expert (token order within an expert).
// capacity < 0: dropless. Outputs: offsets[E + 1], sorted_assign[<= assignments] (rows offsets[E] used),
// row_of_assign[assignments] (-1 when dropped). workspace: dispatch_workspace_bytes(...) bytes.
size_t dispatch_workspace_bytes(int64_t assignments, int64_t experts);
cudaError_t build_dispatch(const int64_t* expert_index, int64_t assignments, int64_t experts, int64_t capacity,
                           void* workspace, int64_t* offsets, int64_t* sorted_assign, int64_t* row_of_assign,
                           cudaStream_t stream);

// dst[i, :] = src[sorted_assign[i] / k, :] for i < rows.
cudaError_t gather_rows(const void* src, DType dtype, int64_t width, const int64_t* sorted_assign, int64_t rows,
                        int64_t k, void* dst, cudaStream_t stream);

// out[t, :] = sum_s gate[t, s] * rows[row_of_assign[t * k + s], :], slots in order, float accumulation;
// gates may be null (all ones); dropped slots (-1) add nothing. Deterministic.
cudaError_t combine_rows(const void* rows, DType dtype, int64_t width, const int64_t* row_of_assign,
                         const void* gates, int64_t tokens, int64_t k, void* out, cudaStream_t stream);

// act = silu(h1) * h3, element-wise over n elements.
cudaError_t swiglu_forward(const void* h1, const void* h3, DType dtype, int64_t n, void* act, cudaStream_t stream);

// Per sorted row i with gate g = gates[sorted_assign[i]] and upstream gradient gin[i, :] (= dY W2, ungated):
//   dgate_rows[i] = <gin_i, silu(h1_i) * h3_i>           (float32, fixed-order block reduction)
//   dh3 = g * gin * silu(h1);  dh1 = g * gin * h3 * silu'(h1);  act_gated = g * silu(h1) * h3
// dh1 may alias gin. dh1/dh3/act_gated may be null when not wanted.
cudaError_t swiglu_backward(const void* h1, const void* h3, const void* gin, const void* gates,
                            const int64_t* sorted_assign, int64_t rows, int64_t hidden, DType dtype, void* dh1,
                            void* dh3, void* act_gated, float* dgate_rows, cudaStream_t stream);

// Grouped GEMM over experts on contiguous row slices [offsets[e], offsets[e+1]) (host_offsets: on the host).
// kRowsTimesWeightT: C_e[n, N] = beta C_e + A_e[n, K] W_e^T,  W_e = weights + e * N * K, [N, K]
// kRowsTimesWeight:  C_e[n, N] = beta C_e + A_e[n, K] W_e,    W_e = weights + e * K * N, [K, N]
// kWeightGrad:       G_e[N, K] = A_e^T[N, n] B_e[n, K]  (A = rows with N columns, B = rows with K columns),
//                    G_e = out + e * N * K; experts with no rows get zeros.
enum class GroupedOp { kRowsTimesWeightT, kRowsTimesWeight, kWeightGrad };
cublasStatus_t grouped_gemm(cublasHandle_t handle, GroupedOp op, DType dtype, const int64_t* host_offsets,
                            int64_t experts, int64_t n_cols, int64_t k_cols, const void* a, const void* b, void* c,
                            float beta, cudaStream_t stream);

}  // namespace btx::kernels::cuda
