// What the VM commands need that runs without a VM: command lines, the choice of
// accelerator, ports, mount states, the state file.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/mounts.h"
#include "support/test_support.h"
#include "core/process.h"
#include "vm/stack_commands.h"
#include "vm/stack_state.h"
#include "vm/image_fetch.h"
#include "vm/vm_commands.h"
#include "vm/vm_host.h"
#include "vm/vm_image.h"

using namespace gate;
using namespace gate::vm;

namespace {
bool has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}
std::string after(const std::vector<std::string>& v, const std::string& s) {
  auto it = std::find(v.begin(), v.end(), s);
  return it == v.end() || it + 1 == v.end() ? "" : *(it + 1);
}
}  // namespace

TEST_CASE("qemu runs in the background and never on the user's terminal", "[vm]") {
  QemuConfig c;
  c.name = "t";
  c.kernel = "/k";
  c.initrd = "/i";
  c.disk = "/d.qcow2";
  c.seed = "/s.img";
  c.ssh_port = 2345;
  c.serial_log = "/logs/serial.log";
  c.qmp_socket = "/state/qmp.sock";
  c.pid_file = "/state/qemu.pid";
  auto a = qemu_command(c);
  CHECK(has(a, "-daemonize"));
  CHECK_FALSE(has(a, "-nographic"));
  CHECK(after(a, "-display") == "none");
  CHECK(after(a, "-serial") == "file:/logs/serial.log");
  CHECK(after(a, "-netdev") == "user,id=n0,hostfwd=tcp:127.0.0.1:2345-:22");
  CHECK(after(a, "-pidfile") == "/state/qemu.pid");
  CHECK(after(a, "-accel").rfind("tcg", 0) == 0);
  c.accel = Accel::Kvm;
  a = qemu_command(c);
  CHECK(after(a, "-accel") == "kvm");
  CHECK(after(a, "-cpu") == "host");
}

TEST_CASE("a cloud image boots from its disk by the firmware with cloud-init's seed beside it", "[vm]") {
  QemuConfig c;
  c.disk = "/d.qcow2";
  c.seed = "/s.img";
  c.cidata = "/v/cidata.img";
  c.mac = kGuestMac;
  auto a = qemu_command(c);
  CHECK_FALSE(has(a, "-kernel"));
  CHECK_FALSE(has(a, "-append"));
  // The disk comes first (the firmware boots the first bootable one), the seeds after.
  const auto disk = std::find(a.begin(), a.end(), "file=/d.qcow2,if=virtio,format=qcow2,discard=unmap");
  const auto cidata = std::find(a.begin(), a.end(), "file=/v/cidata.img,if=virtio,format=raw,readonly=on");
  CHECK(disk < cidata);
  CHECK(cidata != a.end());
  CHECK(has(a, std::string("virtio-net-pci,netdev=n0,mac=") + kGuestMac));
}

