#pragma once
// The guest's side of a gate VM as the host sees it (vm_instance.cc brings it up,
// vm_stop.cc stops and cleans up after it). Not for other users.
#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/process.h"
#include "vm/vm_commands.h"

namespace gate::vm {

// The guest's broker unit (vm_image.cc) listens on the default port.
inline constexpr std::uint16_t kGuestBrokerPort = defaults::kBrokerPort;
inline constexpr const char* kGuestRepo = "/home/gate/repo";
inline constexpr const char* kGuestView = "/home/gate/view";
inline constexpr const char* kGuestMountLog = "/home/gate/gate-mount.log";  // the sshfs method's guest mount
// The sshfs method's guest mount runs as this transient unit, ordered after the broker:
// stopping it (gate down, or the guest's shutdown) ends the mount, which hands its locks
// (and a delegation) back, before the broker stops.
inline constexpr const char* kGuestViewUnit = "gate-view.service";

// --verbose (gate up): every command is also shown as it runs.
inline bool g_verbose = false;

inline RunResult run_step(const std::vector<std::string>& argv, const std::string& log,
                          std::chrono::milliseconds timeout) {
  return run_logged(argv, log, timeout, g_verbose ? &std::cout : nullptr);
}

// The sshfs method reaches the guest as its root: the shared repository keeps the host's
// owners, and only root in the guest may act as any of them (the guest's gate mount and
// the sftp server behind sshfs).
inline SshTarget as_root(SshTarget t) {
  t.user = "root";
  return t;
}

}  // namespace gate::vm
