#include "btx/scheduler/auth.h"

#include <grpcpp/security/auth_metadata_processor.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <cctype>
#include <set>

#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "btx/common/tls.h"
#include "btx/rpc_status.h"

namespace btx::scheduler {
namespace {

using Digest = std::array<unsigned char, 32>;

Digest Sha256(std::string_view text) {
  Digest d;
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), d.data());
  return d;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool ParseDigest(std::string_view hex, Digest& out) {
  if (hex.size() != 64) return false;
  for (size_t i = 0; i < 32; ++i) {
    const int hi = HexValue(hex[2 * i]), lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return true;
}

bool ParseRole(std::string_view s, Role& role) {
  if (s == "user") role = Role::kUser;
  else if (s == "worker") role = Role::kWorker;
  else if (s == "admin") role = Role::kAdmin;
  else return false;
  return true;
}

bool StartsWithNoCase(std::string_view s, std::string_view prefix) {
  if (s.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(s[i])) != prefix[i]) return false;
  }
  return true;
}

// Where the metadata processor leaves the authenticated principal for the handlers.

struct Rule {
  std::string_view prefix;  // of the full method name
  bool anyone;              // no credentials needed
  bool user, worker, admin;
};

// Everything not listed is for admins only (and unknown methods then answer UNIMPLEMENTED).
constexpr Rule kRules[] = {
    // Probes (load balancers, Kubernetes) carry no credentials; health reveals nothing else.
    {"/grpc.health.v1.Health/", true, true, true, true},
    {"/btx.v1.PipelineService/", false, true, false, true},
    {"/btx.v1.WorkerService/", false, false, true, true},
    {"/grpc.reflection.", false, true, true, true},
};

std::string AllowedRoles(const Rule& r) {
  std::vector<std::string> roles;
  if (r.user) roles.push_back("user");
  if (r.worker) roles.push_back("worker");
  if (r.admin) roles.push_back("admin");
  std::string out;
  for (size_t i = 0; i < roles.size(); ++i) out += (i == 0 ? "" : i + 1 == roles.size() ? " or " : ", ") + roles[i];
  return out;
}

// The name a verified client certificate goes by: its common name, else its first subject
// alternative name (certificates from some issuers carry only SANs).
std::string CertName(const grpc::AuthContext& context) {
  for (const char* property : {"x509_common_name", "x509_subject_alternative_name"}) {
    auto values = context.FindPropertyValues(property);
    if (!values.empty()) return std::string(values.front().data(), values.front().size());
  }
  return "";
}

class AuthProcessor final : public grpc::AuthMetadataProcessor {
 public:
  AuthProcessor(Identities identities, RefusalObserver on_refused)
      : authenticator_(std::move(identities)), on_refused_(std::move(on_refused)) {}
  // Hashing a token and a table look-up: cheap enough for the transport thread.
  bool IsBlocking() const override { return false; }

  grpc::Status Process(const InputMetadata& metadata, grpc::AuthContext* context, OutputMetadata* consumed,
                       OutputMetadata*) override {
    std::string_view method;
    std::vector<std::string_view> authorization;
    for (const auto& [key, value] : metadata) {
      const std::string_view k(key.data(), key.size()), v(value.data(), value.size());
      if (k == ":path") method = v;
      else if (k == "authorization") authorization.push_back(v);
    }
    const absl::StatusOr<Principal> who = authenticator_.Authenticate(authorization, CertName(*context));
    const absl::Status allowed = Authorize(method, who);
    // Nothing is recorded in `context`: gRPC shares it between every call of the connection. Handlers that
    // need the caller authenticate the call's own metadata again (CallerOf in services.cc), so the
    // authorization header is left to them.
    (void)consumed;
    grpc::Status status = ToGrpcStatus(allowed);
    if (!status.ok() && on_refused_) on_refused_(method, status.error_code());
    return status;
  }

 private:
  Authenticator authenticator_;
  RefusalObserver on_refused_;
};

}  // namespace

const char* RoleName(Role role) {
  switch (role) {
    case Role::kUser: return "user";
    case Role::kWorker: return "worker";
    case Role::kAdmin: return "admin";
  }
  return "?";
}

