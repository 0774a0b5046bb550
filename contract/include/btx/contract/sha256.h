// Incremental sha256: behind Sha256File, and for writers that hash what they write (safetensors).
// libcrypto computes it where the build found OpenSSL (several times faster, with the CPU's SHA extensions);
// otherwise a portable implementation does, so the contract needs nothing but the C++ library.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace btx {

// FIPS 180-4, in plain C++. Always built: the tests check it against the standard's vectors.
class PortableSha256 {
 public:
  void Update(const void* data, size_t size);
  std::array<unsigned char, 32> Finish();

 private:
  void Block(const unsigned char* p);
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64] = {};
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(const void* data, size_t size);
  // Lowercase hex, as Sha256File gives; the hasher is spent afterwards.
  std::string FinishHex();

 private:
  void* ctx_ = nullptr;  // libcrypto's EVP_MD_CTX, when built with it
  PortableSha256 portable_;
};


}  // namespace btx
