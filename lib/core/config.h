#pragma once
// The one place for gate's defaults, and where per-user state lives.
//
// Every setting has a default here, may be overridden by an environment variable
// and then by a command-line flag (flag > env > default); the flags and the
// variables are read in apps/gate/options.h, so no library depends on them.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "core/status.h"

namespace gate {

namespace defaults {
inline constexpr const char* kStateDir = "/var/lib/gate";
inline constexpr const char* kBrokerHost = "127.0.0.1";
inline constexpr std::uint16_t kBrokerPort = 8787;
inline constexpr std::int64_t kLeaseMs = 30'000;
inline constexpr std::int64_t kMaxHoldMs = 3'600'000;
inline constexpr std::int64_t kRestoreGraceMs = 10'000;
// How long a mount operation that the kernel runs under inode or directory locks
// (setattr, rename, unlink, create, ...) waits for its lock before failing with EBUSY.
inline constexpr std::int64_t kMetaWaitMs = 1'000;
inline constexpr std::size_t kMaxBodyBytes = 64 * 1024;
inline constexpr std::size_t kMaxKeyBytes = 4096;
}  // namespace defaults

// Where a broker can be reached: a Unix socket when unix_socket is set, else TCP.
struct BrokerEndpoint {
  std::string host = defaults::kBrokerHost;
  std::uint16_t port = defaults::kBrokerPort;
  std::string unix_socket;

  std::string describe() const;  // "127.0.0.1:8787" or "unix:/run/gate.sock"
};

// The state directory to use: the configured one if it is (or can be made)
// writable; otherwise, when it was not chosen explicitly, $XDG_STATE_HOME/gate/broker
// (or ~/.local/state/gate/broker), with a note saying so.
struct StateDir {
  std::string path;
  std::string note;  // empty unless it fell back
};
Result<StateDir> resolve_state_dir(const std::string& configured, bool explicitly_set);

// Directory for per-user state: $XDG_STATE_HOME/gate or ~/.local/state/gate.
std::string user_state_root();

}  // namespace gate