std::string TokenDigest(std::string_view token) {
  const Digest d = Sha256(token);
  return "sha256:" + HexLower(d.data(), d.size());
}

absl::StatusOr<Identities> ParseIdentities(std::string_view text, const std::string& path) {
  Identities out;
  std::set<Digest> digests;
  std::set<std::string> cert_names;
  const auto lines = Split(text, '\n');
  for (size_t n = 0; n < lines.size(); ++n) {
    std::string line = lines[n];
    if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::vector<std::string> fields;
    std::string field;
    for (char c : line + " ") {
      if (c == ' ' || c == '\t' || c == '\r') {
        if (!field.empty()) fields.push_back(std::move(field));
        field.clear();
      } else {
        field.push_back(c);
      }
    }
    if (fields.empty()) continue;
    const std::string where = Cat(path, ":", n + 1, ": ");
    if (fields.size() != 3) {
      return absl::InvalidArgumentError(
          Cat(where, "expected 'sha256:<hex> ROLE NAME' or 'cert:<common name> ROLE NAME', got ", fields.size(), " fields"));
    }
    Role role;
    if (!ParseRole(fields[1], role)) {
      return absl::InvalidArgumentError(Cat(where, "role '", fields[1], "': expected user, worker or admin"));
    }
    const std::string& credential = fields[0];
    if (credential.rfind("sha256:", 0) == 0) {
      TokenIdentity id{.role = role, .name = fields[2]};
      if (!ParseDigest(std::string_view(credential).substr(7), id.sha256)) {
        return absl::InvalidArgumentError(Cat(where, "expected sha256: and 64 hex digits"));
      }
      if (!digests.insert(id.sha256).second) {
        return absl::InvalidArgumentError(Cat(where, "the same token is listed twice"));
      }
      out.tokens.push_back(std::move(id));
    } else if (credential.rfind("cert:", 0) == 0 && credential.size() > 5) {
      CertIdentity id{.common_name = credential.substr(5), .role = role, .name = fields[2]};
      if (!cert_names.insert(id.common_name).second) {
        return absl::InvalidArgumentError(Cat(where, "certificate '", id.common_name, "' is listed twice"));
      }
      out.certs.push_back(std::move(id));
    } else {
      // Never echo the field: it may be a token pasted in by mistake.
      return absl::InvalidArgumentError(
          Cat(where, "expected sha256:<hex> (the SHA-256 of a token, never the token itself: "
                     "printf %s \"$TOKEN\" | sha256sum) or cert:<common name>"));
    }
  }
  return out;
}

absl::StatusOr<Identities> LoadIdentities(const std::string& path) {
  auto text = ReadFile(path, 16 << 20);
  if (!text.ok()) return absl::InvalidArgumentError(Cat("tokens file ", path, ": ", text.status().message()));
  return ParseIdentities(*text, path);
}

absl::Status CheckSecurity(const std::string& listen, const SecurityConfig& s) {
  if (s.cert_pem.empty() != s.key_pem.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!s.tls() && !s.client_ca_pem.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are sent only over TLS");
  }
  if (!s.tls() && !s.identities.tokens.empty()) {
    return absl::InvalidArgumentError(
        "--tokens-file needs --tls-cert and --tls-key: bearer tokens must not cross the network in plain text");
  }
  if (!s.identities.certs.empty() && s.client_ca_pem.empty()) {
    return absl::InvalidArgumentError(
        "the tokens file gives roles to client certificates (cert: lines), but there is no --tls-client-ca to verify them");
  }
  if (!tls::IsLocalAddress(listen) && !s.authenticates() && !s.allow_insecure_remote) {
    const char* fix = s.tls() ? "give --tokens-file and/or --tls-client-ca"
                              : "give --tls-cert and --tls-key with --tokens-file and/or --tls-client-ca";
    return absl::FailedPreconditionError(Cat("refusing to serve ", s.tls() ? "TLS" : "plaintext gRPC",
                                             " without authentication on ", listen, ", which other machines can reach: ",
                                             fix, ", or listen on 127.0.0.1, or pass --allow-insecure-remote to take the risk"));
  }
  return absl::OkStatus();
}

