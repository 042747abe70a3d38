#include "core/config.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

namespace gate {

namespace {

bool writable_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (!std::filesystem::is_directory(dir, ec)) return false;
  return ::access(dir.c_str(), W_OK | X_OK) == 0;
}

}  // namespace

std::string BrokerEndpoint::describe() const {
  if (!unix_socket.empty()) return "unix:" + unix_socket;
  return host + ":" + std::to_string(port);
}

std::string user_state_root() {
  if (const char* xdg = std::getenv("XDG_STATE_HOME"); xdg && *xdg)
    return std::string(xdg) + "/gate";
  if (const char* home = std::getenv("HOME"); home && *home)
    return std::string(home) + "/.local/state/gate";
  return "/tmp/gate-" + std::to_string(::getuid());
}

Result<StateDir> resolve_state_dir(const std::string& configured, bool explicitly_set) {
  if (writable_dir(configured)) return StateDir{configured, ""};
  const std::string why = "state directory " + configured + " is not writable";
  if (explicitly_set) return Status::failure(why + "; choose one with --state-dir or GATE_STATE_DIR");
  const std::string fallback = user_state_root() + "/broker";
  if (!writable_dir(fallback))
    return Status::failure(why + ", nor is " + fallback +
                           "; choose one with --state-dir or GATE_STATE_DIR");
  return StateDir{fallback, configured + " is not writable by this user; using " + fallback +
                                " (set --state-dir or GATE_STATE_DIR to choose)"};
}

}  // namespace gate
