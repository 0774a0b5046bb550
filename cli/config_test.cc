#include "config.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

namespace btx::cli {
namespace {

// A file holding `token`, removed when the test's process ends.
std::string TokenFile(const std::string& token) {
  static int n = 0;
  const auto path = std::filesystem::temp_directory_path() / ("btx-token-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
  std::ofstream(path) << token;
  return path.string();
}

EnvLookup FakeEnv(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

TEST(ConfigTest, FlagBeatsEnvironmentBeatsFile) {
  ConfigFile file{.server = "file-host:1", .token = "file-token", .state_dir = "/file/state"};
  auto env = FakeEnv({{"BTX_SERVER", "env-host:2"}, {"BTX_TOKEN", "env-token"}, {"BTX_STATE_DIR", "/env/state"}});
  Flags flags{.server = "flag-host:3", .token_file = TokenFile("flag-token"), .state_dir = "/flag/state"};
  auto c = ResolveConnection(flags, env, file, "cfg.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server, "flag-host:3");
  EXPECT_EQ(c->token, "flag-token");
  EXPECT_EQ(c->state_dir, "/flag/state");
  EXPECT_EQ(c->server_from, "--server");

  c = ResolveConnection({}, env, file, "cfg.yaml");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->server, "env-host:2");
  EXPECT_EQ(c->token, "env-token");
  EXPECT_EQ(c->state_dir, "/env/state");
  EXPECT_EQ(c->server_from, "BTX_SERVER");

  c = ResolveConnection({}, FakeEnv({}), file, "cfg.yaml");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->server, "file-host:1");
  EXPECT_EQ(c->token, "file-token");
  EXPECT_EQ(c->state_dir, "/file/state");
  EXPECT_EQ(c->server_from, "cfg.yaml");
}

TEST(ConfigTest, NothingConfiguredMeansEmbeddedWithDefaultStateDir) {
  auto c = ResolveConnection({}, FakeEnv({}), {}, "");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->embedded());
  EXPECT_EQ(c->state_dir, ".btx");
  EXPECT_EQ(c->token, "");
}

TEST(ConfigTest, LocalForcesEmbeddedOverEnvironment) {
  auto c = ResolveConnection({.server = "local"}, FakeEnv({{"BTX_SERVER", "h:1"}}), {}, "");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->embedded());
}

TEST(ConfigTest, EmptyEnvironmentVariablesCountAsUnset) {
  auto c = ResolveConnection({}, FakeEnv({{"BTX_SERVER", ""}, {"BTX_TOKEN", ""}}), {.server = "f:9", .token = "t"}, "x");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->server, "f:9");
  EXPECT_EQ(c->token, "t");
}

TEST(ConfigTest, ServerGetsDefaultPortAndBadOnesAreRejected) {
  EXPECT_EQ(*NormalizeServer("sched"), "sched:50051");
  EXPECT_EQ(*NormalizeServer("10.0.0.1:7000"), "10.0.0.1:7000");
  EXPECT_EQ(*NormalizeServer("[::1]"), "[::1]:50051");
  EXPECT_EQ(*NormalizeServer("[::1]:9"), "[::1]:9");
  EXPECT_EQ(*NormalizeServer("unix:/run/btx.sock"), "unix:/run/btx.sock");
  EXPECT_FALSE(NormalizeServer("http://sched:1").ok());
  EXPECT_FALSE(NormalizeServer("sched:99999").ok());
  EXPECT_FALSE(NormalizeServer("sched:").ok());
  auto c = ResolveConnection({}, FakeEnv({{"BTX_SERVER", "http://x"}}), {}, "");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("BTX_SERVER"), std::string::npos) << c.status();
}

TEST(ConfigTest, TokenTrailingNewlineIsDroppedAndSpacesRefused) {
  auto c = ResolveConnection({.token_file = TokenFile("abc\n")}, FakeEnv({}), {}, "");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->token, "abc");
  EXPECT_FALSE(ResolveConnection({.token_file = TokenFile("a b")}, FakeEnv({}), {}, "").ok());
}

