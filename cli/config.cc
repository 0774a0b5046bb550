#include "config.h"

#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <filesystem>

#include "btx/common/fs.h"
#include "btx/common/strings.h"

namespace btx::cli {

EnvLookup ProcessEnv() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

std::string ConfigFilePath(const EnvLookup& env) {
  if (auto p = env("BTX_CONFIG"); p && !p->empty()) return *p;
  if (auto x = env("XDG_CONFIG_HOME"); x && !x->empty()) return *x + "/btx/config.yaml";
  if (auto h = env("HOME"); h && !h->empty()) return *h + "/.config/btx/config.yaml";
  return "";
}

absl::StatusOr<ConfigFile> ParseConfigFile(const std::string& text, const std::string& path) {
  ConfigFile out;
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(Cat("config file ", path, ": not valid YAML at line ", e.mark.line + 1, ": ", e.msg,
                                          " (fix or remove the file)"));
  }
  if (root.IsNull()) return out;
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(Cat("config file ", path, ": expected a mapping with keys such as server: and token:"));
  }
  for (const auto& kv : root) {
    const std::string key = kv.first.Scalar();
    if (!kv.second.IsScalar() && !kv.second.IsNull()) {
      return absl::InvalidArgumentError(Cat("config file ", path, ": ", key, ": expected a string"));
    }
    const std::string value = kv.second.IsNull() ? "" : kv.second.Scalar();
    if (key == "server") {
      out.server = value;
    } else if (key == "token") {
      out.token = value;
    } else if (key == "state_dir") {
      out.state_dir = value;
    } else if (key == "tls_ca") {
      out.tls_ca = value;
    } else if (key == "tls_cert") {
      out.tls_cert = value;
    } else if (key == "tls_key") {
      out.tls_key = value;
    } else if (key == "tls_server_name") {
      out.tls_server_name = value;
    } else {
      return absl::InvalidArgumentError(Cat("config file ", path, ": unknown key '", key,
                                            "'; expected server, token, state_dir, tls_ca, tls_cert, tls_key or "
                                            "tls_server_name"));
    }
  }
  return out;
}

absl::StatusOr<ConfigFile> LoadConfigFile(const std::string& path) {
  if (path.empty()) return ConfigFile{};
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return ConfigFile{};
  auto text = ReadFile(path, 1 << 20);
  if (!text.ok()) return absl::InvalidArgumentError(Cat("config file ", path, ": ", text.status().message()));
  return ParseConfigFile(*text, path);
}

absl::StatusOr<std::string> NormalizeServer(const std::string& server) {
  if (server.rfind("unix:", 0) == 0 || server.rfind("dns:", 0) == 0 || server.rfind("ipv4:", 0) == 0 ||
      server.rfind("ipv6:", 0) == 0) {
    return server;
  }
  if (server.find("://") != std::string::npos) {
    return absl::InvalidArgumentError(
        Cat("server '", server, "': expected HOST:PORT (no scheme), e.g. 127.0.0.1:", kDefaultPort));
  }
  if (server.find_first_of(" \t\n") != std::string::npos) {
    return absl::InvalidArgumentError(Cat("server '", server, "': expected HOST:PORT without spaces"));
  }
  if (!server.empty() && server.front() == '[') {  // [v6] or [v6]:port
    const auto close = server.find(']');
    if (close == std::string::npos) return absl::InvalidArgumentError(Cat("server '", server, "': unbalanced '['"));
    return close + 1 == server.size() ? Cat(server, ":", kDefaultPort) : server;
  }
  const auto colon = server.rfind(':');
  if (colon == std::string::npos) return Cat(server, ":", kDefaultPort);
  const std::string port = server.substr(colon + 1);
  if (colon == 0 || port.empty() || port.find_first_not_of("0123456789") != std::string::npos || port.size() > 5 ||
      std::stoi(port) > 65535) {
    return absl::InvalidArgumentError(Cat("server '", server, "': expected HOST:PORT with a port in 1..65535"));
  }
  return server;
}

