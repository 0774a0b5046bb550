#include "terminal.h"

#include <sys/ioctl.h>
#include <unistd.h>

namespace btx::cli {

bool IsTty(std::FILE* f) { return ::isatty(::fileno(f)) == 1; }

int TerminalWidth(std::FILE* f, int fallback) {
  struct winsize ws {};
  if (::ioctl(::fileno(f), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return fallback;
}

void LiveBlock::Draw(const std::vector<std::string>& lines) {
  std::string s;
  if (!cursor_hidden_) {
    s += "\x1b[?25l";
    cursor_hidden_ = true;
  }
  if (previous_ > 0) s += "\r\x1b[" + std::to_string(previous_) + "A";
  for (const auto& l : lines) s += "\x1b[2K" + l + "\n";
  s += "\x1b[J";  // a shorter block leaves no stale lines below
  previous_ = lines.size();
  std::fwrite(s.data(), 1, s.size(), out_);
  std::fflush(out_);
}

void LiveBlock::Done() {
  if (!cursor_hidden_) return;
  std::fputs("\x1b[?25h", out_);
  std::fflush(out_);
  cursor_hidden_ = false;
}

}  // namespace btx::cli
