// Causal self-attention without the T x T matrix (for long sequences), and the plain one it replaces.
// q: [B, H, T, hd], k / v: [B, Hkv, T, hd] with H a multiple of Hkv (grouped-query attention: query head h
// reads key/value head h / (H / Hkv)). Query i sees keys j with j <= i and, with a sliding window W > 0,
// i - j < W (Mistral's convention: the window counts the query itself). Output [B, H, T, hd] in q's dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace btx::kernels {

enum class AttentionImpl {
  kAuto,     // SDPA where LibTorch has it (>= 2.0), else chunked from kChunkedMinSeq tokens on, else naive
  kNaive,    // materialises the scores: B * H * T^2 floats saved for the backward
  kChunked,  // online softmax over key blocks; saves the output and one logsumexp per row (O(T))
  kSdpa,     // at::scaled_dot_product_attention (LibTorch >= 2.0 only)
};
// "auto" | "naive" | "chunked" | "sdpa"; false for anything else.
bool parse_attention_impl(const std::string& name, AttentionImpl* out);
const char* attention_impl_name(AttentionImpl impl);

struct AttentionOptions {
  AttentionImpl impl = AttentionImpl::kAuto;
  int64_t window = 0;    // sliding window in tokens; 0: full causal
  double scale = 0;      // score scale; 0: 1 / sqrt(hd)
  int64_t block_q = 0;   // chunked: query / key block sizes; 0: the defaults below
  int64_t block_k = 0;
};

// Below this length "auto" (without SDPA) keeps the naive path. Measured on CPU (docs/benchmarks.md): one thread
// runs the chunked path as fast or faster at 256-2048 tokens, but on 2 shared cores its many small block ops
// were several times slower (OpenMP and OpenBLAS threads contending); below 4096 tokens the T^2 scores of a
// layer (B * H * T^2 floats) are still moderate, so "auto" only switches where the memory clearly matters.
inline constexpr int64_t kChunkedMinSeq = 4096;
inline constexpr int64_t kDefaultBlockQ = 256;
inline constexpr int64_t kDefaultBlockK = 256;

// Whether this LibTorch has at::scaled_dot_product_attention.
bool sdpa_available();
// What kAuto resolves to for a sequence length (never kAuto).
AttentionImpl resolve_attention(AttentionImpl impl, int64_t seq_len);

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const AttentionOptions& opts = {});
// The two CPU implementations, callable directly (tests, benchmarks).
at::Tensor naive_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window = 0,
                                  double scale = 0);
at::Tensor chunked_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window = 0,
                                    double scale = 0, int64_t block_q = kDefaultBlockQ, int64_t block_k = kDefaultBlockK);

}  // namespace btx::kernels
