#include "btx/model/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <system_error>
#include <thread>

#include "btx/contract/sha256.h"

namespace btx::model::st {
using nlohmann::json;

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
  }
  return "?";
}
size_t DTypeSize(DType d) { return d == DType::kF32 ? 4 : 2; }

static c10::ScalarType ToScalarType(DType d) {
  switch (d) {
    case DType::kF32: return c10::kFloat;
    case DType::kF16: return c10::kHalf;
    case DType::kBF16: return c10::kBFloat16;
  }
  return c10::kFloat;
}

StatusOr<DType> FromScalarType(c10::ScalarType t) {
  if (t == c10::kFloat) return DType::kF32;
  if (t == c10::kHalf) return DType::kF16;
  if (t == c10::kBFloat16) return DType::kBF16;
  return InvalidArgument(std::string("cannot store dtype ") + c10::toString(t) + " in safetensors here");
}

Status ParseHeader(const uint8_t* data, size_t size, std::vector<TensorInfo>* tensors,
                   std::map<std::string, std::string>* metadata, uint64_t* data_start) {
  if (size < 8) return DataLoss("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxHeaderBytes)
    return DataLoss("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > size - 8)
    return DataLoss("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
                    " bytes)");
  if (n < 2 || data[8] != '{') return DataLoss("header does not start with '{'");
  json h;
  try {
    h = json::parse(reinterpret_cast<const char*>(data + 8), reinterpret_cast<const char*>(data + 8 + n));
  } catch (const std::exception& e) {
    return DataLoss(std::string("header is not valid JSON: ") + e.what());
  }
  if (!h.is_object()) return DataLoss("header is not a JSON object");
  const uint64_t buffer = size - 8 - n;
  tensors->clear();
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) return DataLoss("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) return DataLoss("__metadata__." + m.key() + " is not a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor '" + key + "'";
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
      return DataLoss(where + ": needs dtype, shape and data_offsets");
    TensorInfo t;
    t.name = key;
    if (!v["dtype"].is_string()) return DataLoss(where + ": dtype is not a string");
    const std::string dt = v["dtype"].get<std::string>();
    if (dt == "F32") t.dtype = DType::kF32;
    else if (dt == "F16") t.dtype = DType::kF16;
    else if (dt == "BF16") t.dtype = DType::kBF16;
    else return DataLoss(where + ": unsupported dtype '" + dt + "' (supported: F32, F16, BF16)");
    if (!v["shape"].is_array()) return DataLoss(where + ": shape is not an array");
    // The overflow check runs on the product of the non-zero dimensions, so that a zero dimension does
    // not let later ones reach 2^63 (negative in int64_t shapes) or overflow the strides LibTorch derives.
    uint64_t numel = 1, extent = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) return DataLoss(where + ": shape entries must be non-negative integers");
      uint64_t x = d.get<uint64_t>();
      if (x != 0 && extent > std::numeric_limits<uint64_t>::max() / 16 / x) return DataLoss(where + ": shape overflows");
      extent *= std::max<uint64_t>(x, 1);
      numel *= x;
      t.shape.push_back(static_cast<int64_t>(x));
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return DataLoss(where + ": data_offsets must be [begin, end] non-negative integers");
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.end < t.begin) return DataLoss(where + ": data_offsets end < begin");
    if (t.end > buffer)
      return DataLoss(where + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                      ") out of range of the " + std::to_string(buffer) + "-byte data buffer");
    if (numel * DTypeSize(t.dtype) != t.end - t.begin)
      return DataLoss(where + ": shape x dtype is " + std::to_string(numel * DTypeSize(t.dtype)) +
                      " bytes but data_offsets span " + std::to_string(t.end - t.begin));
    tensors->push_back(std::move(t));
  }
  // The format requires the buffer to be indexed entirely, without holes or overlaps (no polyglots).
  std::vector<const TensorInfo*> order;
  for (const auto& t : *tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  for (const auto* t : order) {
    if (t->begin < cursor)
      return DataLoss("tensor '" + t->name + "' overlaps the previous tensor (begins at " + std::to_string(t->begin) +
                      ", previous ends at " + std::to_string(cursor) + ")");
    if (t->begin > cursor)
      return DataLoss("data buffer has a hole before tensor '" + t->name + "' (bytes " + std::to_string(cursor) +
                      ".." + std::to_string(t->begin) + " unindexed)");
    cursor = t->end;
  }
  if (cursor != buffer)
    return DataLoss("data buffer is " + std::to_string(buffer) + " bytes but tensors cover only " +
                    std::to_string(cursor) + " (trailing bytes)");
  *data_start = 8 + n;
  return Status::Ok();
}

