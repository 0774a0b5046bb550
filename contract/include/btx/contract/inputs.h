// The files a job reads that the user named (seed and model dirs, tokenizer files, data), and the checks a
// submitting side can run on them before any job trains: a seed without weights or a data path that is a FIFO
// is a mistake to report at submit, naming the field, not an hour into the pipeline.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "btx/contract/job.h"

namespace btx::contract {

enum class InputKind { kModelDir, kTokenizer, kData };

struct Input {
  std::string field;  // the spec's field path, e.g. "data.train[1]"
  std::string path;
  InputKind kind;
};

// The user-named inputs of a job, in spec order. Parents' artifacts ({"$artifact": ...}) and URIs are not
// included: they are verified by manifest when the job starts.
std::vector<Input> InputsOf(const JobSpec& spec);

// Why the input cannot be used, when this machine can see it; nullopt when it looks usable or is not here
// (the worker's filesystem may differ: btx-train reports it then). Reads at most a few small files.
std::optional<std::string> CheckInput(const Input& input);

// Whether `path` (absolute) lies under one of `roots` (absolute, normalised), both lexically and, where it
// exists, after resolving symlinks; the reason when it does not. No roots: everything is allowed.
std::optional<std::string> CheckUnderRoots(const std::string& path, const std::vector<std::string>& roots);

}  // namespace btx::contract
