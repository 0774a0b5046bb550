// Deterministic stable counting sort on the GPU. Assignments are cut into chunks; a chunk's histogram
// is counted with integer atomics (exact, order-free), per-expert chunk bases come from a serial scan
// over chunks, and each chunk then places its assignments in order with one thread, so the row of every
// assignment is the same as the CPU plan's whatever the scheduling.
#include "common.cuh"

namespace btx::kernels::cuda {
namespace {

constexpr int64_t kChunk = 1024;

__global__ void chunk_histogram(const int64_t* expert_index, int64_t assignments, int64_t experts, int32_t* counts) {
  extern __shared__ int32_t local[];
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) local[e] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, assignments);
  for (int64_t a = begin + threadIdx.x; a < end; a += blockDim.x) {
    const int64_t e = expert_index[a];
    if (e >= 0 && e < experts) atomicAdd(&local[e], 1);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) counts[blockIdx.x * experts + e] = local[e];
}

// counts[c][e] -> exclusive per-expert base of chunk c (in place); offsets from the capped totals.
__global__ void scan_chunks(int32_t* counts, int64_t chunks, int64_t experts, int64_t capacity, int64_t* offsets,
                            int64_t* totals) {
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t run = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = counts[c * experts + e];
      counts[c * experts + e] = static_cast<int32_t>(run);
      run += n;
    }
    totals[e] = capacity >= 0 && run > capacity ? capacity : run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + totals[e];
  }
}

__global__ void chunk_place(const int64_t* expert_index, int64_t assignments, int64_t experts, int64_t capacity,
                            const int32_t* bases, const int64_t* offsets, int64_t* sorted_assign,
                            int64_t* row_of_assign) {
  extern __shared__ int32_t rank[];
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) rank[e] = bases[blockIdx.x * experts + e];
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, assignments);
  for (int64_t a = begin; a < end; ++a) {
    const int64_t e = expert_index[a];
    const int64_t r = rank[e]++;
    if (capacity >= 0 && r >= capacity) {
      row_of_assign[a] = -1;
    } else {
      const int64_t row = offsets[e] + r;
      sorted_assign[row] = a;
      row_of_assign[a] = row;
    }
  }
}

int64_t chunks_of(int64_t assignments) { return (assignments + kChunk - 1) / kChunk; }

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

size_t dispatch_workspace_bytes(int64_t assignments, int64_t experts) {
  return align256(static_cast<size_t>(chunks_of(assignments)) * experts * sizeof(int32_t)) +
         align256(static_cast<size_t>(experts) * sizeof(int64_t));
}

cudaError_t build_dispatch(const int64_t* expert_index, int64_t assignments, int64_t experts, int64_t capacity,
                           void* workspace, int64_t* offsets, int64_t* sorted_assign, int64_t* row_of_assign,
                           cudaStream_t stream) {
  if (experts <= 0 || experts > 12 * 1024) return cudaErrorInvalidValue;  // per-block counters live in shared memory
  const int64_t chunks = chunks_of(assignments);
  auto* counts = static_cast<int32_t*>(workspace);
  auto* totals = reinterpret_cast<int64_t*>(static_cast<char*>(workspace) +
                                            align256(static_cast<size_t>(chunks) * experts * sizeof(int32_t)));
  const size_t shared = static_cast<size_t>(experts) * sizeof(int32_t);
  if (chunks > 0) {
    chunk_histogram<<<static_cast<unsigned>(chunks), 256, shared, stream>>>(expert_index, assignments, experts,
                                                                            counts);
  }
  scan_chunks<<<1, 256, 0, stream>>>(counts, chunks, experts, capacity, offsets, totals);
  if (chunks > 0) {
    chunk_place<<<static_cast<unsigned>(chunks), 128, shared, stream>>>(expert_index, assignments, experts, capacity,
                                                                        counts, offsets, sorted_assign,
                                                                        row_of_assign);
  }
  return cudaGetLastError();
}

}  // namespace btx::kernels::cuda
