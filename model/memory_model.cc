#include "btx/model/memory_model.h"

#include <algorithm>
#include <cstdio>
#include <map>

#ifdef BTX_HAVE_KERNELS
#include "btx/kernels/attention.h"
#include "btx/kernels/checkpoint.h"
#endif

namespace btx::model {

// Elements saved for the backward by one layer of llama.cc's Forward at N = rows * T tokens:
//   input norm: its input and one rsqrt per token            N*D + N
//   q/k/v projections: their input and outputs               N*D + N*(H + 2*Hkv)*hd
//   rope: q and k kept for the products with cos and sin     N*(H + Hkv)*hd
//   attention, naive: probabilities B*H*T^2 (+ k, v repeated per query head with GQA: 2*N*H*hd)
//              chunked / sdpa: contiguous q, k, v, output and one logsumexp per row
//                                                            N*(H + 2*Hkv)*hd + N*H*hd + N*H
//   o projection input, residual and FFN norm                N*H*hd + N*D + N
//   FFN (per routed copy for MoE, k copies): input, gate, act(gate), up, act*up
//                                                            N*D + 4*N*F (MoE: k*(N*D + 4*N*F) + 3*N*E)
int64_t LayerActivationElements(const MemoryModelInput& in) {
  const ModelConfig& c = in.model;
  const int64_t N = in.rows * in.seq_len, T = in.seq_len, D = c.hidden_size, F = c.intermediate_size;
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
  int64_t e = N * D + N;
  e += N * D + N * (H + 2 * Hkv) * hd;
  e += N * (H + Hkv) * hd;
  if (in.attention == "naive") {
    e += in.rows * H * T * T + (H != Hkv ? 2 * N * H * hd : 0);
  } else {
    e += N * (H + 2 * Hkv) * hd + N * H * hd + N * H;
  }
  e += N * H * hd + N * D + N;
  if (c.is_moe()) {
    e += c.num_experts_per_tok * (N * D + 4 * N * F) + 3 * N * c.num_local_experts;
  } else {
    e += N * D + 4 * N * F;
  }
  return e;
}

MemoryModel EstimateMemory(const MemoryModelInput& in) {
  const ModelConfig& c = in.model;
  MemoryModel m;
  m.params = in.params * 4;
  m.grads = in.trainable * 4;
  if (in.param_shards > 1) {
    // ZeRO-3: frozen weights whole, trainable ones as a 1/R shard, plus the gathered units' weights and gradients.
    m.params = (in.params - in.trainable) * 4 + in.trainable * 4 / in.param_shards + in.gathered * 4;
    m.grads = in.trainable * 4 / in.param_shards + in.gathered * 4;
  }
  m.optimizer = in.trainable * 8 / std::max<int64_t>(1, in.optimizer_shards);
  const int64_t N = in.rows * in.seq_len, L = c.num_hidden_layers, V = c.vocab_size, D = c.hidden_size;
  const int64_t layer = LayerActivationElements(in);
  // Checkpointing keeps each layer's input and re-creates one layer's activations at a time in the backward.
  int64_t elements = N * D + (in.checkpointing ? L * N * D + layer : L * layer);
  // Head: final norm; full logits keep [N, V] for log_softmax and need another [N, V] for their gradient, the
  // chunked loss one logsumexp per token and two [chunk, V] blocks at a time.
  elements += N * D + N;
  elements += in.loss_chunk_tokens > 0 ? N + 2 * std::min(in.loss_chunk_tokens, N) * V : 2 * N * V;
  m.activations = elements * in.activation_bytes;
  return m;
}

std::string FormatBytes(int64_t bytes) {
  if (bytes < 0) return "unknown";
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

std::string DescribeMemoryModel(const MemoryModelInput& in, const MemoryModel& m) {
  std::string loss = in.loss_chunk_tokens > 0 ? "loss in chunks of " + std::to_string(in.loss_chunk_tokens) + " tokens"
                                              : "loss over full logits";
  const std::string sharded = in.param_shards > 1 ? " (1/" + std::to_string(in.param_shards) + " + " +
                                                        FormatBytes(in.gathered * 4) + " gathered, ZeRO-3)"
                                                  : "";
  return "memory model per rank: params " + FormatBytes(m.params) + sharded + ", grads " + FormatBytes(m.grads) +
         sharded + ", optimizer " +
         FormatBytes(m.optimizer) + (in.optimizer_shards > 1 ? " (1/" + std::to_string(in.optimizer_shards) + ")" : "") +
         ", activations ~" + FormatBytes(m.activations) + " (micro-batch " + std::to_string(in.rows) + " x " +
         std::to_string(in.seq_len) + " tokens, attention " + in.attention + ", activation checkpointing " +
         (in.checkpointing ? "on" : "off") + ", " + loss + "), total ~" + FormatBytes(m.total());
}

std::string DescribeMeasuredPeak(c10::Device device) {
#ifdef BTX_HAVE_KERNELS
  std::string s = "measured peak: host resident " + FormatBytes(kernels::host_peak_bytes());
  if (device.is_cuda()) {
    const int64_t cuda = kernels::cuda_peak_allocated_bytes(device.has_index() ? device.index() : 0);
    s += ", CUDA allocated " + (cuda >= 0 ? FormatBytes(cuda) : std::string("unknown (LibTorch without CUDA headers)"));
  }
  return s;
#else
  (void)device;
  return "measured peak: unknown (built without the btx kernels library)";
#endif
}

std::string DescribeTrainingMemory(const LlamaModel& model, const contract::TrainConfig& train, int64_t world_size,
                                   const std::string& device) {
  MemoryModelInput in;
  in.model = model.config();
  for (const auto& [name, p] : model.params()) {
    in.params += p.numel();
    if (p.requires_grad()) in.trainable += p.numel();
  }
  const int64_t ranks = std::max<int64_t>(1, world_size);
  in.rows = (train.micro_batch() + ranks - 1) / ranks;  // the largest slice of a micro-batch (Trainer::TrainStep)
  in.seq_len = train.seq_len;
  in.attention = ResolvedAttention(train.attention, train.seq_len);
  in.checkpointing = train.activation_checkpointing;
  in.loss_chunk_tokens = train.loss_chunk_tokens;
  in.optimizer_shards = train.zero == 1 || train.zero == 3 ? ranks : 1;
  if (train.zero == 3 && ranks > 1) {
    // Trainer's units: each decoder layer's trainable parameters, and the rest; one layer is gathered at a time,
    // the rest for the whole step. Every layer is recomputed in its backward (as with activation checkpointing).
    in.param_shards = ranks;
    std::map<int64_t, int64_t> layer;
    int64_t outer = 0;
    for (const auto& [name, p] : model.params()) {
      if (!p.requires_grad()) continue;
      if (name.starts_with("model.layers."))
        layer[std::stoll(name.substr(13))] += p.numel();
      else
        outer += p.numel();
    }
    int64_t largest = 0;
    for (const auto& [l, n] : layer) largest = std::max(largest, n);
    in.gathered = outer + largest;
    in.checkpointing = true;
  }
  // Autocast keeps matmul outputs in bf16 on CUDA; most saved activations are those.
  in.activation_bytes = device.rfind("cuda", 0) == 0 || train.precision == "bf16" ? 2 : 4;
  return DescribeMemoryModel(in, EstimateMemory(in));
}

void ApplyMemoryOptions(const contract::TrainConfig& train, ForwardOptions& fo) {
  fo.attention = train.attention == "naive"     ? AttentionKind::kNaive
                 : train.attention == "chunked" ? AttentionKind::kChunked
                                                : AttentionKind::kAuto;
  fo.activation_checkpointing = train.activation_checkpointing;
  fo.return_hidden = train.loss_chunk_tokens > 0;
}

std::string ResolvedAttention(const std::string& attention, int64_t seq_len) {
#ifdef BTX_HAVE_KERNELS
  kernels::AttentionImpl impl = kernels::AttentionImpl::kAuto;
  if (!kernels::parse_attention_impl(attention, &impl)) return attention;
  return kernels::attention_impl_name(kernels::resolve_attention(impl, seq_len));
#else
  (void)seq_len;
  return attention == "auto" ? "naive" : attention;
#endif
}

}  // namespace btx::model
