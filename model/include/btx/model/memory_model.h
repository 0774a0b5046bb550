// Training memory per rank, estimated before the first step and measured after the last: what a job prints so
// that a run that will not fit is visible at its start, and the estimate can be checked against the peak.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

#include "btx/contract/specs.h"
#include "btx/model/config.h"
#include "btx/model/llama.h"

namespace btx::model {

struct MemoryModelInput {
  ModelConfig model;
  int64_t params = 0;            // parameter count (fp32 weights)
  int64_t trainable = 0;         // of which trained (gradients, AdamW moments)
  int64_t rows = 1;              // sequences per micro-batch on this rank
  int64_t seq_len = 256;
  std::string attention = "naive";  // resolved: naive | chunked | sdpa
  bool checkpointing = false;
  int64_t loss_chunk_tokens = 0;  // 0: full logits
  int64_t optimizer_shards = 1;   // ranks the optimizer state is split over (ZeRO-1 and 3), 1: replicated
  // ZeRO-3: ranks the trainable parameters and their gradients are split over (1: whole on every rank), and the
  // elements gathered whole at once on top of the shards: the outer unit (embeddings, final norm, lm_head, for
  // the whole step) plus the largest decoder layer's trainable parameters.
  int64_t param_shards = 1;
  int64_t gathered = 0;
  int64_t activation_bytes = 4;   // bytes per activation element: 4 fp32, 2 under bf16 autocast
};

struct MemoryModel {
  int64_t params = 0, grads = 0, optimizer = 0, activations = 0;  // bytes
  int64_t total() const { return params + grads + optimizer + activations; }
};

// Activation elements one decoder layer keeps for its backward (documented term by term in memory_model.cc).
int64_t LayerActivationElements(const MemoryModelInput& in);
MemoryModel EstimateMemory(const MemoryModelInput& in);
std::string FormatBytes(int64_t bytes);
// One line: "memory model per rank: params …, grads …, optimizer …, activations ~… (…), total ~…".
std::string DescribeMemoryModel(const MemoryModelInput& in, const MemoryModel& m);
// One line with the measured peaks: host resident (VmHWM) and, on a CUDA device, the caching allocator's.
std::string DescribeMeasuredPeak(c10::Device device);

// The memory model of a job training `model` (after Trainer::Init, which marks the trained parameters) with
// `train` on `world_size` ranks and `device`, as the line DescribeMemoryModel writes.
std::string DescribeTrainingMemory(const LlamaModel& model, const contract::TrainConfig& train, int64_t world_size,
                                   const std::string& device);

// The `train` memory options as forward options (attention kernel, checkpointing, hidden state for the
// chunked loss), and the attention kernel "auto" resolves to at a sequence length.
void ApplyMemoryOptions(const contract::TrainConfig& train, ForwardOptions& fo);
std::string ResolvedAttention(const std::string& attention, int64_t seq_len);

}  // namespace btx::model
