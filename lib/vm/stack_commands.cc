#include "vm/stack_commands.h"

namespace gate::vm {

namespace {

void add(std::vector<std::string>& argv, const char* flag, const std::optional<std::int64_t>& v) {
  if (v) argv.insert(argv.end(), {flag, std::to_string(*v)});
}

}  // namespace

std::vector<std::string> broker_lock_flags(const LockSettings& locks) {
  std::vector<std::string> argv;
  add(argv, "--lease-ms", locks.lease_ms);
  add(argv, "--max-hold-ms", locks.max_hold_ms);
  return argv;
}

std::vector<std::string> broker_command(const std::string& gate, const std::string& state_dir,
                                        const std::string& socket, const LockSettings& locks) {
  std::vector<std::string> argv = {gate,   "broker",        "--state-dir", state_dir, "--port",
                                   "0",    "--unix-socket", socket,        "--ready-fd",
                                   "{READY_FD}"};
  for (auto& f : broker_lock_flags(locks)) argv.push_back(std::move(f));
  return argv;
}

std::vector<std::string> mount_command(const MountCommand& m, const LockSettings& locks) {
  std::vector<std::string> argv = {m.gate, "mount", "--root", m.root, "--mount", m.mountpoint};
  if (m.foreground) argv.insert(argv.end(), {"--foreground", "--ready-fd", "{READY_FD}"});
  if (!m.broker_socket.empty())
    argv.insert(argv.end(), {"--broker-socket", m.broker_socket});
  else
    argv.insert(argv.end(), {"--broker-port", std::to_string(m.broker_port)});
  if (!m.log_file.empty()) argv.insert(argv.end(), {"--log-file", m.log_file});
  add(argv, "--lease-ms", locks.lease_ms);
  add(argv, "--max-hold-ms", locks.max_hold_ms);
  add(argv, "--meta-wait-ms", locks.meta_wait_ms);
  add(argv, "--acquire-timeout-ms", locks.acquire_timeout_ms);
  if (locks.no_history) argv.push_back("--no-history");
  if (locks.history_max_file) argv.insert(argv.end(), {"--history-max-file", *locks.history_max_file});
  if (locks.history_max_bytes)
    argv.insert(argv.end(), {"--history-max-bytes", *locks.history_max_bytes});
  if (locks.stale_writes) argv.insert(argv.end(), {"--stale-writes", *locks.stale_writes});
  return argv;
}

}  // namespace gate::vm
