// Where btxctl connects, with which token and TLS files. Precedence, highest first: flags (--token-file),
// environment (BTX_SERVER, BTX_TOKEN, BTX_TLS_CA, BTX_TLS_CERT, BTX_TLS_KEY, BTX_TLS_SERVER_NAME,
// BTX_STATE_DIR), the config file (~/.config/btx/config.yaml), defaults. Pure functions over their
// inputs so that the precedence is unit-tested.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "btx/common/tls.h"

namespace btx::cli {

inline constexpr char kDefaultPort[] = "50051";
inline constexpr char kDefaultStateDir[] = ".btx";

// Reads one environment variable; empty optional when unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
EnvLookup ProcessEnv();

struct ConfigFile {
  std::string server{};
  std::string token{};
  std::string state_dir{};
  // Relative paths are taken from the config file's directory.
  std::string tls_ca{}, tls_cert{}, tls_key{}, tls_server_name{};
};

// $BTX_CONFIG, else $XDG_CONFIG_HOME/btx/config.yaml, else $HOME/.config/btx/config.yaml.
std::string ConfigFilePath(const EnvLookup& env);
// YAML mapping with optional keys server, token, state_dir, tls_ca, tls_cert, tls_key and
// tls_server_name. `path` only names the file in errors.
absl::StatusOr<ConfigFile> ParseConfigFile(const std::string& text, const std::string& path);
// Missing file: empty ConfigFile. Unreadable or malformed: an error naming the file.
absl::StatusOr<ConfigFile> LoadConfigFile(const std::string& path);

struct Flags {
  // `{}` throughout: tests name only the flags they set (-Wmissing-field-initializers).
  std::optional<std::string> server{};  // --server
  // A token on argv is visible to every user of the machine (ps, /proc/PID/cmdline): --token is refused and
  // --token-file names a file holding it.
  bool token_on_argv = false;
  std::optional<std::string> token_file{};  // --token-file
  std::optional<std::string> state_dir{};
  std::optional<std::string> tls_ca{}, tls_cert{}, tls_key{}, tls_server_name{};  // --tls-*
};

struct Connection {
  std::string server;       // gRPC target; empty = the embedded stack
  std::string token;        // empty = none
  std::string state_dir;    // for the embedded stack
  std::string server_from;  // "--server", "BTX_SERVER", the config file path, or "" (embedded)
  tls::ClientOptions tls;   // off for the embedded stack, which listens on loopback only
  bool embedded() const { return server.empty(); }
};

// "local" (or "embedded") forces the embedded stack even when the environment names a server.
// TLS settings from the environment or the config file are ignored for the embedded stack; from
// flags they are an error there (most likely --server was forgotten).
absl::StatusOr<Connection> ResolveConnection(const Flags& flags, const EnvLookup& env, const ConfigFile& file,
                                             const std::string& file_path);

// "host" -> "host:50051"; keeps "host:port", "[v6]:port", "unix:..." and "dns:..." targets.
absl::StatusOr<std::string> NormalizeServer(const std::string& server);

}  // namespace btx::cli