absl::StatusOr<Connection> ResolveConnection(const Flags& flags, const EnvLookup& env, const ConfigFile& file,
                                             const std::string& file_path) {
  Connection c;
  std::string server;
  if (flags.server) {
    server = *flags.server, c.server_from = "--server";
  } else if (auto e = env("BTX_SERVER"); e && !e->empty()) {
    server = *e, c.server_from = "BTX_SERVER";
  } else if (!file.server.empty()) {
    server = file.server, c.server_from = file_path;
  }
  if (server == "local" || server == "embedded" || server.empty()) {
    c.server_from.clear();
  } else {
    auto normalized = NormalizeServer(server);
    if (!normalized.ok()) {
      return absl::InvalidArgumentError(Cat(normalized.status().message(), " (from ", c.server_from, ")"));
    }
    c.server = *normalized;
  }
  if (flags.token_on_argv) {
    return absl::InvalidArgumentError(
        "--token: a token on the command line is visible to every user of this machine (ps, /proc/PID/cmdline); "
        "use --token-file PATH, the BTX_TOKEN environment variable or token: in the config file");
  }
  if (flags.token_file) {
    auto text = ReadFile(*flags.token_file, 64 << 10);
    if (!text.ok()) return absl::InvalidArgumentError(Cat("--token-file ", *flags.token_file, ": ", text.status().message()));
    c.token = *text;
  } else if (auto e = env("BTX_TOKEN"); e && !e->empty()) {
    c.token = *e;
  } else {
    c.token = file.token;
  }
  while (!c.token.empty() && (c.token.back() == '\n' || c.token.back() == '\r' || c.token.back() == ' ')) c.token.pop_back();
  for (char ch : c.token) {
    if (ch < 0x21 || ch > 0x7e) {
      return absl::InvalidArgumentError("token: expected printable ASCII without spaces (check --token-file, BTX_TOKEN or the config file)");
    }
  }
  if (c.embedded()) {
    for (const auto& [flag, value] : {std::pair{"--tls-ca", &flags.tls_ca}, {"--tls-cert", &flags.tls_cert},
                                      {"--tls-key", &flags.tls_key}, {"--tls-server-name", &flags.tls_server_name}}) {
      if (*value) {
        return absl::InvalidArgumentError(Cat(flag, " is for a remote scheduler, but no --server (or BTX_SERVER) names one; "
                                              "the embedded scheduler runs in this process"));
      }
    }
  } else {
    // A relative path in the config file means the file's own directory, wherever btxctl runs.
    const std::filesystem::path file_dir = std::filesystem::path(file_path).parent_path();
    auto pick = [&](const std::optional<std::string>& flag, const char* env_name, const std::string& from_file,
                    bool is_path) -> std::string {
      if (flag) return *flag;
      if (auto e = env(env_name); e && !e->empty()) return *e;
      if (is_path && !from_file.empty() && std::filesystem::path(from_file).is_relative() && !file_dir.empty()) {
        return (file_dir / from_file).string();
      }
      return from_file;
    };
    c.tls.ca_file = pick(flags.tls_ca, "BTX_TLS_CA", file.tls_ca, true);
    c.tls.cert_file = pick(flags.tls_cert, "BTX_TLS_CERT", file.tls_cert, true);
    c.tls.key_file = pick(flags.tls_key, "BTX_TLS_KEY", file.tls_key, true);
    c.tls.server_name = pick(flags.tls_server_name, "BTX_TLS_SERVER_NAME", file.tls_server_name, false);
    if (!c.tls.server_name.empty() && !c.tls.enabled()) {
      return absl::InvalidArgumentError("--tls-server-name needs TLS: give --tls-ca (or BTX_TLS_CA, or tls_ca: in the config file)");
    }
  }
  if (flags.state_dir) {
    c.state_dir = *flags.state_dir;
  } else if (auto e = env("BTX_STATE_DIR"); e && !e->empty()) {
    c.state_dir = *e;
  } else if (!file.state_dir.empty()) {
    c.state_dir = file.state_dir;
  } else {
    c.state_dir = kDefaultStateDir;
  }
  if (c.state_dir.empty()) return absl::InvalidArgumentError("--state-dir: expected a directory, got ''");
  return c;
}

}  // namespace btx::cli
