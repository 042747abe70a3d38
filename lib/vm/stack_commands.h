#pragma once
// The one place where a setup's `gate broker` and `gate mount` command lines are
// built, from typed settings: for `gate up --local`, for the host mount of a VM
// setup, and for the broker and mount inside the guest. Pure: no I/O.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gate::vm {

// Lock settings a setup passes on; unset ones keep the daemons' own defaults.
struct LockSettings {
  std::optional<std::int64_t> lease_ms;            // broker and mount
  std::optional<std::int64_t> max_hold_ms;         // broker and mount
  std::optional<std::int64_t> meta_wait_ms;        // mount
  std::optional<std::int64_t> acquire_timeout_ms;  // mount
  // The mount's history of replaced versions (sizes as gate mount takes them).
  bool no_history = false;
  std::optional<std::string> history_max_file, history_max_bytes;
  std::optional<std::string> stale_writes;  // mount: merge, refuse or off
};

// Where a mount finds its broker: a Unix socket, or a TCP port on loopback.
struct MountCommand {
  std::string gate;  // the gate executable
  std::string root, mountpoint;
  std::string broker_socket;  // used when set
  std::uint16_t broker_port = 0;
  bool foreground = true;   // with --ready-fd {READY_FD} (start_daemon fills it in)
  std::string log_file;     // background mounts log here
};

// gate broker on a Unix socket (and an ephemeral TCP port), reporting readiness.
std::vector<std::string> broker_command(const std::string& gate, const std::string& state_dir,
                                        const std::string& socket, const LockSettings& locks);
// The broker flags alone, for a broker started elsewhere (the guest's unit).
std::vector<std::string> broker_lock_flags(const LockSettings& locks);
std::vector<std::string> mount_command(const MountCommand& m, const LockSettings& locks);

}  // namespace gate::vm
