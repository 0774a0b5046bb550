// Who may call what on the scheduler (docs/security.md).
//
// Authentication finds the caller's principal: a bearer token listed in the identities file
// (--tokens-file), or else a client certificate verified against --tls-client-ca and listed there. Authorisation is
// one table from method to the roles allowed to call it (Authorize). Both run in the TLS
// credentials' metadata processor, before any handler, so a refused call changes nothing.
// Without TLS there is no authentication at all, which CheckSecurity allows only on loopback.
#pragma once

#include <grpcpp/security/auth_context.h>
#include <grpcpp/security/server_credentials.h>

#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace btx::scheduler {

enum class Role {
  kUser,    // PipelineService: submit, follow, cancel, retry
  kWorker,  // WorkerService: register, lease jobs, report them
  kAdmin,   // both
};
const char* RoleName(Role role);

struct Principal {
  Role role = Role::kUser;
  std::string name;  // from the identities file, or the certificate's common name
};

// The identities file: one identity per line, "CREDENTIAL ROLE NAME", # starts a comment.
//   sha256:<64 hex digits>  user    alice        a bearer token, stored as the SHA-256 of its text
//   cert:<common name>      worker  gpu-node-1   a client certificate, by its common name
// Roles: user, worker, admin. A verified client certificate without a cert: line has no role at
// all (UNAUTHENTICATED): workers are listed, never implied by the CA's signature.
// Fields are separated by blanks, so a common name given here cannot contain one.
struct TokenIdentity {
  std::array<unsigned char, 32> sha256{};
  Role role = Role::kUser;
  std::string name;
};
struct CertIdentity {
  std::string common_name;
  Role role = Role::kWorker;
  std::string name;
};
struct Identities {
  std::vector<TokenIdentity> tokens;
  std::vector<CertIdentity> certs;
};
// `path` only names the file in errors, which give the line number and never echo a credential.
absl::StatusOr<Identities> ParseIdentities(std::string_view text, const std::string& path);
absl::StatusOr<Identities> LoadIdentities(const std::string& path);
// "sha256:<hex>" of a token: what its line in the identities file starts with.
std::string TokenDigest(std::string_view token);

struct SecurityConfig {
  std::string cert_pem{}, key_pem{};  // serve TLS with this certificate (chain) and key
  std::string client_ca_pem{};        // request client certificates and verify them against these roots
  Identities identities{};
  // Serve without TLS, or without authentication, on an address other machines can reach.
  bool allow_insecure_remote = false;

  bool tls() const { return !cert_pem.empty(); }
  bool authenticates() const { return tls() && (!client_ca_pem.empty() || !identities.tokens.empty()); }
};

// Refuses contradictory settings (tokens or client certificates without TLS) and, unless
// allow_insecure_remote, serving plaintext or unauthenticated on a non-loopback address.
absl::Status CheckSecurity(const std::string& listen, const SecurityConfig& security);
// What to warn about at start-up; empty when the API is served with TLS and authentication.
std::string InsecurityWarning(const std::string& listen, const SecurityConfig& security);

class Authenticator {
 public:
  explicit Authenticator(Identities identities) : identities_(std::move(identities)) {}
  // `authorization`: every value of the call's "authorization" header. `cert_name`: the common
  // name of a client certificate the handshake verified, empty without one. A token, when sent,
  // decides; a bad one is refused even if a good certificate came with it.
  absl::StatusOr<Principal> Authenticate(const std::vector<std::string_view>& authorization,
                                         std::string_view cert_name) const;

 private:
  Identities identities_;
};

// The one authorisation table. `method` is the full gRPC method ("/btx.v1.WorkerService/Register"),
// `who` what Authenticate returned. OK, or UNAUTHENTICATED (credentials missing or invalid where the
// method needs them), or PERMISSION_DENIED (a valid principal whose role may not call it).
absl::Status Authorize(std::string_view method, const absl::StatusOr<Principal>& who);

// Told of every call refused by Authorize, with its full method and code (for a metric).
using RefusalObserver = std::function<void(std::string_view method, grpc::StatusCode code)>;

// The name of the client certificate the handshake verified (common name, else first SAN); empty without.
// With a call's "authorization" values it is what Authenticator::Authenticate takes.
std::string CertNameOf(const grpc::AuthContext* context);

// Plaintext, TLS or mutual TLS server credentials; when `security.authenticates()`, every call
// passes Authenticate and Authorize before it reaches a handler. Expects CheckSecurity to pass.
std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const SecurityConfig& security,
                                                               RefusalObserver on_refused = {});

}  // namespace btx::scheduler
