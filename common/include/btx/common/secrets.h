// Credentials a btx process holds, kept from the processes it starts (docs/security.md, "Credentials and
// the jobs a worker runs").
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace btx {

// Environment variables that hold a credential of a btx daemon or client (the worker's and the user's bearer
// tokens, a database connection string and password): never passed on to a child such as btx-train.
// Variables that only name a file (BTX_WORKER_TLS_KEY, a token file) are not secrets themselves.
const std::vector<std::string>& CredentialEnvironmentVariables();

// The value of `name`, taken out of this process's environment: the variable is unset, and the bytes of
// its value are overwritten where they lay, so that /proc/<pid>/environ (the environment the process was
// started with) no longer shows it either. nullopt when unset; an empty value counts as unset. Call it
// from main() before any other thread runs (the environment is not thread-safe).
std::optional<std::string> TakeSecretFromEnvironment(const char* name);

// A token from a file: its one line, without the line end and surrounding blanks. An empty file, more than
// one line, or a blank or control character inside the token is InvalidArgument (the message never quotes
// the file's content). `warning` (when given) is set when the file is readable or writable by users other
// than its owner.
absl::StatusOr<std::string> ReadSecretFile(const std::string& path, std::string* warning = nullptr);

}  // namespace btx
