// safetensors reader (mmap, every bound checked here) and writer (whole or streamed, optional shards).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model::st {

enum class DType { kF32, kF16, kBF16 };
const char* DTypeName(DType d);
size_t DTypeSize(DType d);
StatusOr<DType> FromScalarType(c10::ScalarType t);

inline constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the start of the data buffer
};

class File {
 public:
  // Maps `path` read-only and validates the header against the file; nothing is trusted.
  static StatusOr<std::shared_ptr<File>> Open(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* Find(const std::string& name) const;
  // The tensor's bytes in the mapping, as stored (possibly unaligned); valid while this File lives.
  const uint8_t* RawBytes(const TensorInfo& t) const { return map_ + data_start_ + t.begin; }
  // An madvise() hint over the whole mapping (e.g. MADV_SEQUENTIAL for a streaming reader).
  void Advise(int advice) const;
  // Copy of the tensor converted to `dtype` (float32 by default); the mapping may be closed afterwards.
  StatusOr<at::Tensor> Load(const std::string& name, c10::ScalarType dtype = c10::kFloat) const;

 private:
  File() = default;
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Header validation on raw bytes, shared by File::Open and the tests of malformed files.
Status ParseHeader(const uint8_t* data, size_t size, std::vector<TensorInfo>* tensors,
                   std::map<std::string, std::string>* metadata, uint64_t* data_start);

struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// Produces tensor i of the spec list on demand, so writers never hold all tensors at once.
using TensorProducer = std::function<StatusOr<at::Tensor>(size_t index)>;

// Writes and fsyncs the file; a failure removes it. With `sha256`, that gets the digest of the bytes written
// (lowercase hex, as btx::Sha256File would give), hashed on another thread as they are written, so that
// publication need not read the file again; it is set only on success. While hashing, up to three of the
// produced tensors are kept alive until hashed.
Status WriteStreaming(const std::string& path, const std::vector<TensorSpec>& specs, const TensorProducer& produce,
                      const std::map<std::string, std::string>& metadata = {}, std::string* sha256 = nullptr);
Status Write(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
             const std::map<std::string, std::string>& metadata = {}, std::string* sha256 = nullptr);

}  // namespace btx::model::st
