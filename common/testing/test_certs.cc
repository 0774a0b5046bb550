#include "test_certs.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <fstream>
#include <stdexcept>

namespace btx::testing {
namespace {

void Check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("test certificate: ") + what);
}

EVP_PKEY* NewKey() {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  Check(key != nullptr, "EC key generation");
  return key;
}

std::string KeyPem(EVP_PKEY* key) {
  BIO* bio = BIO_new(BIO_s_mem());
  Check(PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr) == 1, "write key");
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(n));
  BIO_free(bio);
  return out;
}

std::string CertPem(X509* cert) {
  BIO* bio = BIO_new(BIO_s_mem());
  Check(PEM_write_bio_X509(bio, cert) == 1, "write certificate");
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(n));
  BIO_free(bio);
  return out;
}

void AddExt(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  Check(ext != nullptr, value);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

X509* NewCert(const std::string& common_name, long serial, EVP_PKEY* key, long valid_seconds = 24 * 3600) {
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), serial);
  // Backdated an hour so that a clock slightly behind still accepts it.
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), valid_seconds);
  X509_set_pubkey(cert, key);
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(common_name.c_str()), -1,
                             -1, 0);
  return cert;
}

void WriteFile(const std::string& path, const std::string& text, mode_t mode) {
  std::ofstream(path, std::ios::trunc) << text;
  ::chmod(path.c_str(), mode);
}

}  // namespace

struct TestCa::Impl {
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
  ~Impl() {
    X509_free(cert);
    EVP_PKEY_free(key);
  }
};

TestCa::TestCa(std::string dir, std::string name)
    : dir_(std::move(dir)), name_(std::move(name)), impl_(std::make_unique<Impl>()) {
  impl_->key = NewKey();
  impl_->cert = NewCert(name_ + " test CA", serial_++, impl_->key);
  X509_set_issuer_name(impl_->cert, X509_get_subject_name(impl_->cert));
  AddExt(impl_->cert, impl_->cert, NID_basic_constraints, "critical,CA:TRUE");
  AddExt(impl_->cert, impl_->cert, NID_key_usage, "critical,keyCertSign,cRLSign");
  AddExt(impl_->cert, impl_->cert, NID_subject_key_identifier, "hash");
  Check(X509_sign(impl_->cert, impl_->key, EVP_sha256()) > 0, "sign CA");
  cert_pem_ = CertPem(impl_->cert);
  cert_file_ = dir_ + "/" + name_ + "-ca.pem";
  WriteFile(cert_file_, cert_pem_, 0644);
}

TestCa::~TestCa() = default;

IssuedCert TestCa::IssueServer(const std::string& name) { return Issue(name, true, 24 * 3600); }
IssuedCert TestCa::IssueClient(const std::string& common_name, long valid_seconds) {
  return Issue(common_name, false, valid_seconds);
}

IssuedCert TestCa::Issue(const std::string& common_name, bool server, long valid_seconds) {
  EVP_PKEY* key = NewKey();
  X509* cert = NewCert(common_name, serial_++, key, valid_seconds);
  X509_set_issuer_name(cert, X509_get_subject_name(impl_->cert));
  AddExt(cert, impl_->cert, NID_basic_constraints, "critical,CA:FALSE");
  AddExt(cert, impl_->cert, NID_key_usage, "critical,digitalSignature");
  AddExt(cert, impl_->cert, NID_ext_key_usage, server ? "serverAuth" : "clientAuth");
  AddExt(cert, impl_->cert, NID_subject_key_identifier, "hash");
  AddExt(cert, impl_->cert, NID_authority_key_identifier, "keyid:always");
  if (server) AddExt(cert, impl_->cert, NID_subject_alt_name, "IP:127.0.0.1,IP:::1,DNS:localhost");
  Check(X509_sign(cert, impl_->key, EVP_sha256()) > 0, "sign certificate");
  IssuedCert out;
  out.cert_pem = CertPem(cert);
  out.key_pem = KeyPem(key);
  X509_free(cert);
  EVP_PKEY_free(key);
  const std::string base = dir_ + "/" + name_ + "-" + common_name;
  out.cert_file = base + ".pem";
  out.key_file = base + ".key";
  WriteFile(out.cert_file, out.cert_pem, 0644);
  WriteFile(out.key_file, out.key_pem, 0600);
  return out;
}

}  // namespace btx::testing
