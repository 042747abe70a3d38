// A VM stack after `gate up`: whether it runs, `gate down`, and `gate clean` after a
// crash (vm_instance.h). Bringing one up is vm_instance.cc.
#include <filesystem>
#include <ostream>

#include "core/mounts.h"
#include "core/process.h"
#include "vm/vm_guest.h"
#include "vm/vm_host.h"
#include "vm/vm_instance.h"

namespace gate::vm {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

SshTarget ssh_target_of(const StackState& s) {
  SshTarget t;
  t.port = static_cast<std::uint16_t>(std::max(0, s.get_int("ssh_port")));
  t.identity = s.get("ssh_key");
  t.known_hosts = s.get("known_hosts");
  return t;
}

bool qemu_running(const StackState& s) { return process_runs(s.get_int("qemu_pid"), "gate-" + s.name); }

std::string vm_liveness(const StackState& s) {
  if (s.mode != "vm") return process_runs(s.broker_pid, s.broker_socket) ? "running" : "stale";
  return qemu_running(s) ? "running" : "stale";
}

bool vm_down(const StackState& s, const DownOptions& o, std::ostream& out, std::ostream& err) {
  const SshTarget ssh = ssh_target_of(s);
  const std::string logs = s.log_dir();
  const bool running = qemu_running(s);
  const bool sshfs = s.get("method") == "sshfs";
  // 1. The host view: the host gate mount releases its locks as it ends.
  if (!o.skip_unmount) {
    if (s.mount_pid > 0) stop_process(s.mount_pid, s.mount, 10s);
    unmount_fuse(s.mount);
  }
  // 2. sshfs: the guest's gate mount releases its locks as it ends. Every edit is in
  // the repository already (virtio-fs), so nothing is copied.
  // Stopping its unit waits for the mount process to end: its hand-back reaches the
  // broker before the guest powers off (else the broker restores a delegation out to a
  // dead mount at the next boot, and holds every key for its restore grace).
  if (sshfs && running)
    run_step(ssh_command(as_root(ssh), std::string("systemctl stop ") + kGuestViewUnit +
                                           " 2>/dev/null; fusermount3 -u " + kGuestView + " 2>/dev/null; true"),
             logs + "/mount.log", 30s);
  // 3. The tunnel.
  stop_process(s.get_int("tunnel_pid"), "ssh", 5s);
  // 4. The guest: ACPI power button, then the hard way.
  if (running) {
    const pid_t pid = s.get_int("qemu_pid");
    out << "gate: shutting the VM down\n" << std::flush;
    if (!qmp_powerdown(s.get("qmp_socket")).ok() ||
        !wait_for_exit(pid, std::chrono::seconds(o.shutdown_timeout_s))) {
      out << "gate: the VM did not power off in " << o.shutdown_timeout_s << " s; stopping qemu\n";
      stop_process(pid, "gate-" + s.name, 5s);
    }
  }
  // virtiofsd ends as its VM does; stopped here if it has not.
  stop_process(s.get_int("virtiofsd_pid"), s.get("virtiofs_socket"), 5s);
  std::error_code ec;
  for (const char* f : {"qemu.pid", "qmp.sock", "broker.sock", "virtiofs.sock"}) fs::remove(s.state_dir() + "/" + f, ec);
  remove_stack_state(s.name);
  return !qemu_running(s) && (o.skip_unmount || !listed_in_mountinfo(s.mount));
}

std::vector<std::string> clean_stack(const StackState& s) {
  std::vector<std::string> did;
  if (mount_state(s.mount) == MountState::Stale && unmount_fuse(s.mount))
    did.push_back("unmounted the dead mount " + s.mount);
  const bool alive = s.mode == "vm" ? qemu_running(s) : process_runs(s.broker_pid, s.broker_socket);
  if (alive) {
    did.push_back("'" + s.name + "' is running; left alone (use 'gate down')");
    return did;
  }
  // The view of a dead setup is dead too, whatever it answers: an sshfs view whose
  // guest is gone keeps reconnecting and answers EIO, not ENOTCONN. Unmounted, its
  // sshfs process ends by itself.
  if (listed_in_mountinfo(s.mount) && !process_runs(s.mount_pid, s.mount) && unmount_fuse(s.mount))
    did.push_back("unmounted the dead mount " + s.mount);
  if (process_runs(s.get_int("tunnel_pid"), "ssh")) {
    stop_process(s.get_int("tunnel_pid"), "ssh", 5s);
    did.push_back("stopped the orphaned tunnel (pid " + s.get("tunnel_pid") + ")");
  }
  if (process_runs(s.mount_pid, s.mount)) {
    stop_process(s.mount_pid, s.mount, 5s);
    did.push_back("stopped the orphaned mount process (pid " + std::to_string(s.mount_pid) + ")");
  }
  if (process_runs(s.get_int("virtiofsd_pid"), s.get("virtiofs_socket"))) {
    stop_process(s.get_int("virtiofsd_pid"), s.get("virtiofs_socket"), 5s);
    did.push_back("stopped the orphaned virtiofsd (pid " + s.get("virtiofsd_pid") + ")");
  }
  if (process_runs(s.broker_pid, s.broker_socket)) stop_process(s.broker_pid, s.broker_socket, 5s);
  std::error_code ec;
  for (const char* f : {"qemu.pid", "qmp.sock", "broker.sock", "virtiofs.sock"})
    if (fs::remove(s.state_dir() + "/" + f, ec)) did.push_back(std::string("removed the dead ") + f);
  remove_stack_state(s.name);
  did.push_back("removed the runtime state of '" + s.name + "'");
  if (fs::is_directory(s.mount, ec) && !fs::is_empty(s.mount, ec) && !listed_in_mountinfo(s.mount))
    did.push_back(s.mount + " is not empty and not a mount point; left alone");
  return did;
}

}  // namespace gate::vm