TEST_CASE("cloud-init's seed creates the gate user and installs the broker's units", "[vm]") {
  CloudInitSeed s;
  s.instance_id = "gate-t";
  s.hostname = "gate-vm";
  s.authorized_key = "ssh-ed25519 AAAAkey it's me";
  const std::string user = cloud_init_user_data(s);
  CHECK(user.rfind("#cloud-config\n", 0) == 0);
  CHECK(user.find("  - name: gate\n") != std::string::npos);
  CHECK(user.find("      - 'ssh-ed25519 AAAAkey it''s me'\n") != std::string::npos);
  // Files are literal blocks indented under their key: every line of the script is there.
  CHECK(user.find("  - path: /usr/local/sbin/gate-provision\n    permissions: '0755'\n    content: |\n"
                  "      #!/bin/sh\n") != std::string::npos);
  CHECK(user.find("      ExecStart=/opt/gate/bin/gate broker") != std::string::npos);
  CHECK(user.find("[systemctl, enable, --now, gate-provision.service, gate-broker.service]") !=
        std::string::npos);
  CHECK(cloud_init_meta_data(s) == "instance-id: 'gate-t'\nlocal-hostname: 'gate-vm'\n");
  CHECK(cloud_init_network_config().find(std::string("macaddress: \"") + kGuestMac + "\"") != std::string::npos);

  // The seed is a FAT volume labelled CIDATA holding the three files (read back with mtools).
  test::TempDir dir("gate-cidata");
  const std::string img = dir.path() + "/cidata.img";
  Status made = make_cloud_init_seed(s, dir.path(), img, dir.path() + "/log");
  INFO(made.message() << test::read_file(dir.path() + "/log"));
  REQUIRE(made.ok());
  RunResult label = run_command({"mlabel", "-i", img, "-s", "::"});
  CHECK(label.output.find("CIDATA") != std::string::npos);
  CHECK(run_command({"mtype", "-i", img, "::user-data"}).output == user);
  CHECK(run_command({"mtype", "-i", img, "::meta-data"}).output == cloud_init_meta_data(s));
  CHECK(run_command({"mtype", "-i", img, "::network-config"}).output == cloud_init_network_config());
  CHECK_FALSE(std::filesystem::exists(dir.path() + "/cidata"));  // the staging files are gone
}

TEST_CASE("a disk's format is told by its first bytes", "[vm]") {
  test::TempDir dir("gate-format");
  { std::ofstream(dir.path() + "/q") << "QFI\xfb" << std::string(100, '\0'); }
  { std::ofstream(dir.path() + "/r") << std::string(512, '\0'); }
  CHECK(disk_format(dir.path() + "/q") == "qcow2");
  CHECK(disk_format(dir.path() + "/r") == "raw");
  CHECK(disk_format(dir.path() + "/none") == "raw");
}

TEST_CASE("ssh pins the VM's host key in its own known_hosts and never asks", "[vm]") {
  SshTarget t;
  t.port = 2345;
  t.identity = "/k/id";
  t.known_hosts = "/s/known_hosts";
  auto a = ssh_command(t, "true");
  CHECK(a.front() == "ssh");
  CHECK(after(a, "-p") == "2345");
  CHECK(after(a, "-i") == "/k/id");
  CHECK(has(a, "UserKnownHostsFile=/s/known_hosts"));
  CHECK(has(a, "BatchMode=yes"));
  CHECK(a[a.size() - 2] == "gate@127.0.0.1");
  CHECK(a.back() == "true");
  auto tunnel = tunnel_command(t, "/s/broker.sock", 8787);
  CHECK(after(tunnel, "-L") == "/s/broker.sock:127.0.0.1:8787");
  CHECK(has(tunnel, "-N"));
  CHECK(has(tunnel, "ExitOnForwardFailure=yes"));
}

TEST_CASE("sshfs mode shares the repository into the guest with virtio-fs, no copy", "[vm]") {
  auto d = virtiofsd_command("/usr/lib/qemu/virtiofsd", "/s/vfs.sock", "/repo");
  CHECK(d.front() == "/usr/lib/qemu/virtiofsd");
  CHECK(has(d, "--socket-path=/s/vfs.sock"));
  CHECK(has(d, "source=/repo"));
  CHECK(has(d, "xattr"));
  QemuConfig q;
  q.memory_mib = 768;
  CHECK_FALSE(has(qemu_command(q), "-numa"));  // host-direct: plain memory
  q.virtiofs_socket = "/s/vfs.sock";
  auto a = qemu_command(q);
  CHECK(after(a, "-object") == "memory-backend-memfd,id=mem,size=768M,share=on");
  CHECK(after(a, "-numa") == "node,memdev=mem");
  CHECK(after(a, "-chardev") == "socket,id=vfs,path=/s/vfs.sock");
  CHECK(has(a, std::string("vhost-user-fs-pci,chardev=vfs,tag=") + kVirtiofsTag));
}

