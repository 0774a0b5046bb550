// Internal to btx_model: the incremental sha256 behind Sha256File, for writers that hash what they write.
#pragma once

#include <cstddef>
#include <string>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX: OpenSSL stays a private dependency of btx_model

namespace btx::internal {

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
  evp_md_ctx_st* ctx_;
};

}  // namespace btx::internal
