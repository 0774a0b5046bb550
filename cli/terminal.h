// Redrawing a block of lines in place on a terminal (ANSI cursor movement), for the live progress
// display. Only used when stdout is a TTY; otherwise btxctl prints plain lines.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace btx::cli {

bool IsTty(std::FILE* f);
// Columns of the terminal behind f, or `fallback` when it is not one (or reports 0).
int TerminalWidth(std::FILE* f, int fallback = 100);

class LiveBlock {
 public:
  explicit LiveBlock(std::FILE* out) : out_(out) {}
  ~LiveBlock() { Done(); }
  // Replaces the block drawn last (if any) with `lines`. Lines must not wrap (cut them first).
  void Draw(const std::vector<std::string>& lines);
  // Leaves the last block on screen and gives the cursor back.
  void Done();

 private:
  std::FILE* out_;
  size_t previous_ = 0;
  bool cursor_hidden_ = false;
};

}  // namespace btx::cli
