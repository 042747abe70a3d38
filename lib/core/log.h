#pragma once
// One line per event that matters, to stderr (or a file chosen with set_log_file):
//   2026-11-26T16:07:45.123Z INFO broker: listening on 127.0.0.1:8787
// Thread-safe. The level comes from --log-level / GATE_LOG_LEVEL.
#include <sstream>
#include <string>
#include <string_view>

namespace gate {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3 };

bool parse_log_level(std::string_view text, LogLevel* out);
void set_log_level(LogLevel level);
LogLevel log_level();
// Appends to path; returns false (and keeps stderr) when it cannot be opened.
bool set_log_file(const std::string& path);
void log_line(LogLevel level, std::string_view component, std::string_view message);

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

template <typename... Args>
void log(LogLevel level, std::string_view component, Args&&... args) {
  if (level < log_level()) return;
  log_line(level, component, detail::concat(std::forward<Args>(args)...));
}

}  // namespace gate
