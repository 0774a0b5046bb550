// TLS material for gRPC channels, read and checked up front: a wrong path, a key that does not
// belong to its certificate or an expired certificate is reported at start-up with the file's
// name, instead of as an opaque handshake failure on the first call.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace btx::tls {

// PEM text of one or more certificates (a CA bundle). At least one must parse and be valid now.
absl::StatusOr<std::string> ReadCertificates(const std::string& path);

struct KeyPair {
  std::string cert_pem;  // the certificate, optionally followed by its intermediates
  std::string key_pem;
};
// An unencrypted private key and the certificate it belongs to, which must be valid now.
absl::StatusOr<KeyPair> ReadKeyPair(const std::string& cert_path, const std::string& key_path);

// How a client (btx-worker, btxctl) reaches a scheduler. Every member has an initializer, so designated
// initializers may name a subset (-Wextra).
struct ClientOptions {
  std::string ca_file{};    // roots the server certificate must chain to; empty: the system's roots
  std::string cert_file{};  // client certificate for mutual TLS, with key_file
  std::string key_file{};
  std::string server_name{};  // name checked against the server certificate instead of the target host
  // TLS is on as soon as any file is named.
  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// Plaintext credentials when !options.enabled(). A server name override goes into `args`.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(const ClientOptions& options,
                                                                             grpc::ChannelArguments& args);

// Whether a gRPC listen address or target stays on this machine: a loopback IP (127.0.0.0/8,
// ::1), "localhost" or a unix socket. Unparseable hosts, other names and wildcards
// ("0.0.0.0", "[::]", ":50051") are not local.
bool IsLocalAddress(std::string_view address);

}  // namespace btx::tls