StatusOr<std::shared_ptr<File>> File::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFound("cannot open " + path + ": " + std::strerror(errno));
  struct stat sb {};
  if (::fstat(fd, &sb) != 0) {
    ::close(fd);
    return Internal("cannot stat " + path);
  }
  std::shared_ptr<File> f(new File());
  f->path_ = path;
  f->size_ = static_cast<size_t>(sb.st_size);
  if (f->size_ > 0) {
    void* m = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      ::close(fd);
      return Internal("cannot mmap " + path + ": " + std::strerror(errno));
    }
    f->map_ = static_cast<const uint8_t*>(m);
  }
  ::close(fd);
  Status st = ParseHeader(f->map_, f->size_, &f->tensors_, &f->metadata_, &f->data_start_);
  if (!st.ok()) return st.With(path);
  for (size_t i = 0; i < f->tensors_.size(); ++i) f->index_[f->tensors_[i].name] = i;
  return f;
}

void File::Advise(int advice) const {
  if (map_) ::madvise(const_cast<uint8_t*>(map_), size_, advice);
}

File::~File() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
}

const TensorInfo* File::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<at::Tensor> File::Load(const std::string& name, c10::ScalarType dtype) const {
  const TensorInfo* t = Find(name);
  if (!t) return NotFound(path_ + ": no tensor '" + name + "'");
  // Copy out of the mapping first: the bytes are not guaranteed aligned for the element type.
  at::Tensor raw = at::empty(t->shape, at::TensorOptions().dtype(ToScalarType(t->dtype)));
  if (t->end > t->begin) std::memcpy(raw.data_ptr(), map_ + data_start_ + t->begin, t->end - t->begin);
  return raw.scalar_type() == dtype ? raw : raw.to(dtype);
}

namespace {
// Hashes what a writer wrote on a thread of its own, in the order it was written: sha256 (about 1.8 GB/s per
// core) is about as slow as the writes themselves, so hashing in line would add its whole time to the writer's.
// A chunk holds the owner of its bytes (a tensor may be the only reference to a computed buffer), and the queue
// is bounded, so at most kMaxQueued chunks plus the one being hashed are kept alive for it.
class PipelinedSha256 {
 public:
  struct Chunk {
    at::Tensor tensor;  // contiguous; its bytes are hashed
    std::string bytes;  // hashed when `tensor` is undefined
  };
  static constexpr size_t kMaxQueued = 2;

  PipelinedSha256() {
    try {
      thread_ = std::thread([this] { Run(); });
    } catch (const std::system_error&) {
      // No thread to be had: Push hashes in line, slower but the same digest.
    }
  }
  ~PipelinedSha256() { Stop(/*drain=*/false); }
  PipelinedSha256(const PipelinedSha256&) = delete;
  PipelinedSha256& operator=(const PipelinedSha256&) = delete;

  // Blocks while the hasher is kMaxQueued chunks behind.
  void Push(Chunk c) {
    if (!thread_.joinable()) return Hash(c);
    {
      std::unique_lock<std::mutex> lock(mu_);
      space_.wait(lock, [&] { return queue_.size() < kMaxQueued; });
      queue_.push_back(std::move(c));
    }
    ready_.notify_one();
  }
  // Waits for everything pushed to be hashed.
  std::string FinishHex() {
    Stop(/*drain=*/true);
    return sha_.FinishHex();
  }