TEST_CASE("shell_join quotes what a shell would split", "[vm]") {
  CHECK(shell_join({"a", "b c", "it's", ""}) == "a 'b c' 'it'\\''s' ''");
}

TEST_CASE("KVM is used only when it really works", "[vm]") {
  auto works = [] { return Status(); };
  auto broken = [] { return Status::failure("qemu exits at start"); };
  CHECK(choose_accel("auto", works).accel == Accel::Kvm);
  auto fallback = choose_accel("auto", broken);
  CHECK(fallback.accel == Accel::Tcg);
  CHECK(fallback.reason.find("qemu exits at start") != std::string::npos);
  CHECK(choose_accel("kvm", broken).accel == Accel::Tcg);
  CHECK(choose_accel("tcg", works).accel == Accel::Tcg);
}

TEST_CASE("the KVM probe on this machine gives an answer with a reason", "[vm]") {
  const Status usable = kvm_usable();
  if (!usable.ok()) CHECK_FALSE(usable.message().empty());
}

TEST_CASE("a free port is free, and a port in use is not", "[vm]") {
  const auto port = free_tcp_port();
  REQUIRE(port != 0);
  CHECK(tcp_port_free(port));
  test::BrokerProcess broker;
  CHECK_FALSE(tcp_port_free(broker.endpoint().port));
}

TEST_CASE("a plain directory is not a mount but / is", "[vm]") {
  test::TempDir dir;
  CHECK(mount_state(dir.path()) == MountState::NotMounted);
  CHECK(listed_in_mountinfo("/"));
}

TEST_CASE("the setup state survives a save and a load", "[vm]") {
  test::TempDir dir;
  ::setenv("XDG_STATE_HOME", dir.path().c_str(), 1);
  StackState s;
  s.name = "vm1";
  s.mode = "vm";
  s.repo = "/r e p o";
  s.mount = "/m";
  s.broker_socket = "/s.sock";
  s.broker_pid = 12;
  s.mount_pid = 34;
  s.started_at = "2026-11-26T16:07:45.123456+00:00";
  s.extra["ssh_port"] = "2222";
  s.extra["method"] = "sshfs";
  REQUIRE(save_stack(s).ok());
  auto back = load_stack("vm1");
  ::unsetenv("XDG_STATE_HOME");
  REQUIRE(back);
  CHECK(back->repo == "/r e p o");
  CHECK(back->mount_pid == 34);
  CHECK(back->get_int("ssh_port") == 2222);
  CHECK(back->get("method") == "sshfs");
  CHECK(back->get_int("missing") == -1);
}

TEST_CASE("setup names come from the directory's name", "[vm]") {
  CHECK(stack_name_for("/home/u/my repo") == "my-repo");
  CHECK(stack_name_for("/home/u/project/") == "project");
}

TEST_CASE("the gate binary carries its libraries but not the C library", "[vm]") {
  auto libs = carried_libraries(test::gate_binary());
  bool libc = false, json = false;
  for (auto& l : libs) {
    libc |= l.find("libc.so") != std::string::npos;
    json |= l.find("boost_json") != std::string::npos;
  }
  CHECK_FALSE(libc);
  CHECK(json);
}

