// Throwaway certificate authorities for tests, made at run time so that no key is ever committed:
// an EC P-256 CA and the server and client certificates it issues, written as PEM files.
#pragma once

#include <memory>
#include <string>

namespace btx::testing {

struct IssuedCert {
  std::string cert_file, key_file;  // PEM files (the key readable by its owner only)
  std::string cert_pem, key_pem;
};

class TestCa {
 public:
  // Writes <dir>/<name>-ca.pem; everything it issues goes to <dir> too.
  TestCa(std::string dir, std::string name);
  ~TestCa();
  TestCa(const TestCa&) = delete;
  TestCa& operator=(const TestCa&) = delete;

  const std::string& cert_file() const { return cert_file_; }
  const std::string& cert_pem() const { return cert_pem_; }

  // A server certificate valid for 127.0.0.1, ::1 and localhost.
  IssuedCert IssueServer(const std::string& name);
  // A client certificate with this common name, valid from an hour ago until `valid_seconds` from
  // now (negative: already expired).
  IssuedCert IssueClient(const std::string& common_name, long valid_seconds = 24 * 3600);

 private:
  struct Impl;
  IssuedCert Issue(const std::string& common_name, bool server, long valid_seconds);

  std::string dir_, name_, cert_file_, cert_pem_;
  std::unique_ptr<Impl> impl_;
  long serial_ = 1;
};

}  // namespace btx::testing
