#pragma once
// The command lines gate runs to drive a VM: qemu, ssh (commands, the broker
// tunnel), virtiofsd and sshfs. Pure functions of their settings, so that they can be
// tested without a VM and shown by `gate up --dry-run`.
#include <cstdint>
#include <string>
#include <vector>

#include "core/process.h"

namespace gate::vm {

enum class Accel { Kvm, Tcg };

struct QemuConfig {
  std::string name;
  Accel accel = Accel::Tcg;
  int memory_mib = 1024;
  int cpus = 2;
  std::string kernel, initrd;  // empty: the firmware boots the disk (a cloud image)
  std::string disk;       // qcow2 overlay
  std::string seed;       // raw seed disk (read-only)
  std::string cidata;     // cloud-init's NoCloud seed (read-only); empty: none
  std::string mac;        // the NIC's MAC; empty: qemu's default
  std::uint16_t ssh_port = 0;  // host loopback port forwarded to the guest's 22
  std::string serial_log;
  std::string qmp_socket;
  std::string pid_file;
  // virtiofsd's socket: shares a host directory with the guest under the tag
  // kVirtiofsTag (the guest memory becomes a shared memfd, which vhost-user needs).
  std::string virtiofs_socket;
};

inline constexpr const char* kVirtiofsTag = "gate-repo";

std::vector<std::string> qemu_command(const QemuConfig& c);
// Probe command: does KVM really start a vCPU here? (see kvm_usable in vm_host.h)
std::vector<std::string> kvm_probe_command();

struct SshTarget {
  std::uint16_t port = 22;
  std::string user = "gate";
  std::string host = "127.0.0.1";
  std::string identity;     // private key
  std::string known_hosts;  // per-VM file
};

// Options every ssh-based tool shares: key, known_hosts (accept a new VM's key once,
// then insist on it), no passwords, keep-alives.
std::vector<std::string> ssh_options(const SshTarget& t);
std::vector<std::string> ssh_command(const SshTarget& t, const std::string& remote_command,
                                     int connect_timeout_s = 5);
// Forwards a local Unix socket to the guest's broker (127.0.0.1:guest_port).
std::vector<std::string> tunnel_command(const SshTarget& t, const std::string& local_socket,
                                        std::uint16_t guest_port);
// QEMU's virtio-fs daemon serving `source` on `socket` to one VM; it ends when the VM does.
std::vector<std::string> virtiofsd_command(const std::string& virtiofsd, const std::string& socket,
                                           const std::string& source);
std::vector<std::string> sshfs_command(const SshTarget& t, const std::string& guest_dir,
                                       const std::string& local_mount);

using gate::shell_join;

}  // namespace gate::vm
