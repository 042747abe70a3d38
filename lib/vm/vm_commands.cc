#include "vm/vm_commands.h"

namespace gate::vm {

std::vector<std::string> qemu_command(const QemuConfig& c) {
  std::vector<std::string> a = {"qemu-system-x86_64", "-name", "gate-" + c.name};
  if (c.accel == Accel::Kvm) {
    a.insert(a.end(), {"-accel", "kvm", "-cpu", "host"});
  } else {
    a.insert(a.end(), {"-accel", "tcg,thread=multi", "-cpu", "max"});
  }
  a.insert(a.end(), {"-m", std::to_string(c.memory_mib), "-smp", std::to_string(c.cpus)});
  if (!c.kernel.empty())
    a.insert(a.end(), {"-kernel", c.kernel, "-initrd", c.initrd, "-append",
                       "console=ttyS0 root=/dev/vda rw net.ifnames=0 systemd.show_status=1"});
  // The disk first: the firmware boots the first bootable one (the seeds are not).
  a.insert(a.end(), {"-drive", "file=" + c.disk + ",if=virtio,format=qcow2,discard=unmap",
                     "-drive", "file=" + c.seed + ",if=virtio,format=raw,readonly=on"});
  if (!c.cidata.empty()) a.insert(a.end(), {"-drive", "file=" + c.cidata + ",if=virtio,format=raw,readonly=on"});
  a.insert(a.end(), {"-netdev",
                     "user,id=n0,hostfwd=tcp:127.0.0.1:" + std::to_string(c.ssh_port) + "-:22",
                     "-device", "virtio-net-pci,netdev=n0" + (c.mac.empty() ? "" : ",mac=" + c.mac),
                     // Never the user's terminal: no display, serial console to a file.
                     "-display", "none", "-monitor", "none", "-serial", "file:" + c.serial_log,
                     "-qmp", "unix:" + c.qmp_socket + ",server=on,wait=off",
                     "-pidfile", c.pid_file, "-daemonize"});
  if (!c.virtiofs_socket.empty()) {
    const std::string mib = std::to_string(c.memory_mib) + "M";
    a.insert(a.end(), {"-object", "memory-backend-memfd,id=mem,size=" + mib + ",share=on",
                       "-numa", "node,memdev=mem",
                       "-chardev", "socket,id=vfs,path=" + c.virtiofs_socket,
                       "-device", std::string("vhost-user-fs-pci,chardev=vfs,tag=") + kVirtiofsTag});
  }
  return a;
}

std::vector<std::string> kvm_probe_command() {
  return {"qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "64", "-S",
          "-display", "none", "-nodefaults", "-monitor", "none", "-serial", "none"};
}

std::vector<std::string> ssh_options(const SshTarget& t) {
  return {"-p", std::to_string(t.port), "-i", t.identity,
          "-o", "IdentitiesOnly=yes",
          "-o", "UserKnownHostsFile=" + t.known_hosts,
          "-o", "StrictHostKeyChecking=accept-new",
          "-o", "BatchMode=yes",
          "-o", "LogLevel=ERROR",
          "-o", "ServerAliveInterval=5",
          "-o", "ServerAliveCountMax=3"};
}

std::vector<std::string> ssh_command(const SshTarget& t, const std::string& remote_command,
                                     int connect_timeout_s) {
  std::vector<std::string> a = {"ssh"};
  auto o = ssh_options(t);
  a.insert(a.end(), o.begin(), o.end());
  a.insert(a.end(), {"-o", "ConnectTimeout=" + std::to_string(connect_timeout_s),
                     t.user + "@" + t.host, remote_command});
  return a;
}

std::vector<std::string> tunnel_command(const SshTarget& t, const std::string& local_socket,
                                        std::uint16_t guest_port) {
  std::vector<std::string> a = {"ssh", "-N"};
  auto o = ssh_options(t);
  a.insert(a.end(), o.begin(), o.end());
  a.insert(a.end(), {"-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
                     "-o", "StreamLocalBindMask=0177", "-L",
                     local_socket + ":127.0.0.1:" + std::to_string(guest_port),
                     t.user + "@" + t.host});
  return a;
}

std::vector<std::string> virtiofsd_command(const std::string& virtiofsd, const std::string& socket,
                                           const std::string& source) {
  // cache=auto: the guest caches for a second, so a change made on the host directly shows
  // soon; writes go through at once (no writeback), so a dead VM loses no returned write.
  // xattr: the guest's gate mount keeps extended attributes and ACLs across merges.
  return {virtiofsd, "--socket-path=" + socket, "-o", "source=" + source, "-o", "cache=auto",
          "-o", "xattr"};
}

std::vector<std::string> sshfs_command(const SshTarget& t, const std::string& guest_dir,
                                       const std::string& local_mount) {
  return {"sshfs", t.user + "@" + t.host + ":" + guest_dir, local_mount,
          "-p", std::to_string(t.port),
          "-o", "IdentityFile=" + t.identity + ",IdentitiesOnly=yes,UserKnownHostsFile=" +
                    t.known_hosts +
                    ",StrictHostKeyChecking=accept-new,BatchMode=yes,reconnect,"
                    "ServerAliveInterval=5,ServerAliveCountMax=3"};
}

}  // namespace gate::vm
