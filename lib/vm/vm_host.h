#pragma once
// Facts about the host that the VM commands depend on: free ports, whether KVM really works, gate's own SSH key, and
// talking to a running qemu over QMP.
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "core/mounts.h"
#include "core/status.h"
#include "vm/vm_commands.h"

namespace gate::vm {

// A loopback TCP port nobody listens on now (0 if none could be found).
std::uint16_t free_tcp_port();
bool tcp_port_free(std::uint16_t port);

// KVM only when a vCPU really starts: /dev/kvm existing is not enough.
// probe runs a command and tells whether it kept running (true) or failed.
struct AccelChoice {
  Accel accel = Accel::Tcg;
  std::string reason;  // one line for the user
};
AccelChoice choose_accel(const std::string& requested,  // auto | kvm | tcg
                         const std::function<Status()>& kvm_works);
// The real probe: starts qemu with -accel kvm -cpu host, paused, for a moment.
Status kvm_usable();

// gate's own key pair in <state root>/ssh/id_ed25519[.pub], made once.
// Returns the private key path.
Result<std::string> ensure_gate_ssh_key();

// Asks the guest to shut down (ACPI power button) through qemu's QMP socket.
Status qmp_powerdown(const std::string& qmp_socket);

}  // namespace gate::vm