 private:
  void Hash(const Chunk& c) {
    if (c.tensor.defined()) sha_.Update(c.tensor.data_ptr(), c.tensor.nbytes());
    else sha_.Update(c.bytes.data(), c.bytes.size());
  }
  void Run() {
    for (;;) {
      Chunk c;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [&] { return !queue_.empty() || closed_; });
        if (queue_.empty()) return;
        c = std::move(queue_.front());
        queue_.pop_front();
      }
      space_.notify_one();
      Hash(c);
    }
  }
  // Without draining, what is still queued is dropped: the write failed and its digest is not wanted.
  void Stop(bool drain) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      if (!drain) queue_.clear();
    }
    ready_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

  btx::Sha256 sha_;
  std::mutex mu_;
  std::condition_variable ready_, space_;
  std::deque<Chunk> queue_;
  bool closed_ = false;
  std::thread thread_;
};

// The 8-byte little-endian length and the JSON header, padded; `sizes` gets each tensor's byte count.
StatusOr<std::string> LengthPrefixedHeader(const std::vector<TensorSpec>& specs,
                                           const std::map<std::string, std::string>& metadata,
                                           std::vector<uint64_t>* sizes) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& s : specs) {
    uint64_t numel = 1;
    for (auto d : s.shape) numel *= static_cast<uint64_t>(d);
    uint64_t bytes = numel * DTypeSize(s.dtype);
    if (h.contains(s.name)) return InvalidArgument("duplicate tensor name '" + s.name + "'");
    h[s.name] = {{"dtype", DTypeName(s.dtype)}, {"shape", s.shape}, {"data_offsets", {off, off + bytes}}};
    off += bytes;
    sizes->push_back(bytes);
  }
  std::string header = h.dump();
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');  // data buffer 8-byte aligned, as the spec allows
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header;
}
}  // namespace

Status WriteStreaming(const std::string& path, const std::vector<TensorSpec>& specs, const TensorProducer& produce,
                      const std::map<std::string, std::string>& metadata, std::string* sha256) {
  std::vector<uint64_t> sizes;
  BTX_ASSIGN_OR_RETURN(std::string head, LengthPrefixedHeader(specs, metadata, &sizes));
  FILE* fp = std::fopen(path.c_str(), "wb");
  if (!fp) return Internal("cannot create " + path + ": " + std::strerror(errno));
  std::optional<PipelinedSha256> hasher;
  if (sha256) hasher.emplace();
  // A partial file is removed: under its final name it would read as a truncated model.
  auto fail = [&](Status s) {
    hasher.reset();
    std::fclose(fp);
    std::remove(path.c_str());
    return s;
  };
  // errno is read before fail() closes the file: ENOSPC must reach the message.
  auto io_error = [&](const char* what) { return Internal(std::string(what) + " " + path + ": " + std::strerror(errno)); };
  if (std::fwrite(head.data(), 1, head.size(), fp) != head.size()) return fail(io_error("write failed:"));
  if (hasher) hasher->Push({at::Tensor(), std::move(head)});
  for (size_t i = 0; i < specs.size(); ++i) {
    auto t = produce(i);
    if (!t.ok()) return fail(t.status());
    at::Tensor x = t->detach().to(at::kCPU).to(ToScalarType(specs[i].dtype)).contiguous();
    if (x.sizes().vec() != specs[i].shape)
      return fail(Internal("tensor '" + specs[i].name + "' produced with shape " + c10::str(x.sizes()) +
                           ", planned " + c10::str(c10::IntArrayRef(specs[i].shape))));
    if (sizes[i] == 0) continue;
    if (std::fwrite(x.data_ptr(), 1, sizes[i], fp) != sizes[i]) return fail(io_error("write failed:"));
    if (hasher) hasher->Push({std::move(x), {}});
  }
  if (std::fflush(fp) != 0 || ::fsync(::fileno(fp)) != 0) return fail(io_error("flush failed:"));
  if (std::fclose(fp) != 0) {
    Status s = io_error("close failed:");
    hasher.reset();
    std::remove(path.c_str());
    return s;
  }
  if (hasher) *sha256 = hasher->FinishHex();
  return Status::Ok();
}

Status Write(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
             const std::map<std::string, std::string>& metadata, std::string* sha256) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) {
    BTX_ASSIGN_OR_RETURN(DType d, FromScalarType(t.scalar_type()));
    specs.push_back({name, d, t.sizes().vec()});
  }
  return WriteStreaming(
      path, specs, [&](size_t i) -> StatusOr<at::Tensor> { return tensors[i].second; }, metadata, sha256);
}

}  // namespace btx::model::st