TEST_CASE("setups build the broker and mount command lines from typed settings", "[vm]") {
  LockSettings locks;
  locks.lease_ms = 1500;
  locks.meta_wait_ms = 250;
  auto broker = broker_command("/usr/bin/gate", "/s/broker", "/s/broker.sock", locks);
  CHECK(shell_join(broker) ==
        "/usr/bin/gate broker --state-dir /s/broker --port 0 --unix-socket /s/broker.sock "
        "--ready-fd '{READY_FD}' --lease-ms 1500");  // the broker has no meta wait
  MountCommand host;
  host.gate = "/usr/bin/gate";
  host.root = "/repo";
  host.mountpoint = "/view";
  host.broker_socket = "/s/broker.sock";
  CHECK(shell_join(mount_command(host, locks)) ==
        "/usr/bin/gate mount --root /repo --mount /view --foreground --ready-fd '{READY_FD}' "
        "--broker-socket /s/broker.sock --lease-ms 1500 --meta-wait-ms 250");
  MountCommand guest;
  guest.gate = "/opt/gate/bin/gate";
  guest.root = "/home/gate/repo";
  guest.mountpoint = "/home/gate/view";
  guest.broker_port = 8787;
  guest.foreground = false;
  guest.log_file = "/home/gate/gate-mount.log";
  CHECK(shell_join(mount_command(guest, {})) ==
        "/opt/gate/bin/gate mount --root /home/gate/repo --mount /home/gate/view --broker-port 8787 "
        "--log-file /home/gate/gate-mount.log");
  CHECK(broker_lock_flags({}).empty());
  LockSettings history;
  history.no_history = true;
  CHECK(shell_join(mount_command(host, history)).ends_with("--no-history"));
  history = {};
  history.history_max_file = "2M";
  history.history_max_bytes = "10G";
  CHECK(shell_join(mount_command(host, history))
            .ends_with("--history-max-file 2M --history-max-bytes 10G"));
  CHECK(broker_lock_flags(history).empty());  // the broker has no history
}

TEST_CASE("cloud image URLs and checksum files are read as their publishers write them", "[vm]") {
  auto u = vm::parse_url("https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS");
  REQUIRE(u.ok());
  CHECK(u->tls);
  CHECK(u->host == "cloud-images.ubuntu.com");
  CHECK(u->port == "443");
  CHECK(u->target == "/releases/24.04/release/SHA256SUMS");
  auto local = vm::parse_url("http://127.0.0.1:8080");
  REQUIRE(local.ok());
  CHECK_FALSE(local->tls);
  CHECK(local->port == "8080");
  CHECK(local->target == "/");
  auto v6 = vm::parse_url("http://[::1]:81/x");
  REQUIRE(v6.ok());
  CHECK(v6->host == "::1");
  CHECK(v6->port == "81");
  CHECK_FALSE(vm::parse_url("ftp://host/").ok());
  CHECK_FALSE(vm::parse_url("http://host:port/").ok());
  CHECK_FALSE(vm::parse_url("http:///x").ok());

  const std::string sums =
      "9F2C  *ubuntu-24.04-server-cloudimg-amd64.tar.gz\r\n"
      "ab12cd *ubuntu-24.04-server-cloudimg-amd64.img\r\n"
      "ef34  debian-12-generic-amd64.qcow2\n";
  CHECK(vm::checksum_for(sums, "ubuntu-24.04-server-cloudimg-amd64.img") == "ab12cd");
  CHECK(vm::checksum_for(sums, "ubuntu-24.04-server-cloudimg-amd64.tar.gz") == "9f2c");
  CHECK(vm::checksum_for(sums, "debian-12-generic-amd64.qcow2") == "ef34");
  CHECK_FALSE(vm::checksum_for(sums, "ubuntu-24.04-server-cloudimg-amd64").has_value());
  // Lines without a name, or without a checksum, are no lines (not a crash).
  CHECK_FALSE(vm::checksum_for("abc \nabc   \n x.img\n", "x.img").has_value());
  CHECK_FALSE(vm::checksum_for("", "x.img").has_value());

  auto ubuntu = vm::cloud_image("ubuntu-24.04", "http://127.0.0.1:9/mirror/");
  REQUIRE(ubuntu);
  CHECK(ubuntu->url == "http://127.0.0.1:9/mirror/releases/24.04/release/");
  CHECK(vm::cloud_image("debian-12-cloud")->url == "https://cloud.debian.org/images/cloud/bookworm/latest/");
  CHECK(vm::cloud_image("debian-12-cloud")->sha_bits == 512);
  CHECK_FALSE(vm::cloud_image("debian-12"));
}
