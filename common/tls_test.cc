#include "btx/common/tls.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "btx/common/fs.h"
#include "test_certs.h"

namespace btx::tls {
namespace {

TEST(Tls, LocalAddresses) {
  for (const char* a : {"127.0.0.1:0", "127.1.2.3:50051", "localhost:50051", "LOCALHOST:1", "[::1]:50051", "::1",
                        "[::ffff:127.0.0.1]:5", "unix:/run/btx.sock", "unix-abstract:btx", "dns:///localhost:1",
                        "ipv4:127.0.0.1:9"}) {
    EXPECT_TRUE(IsLocalAddress(a)) << a;
  }
  for (const char* a : {"0.0.0.0:50051", "[::]:50051", ":50051", "10.0.0.1:50051", "scheduler:50051",
                        "localhost.evil.com:1", "[::1:50051", "", "128.0.0.1:1", "dns:///scheduler:1"}) {
    EXPECT_FALSE(IsLocalAddress(a)) << a;
  }
}

class TlsFiles : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = *MakeTempDir("btx-tls-test"); }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ + "/" + name) << text;
    return dir_ + "/" + name;
  }
  std::string dir_;
};

TEST_F(TlsFiles, KeyPairIsCheckedWithClearErrors) {
  btx::testing::TestCa ca(dir_, "a");
  auto alice = ca.IssueClient("alice");
  auto bob = ca.IssueClient("bob");
  auto pair = ReadKeyPair(alice.cert_file, alice.key_file);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_EQ(pair->cert_pem, alice.cert_pem);

  auto mismatched = ReadKeyPair(alice.cert_file, bob.key_file);
  ASSERT_FALSE(mismatched.ok());
  EXPECT_NE(mismatched.status().message().find("does not belong to the certificate"), std::string::npos)
      << mismatched.status();

  auto missing = ReadKeyPair(dir_ + "/nope.pem", alice.key_file);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope.pem"), std::string::npos) << missing.status();

  auto half = ReadKeyPair(alice.cert_file, "");
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.status().message().find("needs its key"), std::string::npos) << half.status();

  // A key where the certificate should be, and the other way round.
  auto swapped = ReadKeyPair(alice.key_file, alice.cert_file);
  ASSERT_FALSE(swapped.ok());
  EXPECT_NE(swapped.status().message().find("no PEM certificate"), std::string::npos) << swapped.status();
  auto old = ca.IssueClient("old", -60);
  auto expired = ReadKeyPair(old.cert_file, old.key_file);
  ASSERT_FALSE(expired.ok());
  EXPECT_NE(expired.status().message().find("has expired"), std::string::npos) << expired.status();
  auto not_a_key = ReadKeyPair(alice.cert_file, Write("garbage.key", "hello\n"));
  ASSERT_FALSE(not_a_key.ok());
  EXPECT_NE(not_a_key.status().message().find("no unencrypted PEM private key"), std::string::npos)
      << not_a_key.status();
}

TEST_F(TlsFiles, ChannelCredentials) {
  btx::testing::TestCa ca(dir_, "a");
  grpc::ChannelArguments args;
  EXPECT_TRUE(ChannelCredentials({}, args).ok());
  EXPECT_TRUE(ChannelCredentials({.ca_file = ca.cert_file()}, args).ok());
  auto bad = ChannelCredentials({.ca_file = Write("empty.pem", "")}, args);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("empty.pem"), std::string::npos) << bad.status();
  auto w = ca.IssueClient("w");
  EXPECT_TRUE(ChannelCredentials({.ca_file = ca.cert_file(), .cert_file = w.cert_file, .key_file = w.key_file}, args).ok());
  EXPECT_FALSE(ChannelCredentials({.ca_file = ca.cert_file(), .cert_file = w.cert_file}, args).ok());
  // The system's bundle, which may hold expired roots among the valid ones.
  if (std::filesystem::exists("/etc/ssl/certs/ca-certificates.crt")) {
    EXPECT_TRUE(ReadCertificates("/etc/ssl/certs/ca-certificates.crt").ok());
  }
}

}  // namespace
}  // namespace btx::tls