std::string InsecurityWarning(const std::string& listen, const SecurityConfig& s) {
  if (s.authenticates()) return "";
  const std::string reach = tls::IsLocalAddress(listen)
                                ? "anyone on this machine"
                                : "ANYONE WHO CAN REACH THIS ADDRESS (--allow-insecure-remote)";
  return Cat(s.tls() ? "TLS without client authentication" : "INSECURE: plaintext gRPC without authentication", " on ",
             listen, ": ", reach,
             " can submit and cancel pipelines and act as a worker; see docs/security.md for --tls-cert, --tls-key, "
             "--tls-client-ca and --tokens-file");
}

absl::StatusOr<Principal> Authenticator::Authenticate(const std::vector<std::string_view>& authorization,
                                                      std::string_view cert_name) const {
  if (authorization.size() > 1) return absl::UnauthenticatedError("more than one authorization header");
  if (authorization.size() == 1) {
    std::string_view value = authorization.front();
    if (!StartsWithNoCase(value, "bearer ")) {
      return absl::UnauthenticatedError("authorization header: expected 'Bearer <token>'");
    }
    value.remove_prefix(7);
    while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    while (!value.empty() && value.back() == ' ') value.remove_suffix(1);
    if (value.empty()) return absl::UnauthenticatedError("empty bearer token");
    if (identities_.tokens.empty()) {
      return absl::UnauthenticatedError("this scheduler accepts no bearer tokens (it was started without --tokens-file)");
    }
    // Every entry is compared, in constant time, so the timing tells nothing about the table.
    const Digest digest = Sha256(value);
    const TokenIdentity* match = nullptr;
    for (const auto& t : identities_.tokens) {
      if (CRYPTO_memcmp(t.sha256.data(), digest.data(), digest.size()) == 0) match = &t;
    }
    if (match == nullptr) return absl::UnauthenticatedError("invalid bearer token");
    return Principal{match->role, match->name};
  }
  if (!cert_name.empty()) {
    for (const auto& c : identities_.certs) {
      if (c.common_name == cert_name) return Principal{c.role, c.name};
    }
    // A certificate the CA signed is not a role by itself: only cert: lines give one. The name is
    // not echoed in full (it came from the client).
    return absl::UnauthenticatedError(
        Cat("client certificate '", cert_name.substr(0, 64),
            "' is not listed in the identities file (add a 'cert:<common name> worker NAME' line to --tokens-file)"));
  }
  return absl::UnauthenticatedError("no credentials: send a bearer token or a client certificate");
}

absl::Status Authorize(std::string_view method, const absl::StatusOr<Principal>& who) {
  static constexpr Rule kAdminOnly{"", false, false, false, true};
  const Rule* rule = &kAdminOnly;
  for (const auto& r : kRules) {
    if (method.substr(0, r.prefix.size()) == r.prefix) {
      rule = &r;
      break;
    }
  }
  if (rule->anyone) return absl::OkStatus();
  if (!who.ok()) return who.status();
  const bool allowed = who->role == Role::kAdmin ? rule->admin : who->role == Role::kWorker ? rule->worker : rule->user;
  if (allowed) return absl::OkStatus();
  return absl::PermissionDeniedError(Cat(RoleName(who->role), " '", who->name, "' may not call ", method, " (allowed: ",
                                         AllowedRoles(*rule), ")"));
}

std::string CertNameOf(const grpc::AuthContext* context) { return context == nullptr ? "" : CertName(*context); }

std::shared_ptr<grpc::ServerCredentials> MakeServerCredentials(const SecurityConfig& security,
                                                               RefusalObserver on_refused) {
  if (!security.tls()) return grpc::InsecureServerCredentials();
  // REQUEST (not REQUIRE) a certificate: a user with only a token still gets through the
  // handshake, and Authorize decides. A certificate that is sent must verify, or no handshake.
  grpc::SslServerCredentialsOptions options(security.client_ca_pem.empty()
                                                ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                                : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = security.client_ca_pem;
  options.pem_key_cert_pairs.push_back({security.key_pem, security.cert_pem});
  auto credentials = grpc::SslServerCredentials(options);
  if (security.authenticates()) {
    credentials->SetAuthMetadataProcessor(std::make_shared<AuthProcessor>(security.identities, std::move(on_refused)));
  }
  return credentials;
}

}  // namespace btx::scheduler
