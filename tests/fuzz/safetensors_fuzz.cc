// libFuzzer target: safetensors files come from wherever a model directory came from (a download, a
// worker's artifact), so the reader must reject any byte string with a status, never crash.
// ParseHeader runs on the fuzzer's exact-size heap buffer, where ASan sees a read one byte past the
// end (an mmap'ed file would hide it inside the page). Accepted bytes then go through the real path,
// File::Open on a memfd and Load of every tensor, with the invariants Load relies on checked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "btx/model/safetensors.h"

namespace {
int g_memfd = -1;

[[noreturn]] void Violated(const std::string& property) {
  std::fprintf(stderr, "\nsafetensors_fuzz: property violated: %s\n", property.c_str());
  std::abort();
}

c10::ScalarType ScalarOf(btx::model::st::DType d) {
  switch (d) {
    case btx::model::st::DType::kF32: return c10::kFloat;
    case btx::model::st::DType::kF16: return c10::kHalf;
    case btx::model::st::DType::kBF16: return c10::kBFloat16;
  }
  return c10::kFloat;
}

void Check(const uint8_t* data, size_t size) {
  std::vector<btx::model::st::TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;
  btx::Status st = btx::model::st::ParseHeader(data, size, &tensors, &metadata, &data_start);
  if (!st.ok()) {
    if (st.code() != btx::StatusCode::kDataLoss || st.message().empty()) Violated("rejection is not DATA_LOSS: " + st.message());
    return;
  }
  for (const auto& t : tensors) {
    if (t.begin > t.end || data_start + t.end > size) Violated("tensor '" + t.name + "' lies outside the file");
    // LibTorch derives int64_t strides from the non-zero dimensions, even for an empty tensor.
    unsigned __int128 numel = 1, extent = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Violated("tensor '" + t.name + "' has a negative dimension");
      numel *= static_cast<uint64_t>(d);
      extent *= d ? static_cast<uint64_t>(d) : 1;
      if (extent > INT64_MAX) Violated("tensor '" + t.name + "' has dimensions whose product overflows int64_t");
    }
    if (numel * btx::model::st::DTypeSize(t.dtype) != t.end - t.begin) Violated("tensor '" + t.name + "' size mismatch");
  }

  if (::ftruncate(g_memfd, 0) != 0 || ::pwrite(g_memfd, data, size, 0) != static_cast<ssize_t>(size)) {
    Violated("cannot write the memfd");
  }
  auto file = btx::model::st::File::Open("/proc/self/fd/" + std::to_string(g_memfd));
  if (!file.ok()) Violated("ParseHeader accepted what File::Open rejects: " + file.status().message());
  if ((*file)->tensors().size() != tensors.size()) Violated("File::Open sees a different tensor list");
  for (const auto& t : tensors) {
    auto raw = (*file)->Load(t.name, ScalarOf(t.dtype));
    if (!raw.ok()) Violated("Load of accepted tensor '" + t.name + "' fails: " + raw.status().message());
    const size_t n = t.end - t.begin;
    if (raw->nbytes() != n || (n && std::memcmp(raw->data_ptr(), data + data_start + t.begin, n) != 0)) {
      Violated("Load of '" + t.name + "' does not return the file's bytes");
    }
    auto f32 = (*file)->Load(t.name);
    if (!f32.ok() || f32->scalar_type() != c10::kFloat || f32->numel() != raw->numel()) {
      Violated("float Load of '" + t.name + "' differs");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  at::set_num_threads(1);
  g_memfd = ::memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  if (g_memfd < 0) Violated("memfd_create failed");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    Check(data, size);
  } catch (const std::exception& e) {
    Violated(std::string("exception escaped: ") + e.what());
  } catch (...) {
    Violated("non-std exception escaped");
  }
  return 0;
}
