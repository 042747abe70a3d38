#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "core/iso_time.h"

namespace gate {

namespace {
std::atomic<LogLevel> g_level{LogLevel::Info};
std::mutex g_mutex;
std::FILE* g_out = nullptr;

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::Debug: return "DEBUG";
    case LogLevel::Info: return "INFO";
    case LogLevel::Warn: return "WARN";
    case LogLevel::Error: return "ERROR";
  }
  return "?";
}
}  // namespace

bool parse_log_level(std::string_view text, LogLevel* out) {
  if (text == "debug") *out = LogLevel::Debug;
  else if (text == "info") *out = LogLevel::Info;
  else if (text == "warn" || text == "warning") *out = LogLevel::Warn;
  else if (text == "error") *out = LogLevel::Error;
  else return false;
  return true;
}

void set_log_level(LogLevel level) { g_level = level; }
LogLevel log_level() { return g_level; }

bool set_log_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) return false;
  std::setvbuf(f, nullptr, _IOLBF, 0);
  std::lock_guard lock(g_mutex);
  if (g_out) std::fclose(g_out);
  g_out = f;
  return true;
}

void log_line(LogLevel level, std::string_view component, std::string_view message) {
  std::string line = format_iso8601(wall_clock_micros()) + " " + level_name(level) + " " +
                     std::string(component) + ": " + std::string(message) + "\n";
  std::lock_guard lock(g_mutex);
  std::FILE* out = g_out ? g_out : stderr;
  std::fwrite(line.data(), 1, line.size(), out);
  std::fflush(out);
}

}  // namespace gate