TEST(ConfigTest, ATokenOnTheCommandLineIsRefusedAndAMissingTokenFileNamed) {
  auto c = ResolveConnection({.token_on_argv = true}, FakeEnv({{"BTX_TOKEN", "t"}}), {}, "");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("visible to every user"), std::string::npos) << c.status();
  EXPECT_NE(std::string(c.status().message()).find("--token-file"), std::string::npos) << c.status();
  c = ResolveConnection({.token_file = "/nonexistent/btx-token"}, FakeEnv({}), {}, "");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("--token-file /nonexistent/btx-token"), std::string::npos) << c.status();
}

TEST(ConfigTest, ConfigFileParsing) {
  auto f = ParseConfigFile("server: sched:1\ntoken: s3cret\n", "c.yaml");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->server, "sched:1");
  EXPECT_EQ(f->token, "s3cret");
  EXPECT_TRUE(ParseConfigFile("", "c.yaml").ok());
  auto unknown = ParseConfigFile("sever: x\n", "c.yaml");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(std::string(unknown.status().message()).find("c.yaml: unknown key 'sever'"), std::string::npos);
  EXPECT_FALSE(ParseConfigFile("- a\n- b\n", "c.yaml").ok());
  EXPECT_FALSE(ParseConfigFile("server: [a\n", "c.yaml").ok());
}

TEST(ConfigTest, TlsFilesFollowTheSamePrecedence) {
  ConfigFile file{.server = "h:1", .tls_ca = "ca.pem", .tls_cert = "/abs/me.pem", .tls_key = "keys/me.key",
                  .tls_server_name = "sched.internal"};
  auto c = ResolveConnection({}, FakeEnv({}), file, "/home/u/.config/btx/config.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  // Relative paths in the file are relative to the file.
  EXPECT_EQ(c->tls.ca_file, "/home/u/.config/btx/ca.pem");
  EXPECT_EQ(c->tls.cert_file, "/abs/me.pem");
  EXPECT_EQ(c->tls.key_file, "/home/u/.config/btx/keys/me.key");
  EXPECT_EQ(c->tls.server_name, "sched.internal");
  c = ResolveConnection({.tls_ca = "flag-ca.pem"}, FakeEnv({{"BTX_TLS_CA", "env-ca.pem"}, {"BTX_TLS_KEY", "env.key"}}),
                        file, "/c/config.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->tls.ca_file, "flag-ca.pem");  // flags and the environment are relative to the working directory
  EXPECT_EQ(c->tls.key_file, "env.key");
  EXPECT_TRUE(c->tls.enabled());
  c = ResolveConnection({.server = "h:1"}, FakeEnv({}), {}, "");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->tls.enabled());
}

TEST(ConfigTest, TlsIsForRemoteSchedulersOnly) {
  // From the environment or the config file: ignored by the embedded stack.
  auto c = ResolveConnection({.server = "local"}, FakeEnv({{"BTX_TLS_CA", "ca.pem"}}), {.tls_cert = "c.pem"}, "f");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->tls.enabled());
  // As a flag: most likely a forgotten --server.
  c = ResolveConnection({.tls_ca = "ca.pem"}, FakeEnv({}), {}, "");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("--tls-ca is for a remote scheduler"), std::string::npos)
      << c.status();
  c = ResolveConnection({.server = "h:1", .tls_server_name = "x"}, FakeEnv({}), {}, "");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("needs TLS"), std::string::npos) << c.status();
  auto f = ParseConfigFile("server: s:1\ntls_ca: ca.pem\ntls_cert: c.pem\ntls_key: c.key\ntls_server_name: s\n", "c.yaml");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->tls_ca, "ca.pem");
  EXPECT_EQ(f->tls_key, "c.key");
  EXPECT_EQ(f->tls_server_name, "s");
}

TEST(ConfigTest, ConfigFilePathFollowsXdg) {
  EXPECT_EQ(ConfigFilePath(FakeEnv({{"HOME", "/home/u"}})), "/home/u/.config/btx/config.yaml");
  EXPECT_EQ(ConfigFilePath(FakeEnv({{"HOME", "/home/u"}, {"XDG_CONFIG_HOME", "/x"}})), "/x/btx/config.yaml");
  EXPECT_EQ(ConfigFilePath(FakeEnv({{"BTX_CONFIG", "/etc/btx.yaml"}, {"HOME", "/h"}})), "/etc/btx.yaml");
  EXPECT_TRUE(LoadConfigFile("/nonexistent/btx/config.yaml").value().server.empty());
}

}  // namespace
}  // namespace btx::cli
