// Workers run elsewhere (another directory, another host with the same shared filesystem), so every
// relative path in a pipeline spec is made absolute against the submitter's working directory
// before the spec leaves btxctl.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>


namespace btx::cli {

struct PathContext {
  std::string cwd;   // absolute
  std::string home;  // for "~/..."; empty = leave "~" alone
};

struct RewrittenSpec {
  std::string text;                   // JSON when parsed, else the original text
  bool parsed = false;                // false: not YAML/JSON; the server reports where it breaks
  std::vector<std::string> rewritten; // field paths that changed, e.g. "experts[0].data.train[1]"
  // Every local path in the spec after rewriting: (field path, absolute path). URIs are left out.
  std::vector<std::pair<std::string, std::string>> paths;
  nlohmann::json spec;                // the parsed spec (null when !parsed)
};

// One path: absolute, URIs ("scheme://...") and empty strings stay; "~" and "~/x" use home;
// anything else is joined to cwd and normalised lexically.
std::string AbsolutizePath(const std::string& path, const PathContext& ctx);

// Rewrites seed.model, the tokenizer's file (`tokenizer: PATH` unless "byte", and
// `tokenizer: {sentencepiece: PATH}`), seed.pretrain.data.{train,valid} and
// experts[].data.{train,valid} (each a path or a list of paths). Values of other types are left for
// the scheduler's validation to report.
RewrittenSpec AbsolutizeSpecPaths(const std::string& text, const PathContext& ctx);

}  // namespace btx::cli
