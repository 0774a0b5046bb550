#include "btx/common/tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cctype>

#include "btx/common/fs.h"
#include "btx/common/strings.h"

namespace btx::tls {
namespace {

// PEM files are small; a bound keeps a mistyped path (a disk image, /dev/zero) from being slurped.
constexpr size_t kMaxPemBytes = 1 << 20;

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using Cert = std::unique_ptr<X509, X509Free>;
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;

std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no details";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

Bio MemBio(const std::string& text) { return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size()))); }

// Refuses to prompt on the terminal for the passphrase of an encrypted key.
int NoPassphrase(char*, int, int, void*) { return -1; }

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  if (path.empty()) return absl::InvalidArgumentError(Cat(what, ": no file given"));
  auto text = ReadFile(path, kMaxPemBytes);
  if (!text.ok()) return absl::InvalidArgumentError(Cat(what, " ", path, ": ", text.status().message()));
  return std::move(*text);
}

bool ValidNow(X509* cert) {
  return X509_cmp_current_time(X509_get0_notAfter(cert)) >= 0 && X509_cmp_current_time(X509_get0_notBefore(cert)) <= 0;
}

// The certificates in `pem`, in order (at least one); an error names `path`.
absl::StatusOr<std::vector<Cert>> ParseCertificates(const std::string& pem, const std::string& path) {
  std::vector<Cert> certs;
  Bio bio = MemBio(pem);
  ERR_clear_error();
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr)) certs.emplace_back(x);
  ERR_clear_error();  // the loop ends on "no start line", which is not an error
  if (certs.empty()) {
    return absl::InvalidArgumentError(
        Cat("certificate file ", path, ": no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"));
  }
  return certs;
}

}  // namespace

absl::StatusOr<std::string> ReadCertificates(const std::string& path) {
  auto pem = ReadPem(path, "certificate file");
  if (!pem.ok()) return pem.status();
  auto certs = ParseCertificates(*pem, path);
  if (!certs.ok()) return certs.status();
  // A bundle (the system's, say) may carry expired roots; it is useless only if all are.
  for (const auto& c : *certs) {
    if (ValidNow(c.get())) return pem;
  }
  return absl::InvalidArgumentError(Cat("certificate file ", path, ": every certificate in it has expired (or is not valid yet)"));
}

absl::StatusOr<KeyPair> ReadKeyPair(const std::string& cert_path, const std::string& key_path) {
  if (cert_path.empty() != key_path.empty()) {
    return absl::InvalidArgumentError(
        Cat("a certificate needs its key and a key its certificate: got only the ", cert_path.empty() ? "key " : "certificate ",
            cert_path.empty() ? key_path : cert_path));
  }
  KeyPair pair;
  auto cert_pem = ReadPem(cert_path, "certificate file");
  if (!cert_pem.ok()) return cert_pem.status();
  auto certs = ParseCertificates(*cert_pem, cert_path);
  if (!certs.ok()) return certs.status();
  if (X509_cmp_current_time(X509_get0_notAfter(certs->front().get())) < 0) {
    return absl::InvalidArgumentError(Cat("certificate file ", cert_path, ": the certificate has expired"));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(certs->front().get())) > 0) {
    return absl::InvalidArgumentError(
        Cat("certificate file ", cert_path, ": the certificate is not valid yet (check the clock)"));
  }
  auto key_pem = ReadPem(key_path, "key file");
  if (!key_pem.ok()) return key_pem.status();
  Bio bio = MemBio(*key_pem);
  ERR_clear_error();
  Key key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
  if (!key) {
    return absl::InvalidArgumentError(
        Cat("key file ", key_path, ": no unencrypted PEM private key in it (", OpenSslError(), ")"));
  }
  if (X509_check_private_key(certs->front().get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        Cat("key file ", key_path, " does not belong to the certificate in ", cert_path));
  }
  pair.cert_pem = std::move(*cert_pem);
  pair.key_pem = std::move(*key_pem);
  return pair;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClientOptions& options,
                                                                             grpc::ChannelArguments& args) {
  if (!options.enabled()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  if (!options.ca_file.empty()) {
    auto roots = ReadCertificates(options.ca_file);
    if (!roots.ok()) return roots.status();
    ssl.pem_root_certs = *std::move(roots);
  }
  if (!options.cert_file.empty() || !options.key_file.empty()) {
    auto pair = ReadKeyPair(options.cert_file, options.key_file);
    if (!pair.ok()) return pair.status();
    ssl.pem_cert_chain = std::move(pair->cert_pem);
    ssl.pem_private_key = std::move(pair->key_pem);
  }
  if (!options.server_name.empty()) args.SetSslTargetNameOverride(options.server_name);
  return grpc::SslCredentials(ssl);
}

bool IsLocalAddress(std::string_view address) {
  if (address.rfind("unix:", 0) == 0 || address.rfind("unix-abstract:", 0) == 0) return true;
  for (std::string_view scheme : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (address.rfind(scheme, 0) == 0) {
      address.remove_prefix(scheme.size());
      break;
    }
  }
  std::string host;
  if (!address.empty() && address.front() == '[') {
    const size_t close = address.find(']');
    if (close == std::string_view::npos) return false;
    host = std::string(address.substr(1, close - 1));
  } else if (std::count(address.begin(), address.end(), ':') == 1) {
    host = std::string(address.substr(0, address.find(':')));
  } else {
    host = std::string(address);  // no port, or a bare IPv6 address
  }
  std::transform(host.begin(), host.end(), host.begin(), [](unsigned char c) { return std::tolower(c); });
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

}  // namespace btx::tls
