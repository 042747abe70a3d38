#include "vm/vm_instance.h"

#include <signal.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "client/broker_client.h"
#include "core/config.h"
#include "core/files.h"
#include "core/iso_time.h"
#include "core/mounts.h"
#include "core/process.h"
#include "vm/image_fetch.h"
#include "vm/vm_guest.h"
#include "vm/vm_host.h"
#include "vm/vm_image.h"

namespace gate::vm {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

bool have_tool(const std::string& tool) { return !tool_path(tool).empty(); }

// QEMU's virtio-fs daemon; Debian ships it outside PATH (qemu-system-common).
std::string find_virtiofsd() {
  for (const char* p : {"/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"})
    if (::access(p, X_OK) == 0) return p;
  return have_tool("virtiofsd") ? "virtiofsd" : "";
}

// The sshfs method's boot script (SeedContents::boot_script): lets the host's key in as
// root and mounts the repository that virtiofsd shares.
std::string sshfs_boot_script() {
  return std::string("seed=\"$1\"\n"
                     "install -d -m 700 /root/.ssh\n"
                     "install -m 600 \"$seed/authorized_keys\" /root/.ssh/authorized_keys\n"
                     "mkdir -p ") + kGuestRepo + " " + kGuestView + "\n" +
         "mountpoint -q " + kGuestRepo + " || mount -t virtiofs " + kVirtiofsTag + " " + kGuestRepo + "\n";
}

// The steps of one `gate up`, and what to undo when one fails.
class UpRun {
 public:
  UpRun(const VmOptions& o, std::ostream& out, std::ostream& err) : o_(o), out_(out), err_(err) {}

  int run();

 private:
  void say(const std::string& line) { out_ << "gate: " << line << "\n" << std::flush; }
  // A step's failure: remembers the step and its log for fail(), which reports them.
  Status failed(std::string step, std::string message, std::string log);
  int fail(const Status& s);
  void undo();
  // The steps of gate up, in order; each fails through failed().
  Status prepare();
  Status start_vm();
  Status wait_for_ssh();
  Status wait_for_broker_in_guest();
  // The host's way to the guest's broker (gate locks, gate status, the host mount).
  Status start_tunnel();
  Status host_direct();
  Status start_virtiofsd();
  Status sshfs();
  void summary();
  void dry_run();
  // The mount commands of the two methods, for the steps and for --dry-run alike.
  std::vector<std::string> host_mount_command(const std::string& repo, const std::string& mount,
                                              const std::string& socket) const;
  std::string guest_mount_command() const;

  const VmOptions& o_;
  std::ostream& out_;
  std::ostream& err_;
  StackState s_;
  ImageFiles image_;
  std::string logs_, key_, pub_;
  QemuConfig qemu_;
  SshTarget ssh_;
  std::string virtiofsd_;  // sshfs method: its path
  pid_t qemu_pid_ = -1, tunnel_pid_ = -1, mount_pid_ = -1, virtiofsd_pid_ = -1;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  std::string failed_step_, failed_log_;
};

Status UpRun::failed(std::string step, std::string message, std::string log) {
  // Never a failure without words, whatever a lower layer reported.
  if (message.empty()) message = "it failed without saying why";
  failed_step_ = std::move(step);
  failed_log_ = std::move(log);
  return Status::failure(std::move(message));
}

int UpRun::fail(const Status& s) {
  err_ << "gate up: step '" << failed_step_ << "' failed: " << s.message() << "\n";
  if (!failed_log_.empty()) err_ << "last lines of " << failed_log_ << ":\n" << tail_file(failed_log_, 12);
  if (o_.keep_vm_on_error) {
    err_ << "gate up: leaving what was started running (--keep-vm-on-error); 'gate down --vm-name "
         << o_.name << "' stops it\n";
    if (Status saved = save_stack(s_); !saved.ok()) err_ << "gate up: " << saved.message() << "\n";
  } else {
    undo();
  }
  return 1;
}

void UpRun::undo() {
  if (mount_pid_ > 0) stop_process(mount_pid_, s_.mount, 10s);
  unmount_fuse(s_.mount);
  if (tunnel_pid_ > 0) stop_process(tunnel_pid_, "ssh", 5s);
  if (qemu_pid_ > 0) stop_process(qemu_pid_, "gate-" + o_.name, 5s);
  if (virtiofsd_pid_ > 0) stop_process(virtiofsd_pid_, qemu_.virtiofs_socket, 5s);
  remove_stack_state(o_.name);
}

Status UpRun::prepare() {
  std::error_code ec;
  const fs::path repo = fs::canonical(o_.repo_path, ec);
  if (ec || !fs::is_directory(repo))
    return failed("check", "'" + o_.repo_path + "' is not a directory", "");
  std::vector<std::string> tools = {"qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen", "mkfs.ext4"};
  if (o_.method == "sshfs") tools.push_back("sshfs");
  if (o_.image.empty() && is_cloud_base(o_.base)) tools.insert(tools.end(), {"mkfs.vfat", "mcopy"});
  for (const auto& t : tools)
    if (!have_tool(t))
      return failed("check", t + " is not installed (apt-get install qemu-system-x86 qemu-utils "
                              "openssh-client e2fsprogs sshfs dosfstools mtools)", "");
  if (o_.method == "sshfs") {
    if (::geteuid() != 0)
      return failed("check", "--host-mount-method sshfs shares the repository into the VM with "
                             "virtio-fs, whose daemon (virtiofsd) runs only as root: run gate up as "
                             "root, or use the default method, host-direct, which needs neither", "");
    virtiofsd_ = find_virtiofsd();
    if (virtiofsd_.empty())
      return failed("check", "virtiofsd is not installed (apt-get install qemu-system-common)", "");
  }

  s_.name = o_.name;
  s_.mode = "vm";
  s_.repo = repo.string();
  s_.mount = o_.host_mount.empty() ? user_state_root() + "/mounts/" + o_.name
                                   : fs::absolute(o_.host_mount).lexically_normal().string();
  s_.broker_socket = s_.state_dir() + "/broker.sock";
  s_.started_at = format_iso8601(wall_clock_micros());
  s_.extra["method"] = o_.method;
  const std::string vm_dir = o_.vm_dir.empty() ? user_state_root() + "/vms/" + o_.name : o_.vm_dir;
  s_.extra["vm_dir"] = fs::absolute(vm_dir).string();
  logs_ = s_.log_dir();
  for (const auto& d : {s_.state_dir(), logs_, s_.get("vm_dir")}) {
    fs::create_directories(d, ec);
    if (ec) return failed("prepare", "cannot create " + d + ": " + ec.message(), "");
  }

  if (!o_.ssh_key.empty()) {
    pub_ = o_.ssh_key;
    key_ = pub_.size() > 4 && pub_.substr(pub_.size() - 4) == ".pub" ? pub_.substr(0, pub_.size() - 4) : "";
    if (key_.empty() || !fs::exists(key_) || !fs::exists(pub_))
      return failed("ssh key", "--ssh-key wants a .pub file with its private key beside it (" +
                                    (key_.empty() ? pub_ + " without .pub" : key_) + " is missing)", "");
  } else {
    auto key = ensure_gate_ssh_key();
    if (!key.ok()) return failed("ssh key", key.message(), "");
    key_ = *key;
    pub_ = key_ + ".pub";
  }
  s_.extra["ssh_key"] = key_;
  s_.extra["known_hosts"] = s_.state_dir() + "/known_hosts";
  fs::remove(s_.get("known_hosts"), ec);  // a rebuilt guest may have new host keys

  const std::string image_log = logs_ + "/image.log";
  if (!o_.image.empty()) {
    const fs::path dir = fs::absolute(o_.image).parent_path();
    image_ = {fs::absolute(o_.image).string(), (dir / "vmlinuz").string(), (dir / "initrd.img").string()};
    if (!image_.complete())
      return failed("image", "--image needs a disk built by 'gate image build', with vmlinuz and "
                              "initrd.img beside it", "");
  } else if (!known_base(o_.base)) {
    return failed("image", "unknown --base '" + o_.base + "' (" + kBaseNames + ")", "");
  } else if (auto cloud = cloud_image(o_.base, o_.image_mirror)) {
    // Downloaded and verified (or taken from the cache when the publisher's checksum
    // still names it); booted by the firmware with its own kernel.
    if (Result<Url> u = parse_url(cloud->url); !u.ok())
      return failed("image", "--image-mirror: " + u.message(), "");
    FetchOptions f;
    f.cache_dir = cloud_cache_dir(o_.base);
    const CachePaths at = cache_paths(*cloud, f.cache_dir);
    if (o_.redownload) {
      fs::remove(at.image, ec);
      fs::remove(at.sum, ec);
    }
    f.offline = o_.skip_build;
    f.tty = ::isatty(STDOUT_FILENO) == 1;
    f.progress = &out_;
    f.say = [&](const std::string& l) { say(l); };
    Result<std::string> got = fetch_cloud_image(*cloud, f);
    if (!got.ok()) return failed("image", got.message(), "");
    image_ = {*got, "", ""};
    s_.extra["base"] = o_.base;
  } else {
    image_ = cached_image(o_.base);
    if (image_.complete() && !o_.redownload) {
      say("using the cached image " + image_.disk);
    } else if (o_.skip_build) {
      return failed("image", "no cached image and --skip-build given; run 'gate image build'", "");
    } else {
      Status e = build_offline_image(o_.base, o_.redownload, image_log,
                                     [&](const std::string& l) { say(l); });
      if (!e.ok()) return failed("image", e.message(), image_log);
    }
  }
  return {};
}

namespace {

// `from` kept with the VM as `to`: a hard link where it can be (no copy, and the
// cache may replace `from` by another file under its name), else a sparse copy.
Status pin(const std::string& from, const std::string& to, const std::string& log) {
  std::error_code ec;
  fs::remove(to, ec);
  fs::create_hard_link(from, to, ec);
  if (!ec) return {};
  RunResult c = run_logged({"cp", "--reflink=auto", "--sparse=always", from, to}, log, 30min);
  if (c.status != 0) return Status::failure("cannot copy " + from + " to " + to);
  return {};
}

// The file a qcow2 overlay is backed by ("" when none or unreadable).
std::string backing_file(const std::string& disk) {
  RunResult r = run_command({"qemu-img", "info", "--output=json", "-U", disk}, 30s);
  const auto brace = r.output.find('{');
  if (r.status != 0 || brace == std::string::npos) return "";
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(r.output.substr(brace), ec);
  if (ec || !v.is_object()) return "";
  for (const char* field : {"full-backing-filename", "backing-filename"})
    if (const auto* b = v.as_object().if_contains(field); b && b->is_string()) return std::string(b->as_string());
  return "";
}

}  // namespace

Status UpRun::start_vm() {
  const std::string vm_dir = s_.get("vm_dir");
  const std::string disk = vm_dir + "/disk.qcow2";
  const std::string vm_log = logs_ + "/vm.log";
  const std::string from_note = vm_dir + "/disk.from";
  // What the disk is made from; a disk is reused only for the same.
  const std::string from = o_.image.empty() ? "base " + o_.base : "image " + image_.disk;
  const std::string made_from = read_file(from_note).value_or("");
  std::error_code ec;
  // The overlay names its backing file by path, and the cache replaces an image under
  // the same path (a newer release, a rebuild): each VM keeps its own link to the
  // image (and kernel) it was made from, so that its disk, and the broker's state on
  // it, stay good.
  auto pin_kernel = [&](const std::string& kernel, const std::string& initrd) -> Status {
    if (kernel.empty()) return {};
    if (Status e = pin(kernel, vm_dir + "/vmlinuz", vm_log); !e.ok()) return e;
    return pin(initrd, vm_dir + "/initrd.img", vm_log);
  };
  bool fresh = !fs::exists(disk) || o_.redownload;
  if (!fresh && made_from.empty()) {
    // Made by an older gate, on the cache's path: adopted when that image is still there.
    const std::string old = backing_file(disk);
    if (old.empty() || !fs::exists(old)) {
      say("the image the VM disk " + disk + " was made from is gone: a new VM disk");
      fresh = true;
    } else {
      const std::string base = vm_dir + "/base." + disk_format(old);
      const std::string dir = fs::path(old).parent_path().string();
      Status e = pin(old, base, vm_log);
      if (e.ok() && !image_.firmware_boot() && fs::exists(dir + "/vmlinuz"))
        e = pin_kernel(dir + "/vmlinuz", dir + "/initrd.img");
      if (e.ok() && run_step({"qemu-img", "rebase", "-u", "-F", disk_format(old), "-b", base, disk}, vm_log, 60s)
                            .status != 0)
        e = Status::failure("qemu-img rebase failed");
      if (!e.ok()) return failed("disk", e.message(), vm_log);
      std::ofstream(from_note, std::ios::trunc) << from;
    }
  } else if (!fresh && made_from != from) {
    return failed("disk", "the VM disk of '" + o_.name + "' was made from " + made_from + ", not " + from +
                              ": 'gate up --redownload' makes a new disk (the guest's state is lost), or "
                              "choose another --vm-name", "");
  }
  if (fresh) {
    fs::remove(disk, ec);
    for (const char* old : {"/base.raw", "/base.qcow2", "/vmlinuz", "/initrd.img"}) fs::remove(vm_dir + old, ec);
    const std::string base = vm_dir + "/base." + disk_format(image_.disk);
    Status e = pin(image_.disk, base, vm_log);
    if (e.ok()) e = pin_kernel(image_.kernel, image_.initrd);
    if (!e.ok()) return failed("disk", e.message(), vm_log);
    RunResult r = run_step({"qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format(image_.disk), "-b", base,
                              disk, o_.disk_size},
                             vm_log, 60s);
    if (r.status != 0) return failed("disk", "qemu-img create failed", vm_log);
    std::ofstream(from_note, std::ios::trunc) << from;
  } else {
    say("reusing the VM disk " + disk);
  }
  // The kernel the disk's modules are for: its own, pinned with it.
  if (!image_.firmware_boot() && fs::exists(vm_dir + "/vmlinuz")) {
    image_.kernel = vm_dir + "/vmlinuz";
    image_.initrd = vm_dir + "/initrd.img";
  }
  std::ifstream pub(pub_);
  std::string key_line;
  std::getline(pub, key_line);
  SeedContents seed;
  seed.authorized_key = key_line;
  seed.gate_binary = o_.gate_binary;
  seed.broker_args = shell_join(broker_lock_flags(o_.locks));
  if (o_.method == "sshfs") seed.boot_script = sshfs_boot_script();
  const std::string seed_path = vm_dir + "/seed.img";
  if (Status e = make_seed_image(seed, vm_dir, seed_path, logs_ + "/provision.log"); !e.ok())
    return failed("seed", e.message(), logs_ + "/provision.log");
  if (image_.firmware_boot()) {
    CloudInitSeed ci;
    ci.instance_id = "gate-" + o_.name;
    ci.hostname = "gate-vm";
    ci.authorized_key = key_line;
    qemu_.cidata = vm_dir + "/cidata.img";
    qemu_.mac = kGuestMac;
    if (Status e = make_cloud_init_seed(ci, vm_dir, qemu_.cidata, logs_ + "/provision.log"); !e.ok())
      return failed("seed", e.message(), logs_ + "/provision.log");
  }

  AccelChoice accel = choose_accel(o_.accel, kvm_usable);
  say(accel.reason);
  std::uint16_t port = o_.ssh_port;
  if (port != 0 && !tcp_port_free(port)) {
    const std::uint16_t other = free_tcp_port();
    say("port " + std::to_string(port) + " is taken; using " + std::to_string(other) + " for ssh");
    port = other;
  }
  if (port == 0) port = free_tcp_port();
  qemu_.name = o_.name;
  qemu_.accel = accel.accel;
  qemu_.memory_mib = o_.memory_mib;
  qemu_.cpus = o_.cpus;
  qemu_.kernel = image_.kernel;
  qemu_.initrd = image_.initrd;
  qemu_.disk = disk;
  qemu_.seed = seed_path;
  qemu_.ssh_port = port;
  qemu_.serial_log = logs_ + "/serial.log";
  qemu_.qmp_socket = s_.state_dir() + "/qmp.sock";
  qemu_.pid_file = s_.state_dir() + "/qemu.pid";
  if (o_.method == "sshfs")
    if (Status e = start_virtiofsd(); !e.ok()) return e;
  fs::remove(qemu_.serial_log, ec);
  fs::remove(qemu_.pid_file, ec);
  say("starting the VM (" + std::to_string(o_.memory_mib) + " MiB, " + std::to_string(o_.cpus) +
      " CPUs, ssh on 127.0.0.1:" + std::to_string(port) + "; log " + vm_log + ")");
  RunResult r = run_step(qemu_command(qemu_), vm_log, 60s);
  std::ifstream pidf(qemu_.pid_file);
  pidf >> qemu_pid_;
  if (r.status != 0 || qemu_pid_ <= 0) return failed("vm", "qemu did not start", vm_log);
  s_.extra["qemu_pid"] = std::to_string(qemu_pid_);
  s_.extra["ssh_port"] = std::to_string(port);
  s_.extra["accel"] = accel.accel == Accel::Kvm ? "kvm" : "tcg";
  s_.extra["qmp_socket"] = qemu_.qmp_socket;
  if (virtiofsd_pid_ > 0) {
    s_.extra["virtiofsd_pid"] = std::to_string(virtiofsd_pid_);
    s_.extra["virtiofs_socket"] = qemu_.virtiofs_socket;
  }
  ssh_ = ssh_target_of(s_);
  // Written now so that gate down and gate clean find the VM if a later step fails.
  if (Status saved = save_stack(s_); !saved.ok()) return failed("state", saved.message(), "");
  return {};
}

Status UpRun::wait_for_ssh() {
  const std::string ssh_log = logs_ + "/ssh.log";
  const auto start = std::chrono::steady_clock::now();
  const bool tty = ::isatty(STDOUT_FILENO);
  int last_report = -10;
  while (true) {
    const int waited = static_cast<int>(
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - start).count());
    if (!process_runs(qemu_pid_, "gate-" + o_.name))
      return failed("ssh", "the VM stopped while booting", logs_ + "/serial.log");
    if (waited > o_.ssh_wait_s)
      return failed("ssh", "no ssh answer after " + std::to_string(o_.ssh_wait_s) + " s",
                     logs_ + "/serial.log");
    if (tty) {
      out_ << "\rgate: waiting for the guest's ssh on 127.0.0.1:" << ssh_.port << " ... " << waited << " s"
           << std::flush;
    } else if (waited - last_report >= 15) {
      say("waiting for the guest's ssh on 127.0.0.1:" + std::to_string(ssh_.port) + " (" +
          std::to_string(waited) + " s)");
      last_report = waited;
    }
    RunResult r = run_step(ssh_command(ssh_, "true", 3), ssh_log, 20s);
    if (r.status == 0) break;
    // qemu's port forward accepts at once and closes until sshd runs: pause briefly.
    std::this_thread::sleep_for(1s);
  }
  if (tty) out_ << "\n";
  say("ssh answered after " +
      std::to_string(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0_).count()) +
      " s");
  return {};
}

Status UpRun::wait_for_broker_in_guest() {
  const std::string log = logs_ + "/broker.log";
  // A cloud image's first boot installs the broker late: from cloud-init's last stage,
  // which follows ssh by a minute or more under TCG.
  const int wait_s = image_.firmware_boot() ? 300 : 60;
  if (image_.firmware_boot()) say("waiting for cloud-init to install and start the broker ('gate logs --component cloud-init')");
  RunResult r = run_step(
      ssh_command(ssh_, "for i in $(seq 1 " + std::to_string(wait_s * 2) + "); do (echo > /dev/tcp/127.0.0.1/" +
                            std::to_string(kGuestBrokerPort) + ") 2>/dev/null && exit 0; "
                        "sleep 0.5; done; journalctl -b -u gate-provision -u gate-broker --no-pager "
                        "| tail -30; " +
                        (image_.firmware_boot()
                             ? "cloud-init status --long; tail -n 30 /var/log/cloud-init-output.log; "
                             : "") +
                        "exit 1"),
      log, std::chrono::seconds(wait_s + 30));
  if (r.status != 0) return failed("broker", "the broker in the guest did not start", log);
  say("the broker runs in the guest (127.0.0.1:" + std::to_string(kGuestBrokerPort) + " there)");
  return {};
}

Status UpRun::start_tunnel() {
  const std::string tunnel_log = logs_ + "/tunnel.log";
  std::error_code ec;
  fs::remove(s_.broker_socket, ec);
  Daemon tunnel = start_daemon(tunnel_command(ssh_, s_.broker_socket, kGuestBrokerPort), tunnel_log, 0ms);
  if (tunnel.pid < 0) return failed("tunnel", tunnel.error, tunnel_log);
  tunnel_pid_ = tunnel.pid;
  s_.extra["tunnel_pid"] = std::to_string(tunnel_pid_);
  BrokerEndpoint ep;
  ep.unix_socket = s_.broker_socket;
  bool healthy = false;
  for (int i = 0; i < 100 && !healthy; ++i) {
    if (!process_alive(tunnel_pid_)) return failed("tunnel", "ssh tunnel exited", tunnel_log);
    if (fs::exists(s_.broker_socket)) {
      BrokerClient client(ep, 2s);
      healthy = client.healthy();
    }
    if (!healthy) std::this_thread::sleep_for(200ms);
  }
  if (!healthy) return failed("tunnel", "the broker did not answer through the tunnel", tunnel_log);
  say("tunnel up: " + s_.broker_socket + " -> guest 127.0.0.1:" + std::to_string(kGuestBrokerPort));
  return {};
}

Status UpRun::host_direct() {
  if (Status t = start_tunnel(); !t.ok()) return t;
  if (o_.skip_host_mount) return {};
  std::error_code ec;
  fs::create_directories(s_.mount, ec);
  const std::string mount_log = logs_ + "/mount.log";
  Daemon mount = start_daemon(host_mount_command(s_.repo, s_.mount, s_.broker_socket), mount_log, 30s);
  if (mount.pid < 0) return failed("mount", mount.error, mount_log);
  mount_pid_ = mount.pid;
  s_.mount_pid = mount_pid_;
  say("mounted " + s_.repo + " at " + s_.mount + " (locks from the guest's broker)");
  return {};
}

Status UpRun::start_virtiofsd() {
  const std::string log = logs_ + "/virtiofsd.log";
  qemu_.virtiofs_socket = s_.state_dir() + "/virtiofs.sock";
  std::error_code ec;
  fs::remove(qemu_.virtiofs_socket, ec);
  Daemon d = start_daemon(virtiofsd_command(virtiofsd_, qemu_.virtiofs_socket, s_.repo), log, 0ms);
  if (d.pid < 0) return failed("virtiofsd", d.error, log);
  virtiofsd_pid_ = d.pid;
  // qemu connects to the socket as it starts: it must be listening by then.
  const auto end = std::chrono::steady_clock::now() + 10s;
  while (!fs::exists(qemu_.virtiofs_socket)) {
    if (!process_alive(virtiofsd_pid_)) return failed("virtiofsd", "virtiofsd exited at start", log);
    if (std::chrono::steady_clock::now() > end)
      return failed("virtiofsd", "virtiofsd did not open its socket in 10 s", log);
    std::this_thread::sleep_for(20ms);
  }
  say("sharing " + s_.repo + " with the VM (virtio-fs; log " + log + ")");
  return {};
}

Status UpRun::sshfs() {
  if (Status t = start_tunnel(); !t.ok()) return t;
  const std::string mount_log = logs_ + "/mount.log";
  const SshTarget root = as_root(ssh_);
  RunResult r = run_step(ssh_command(root, std::string("mountpoint -q ") + kGuestRepo), mount_log, 30s);
  if (r.status != 0)
    return failed("virtio-fs", "the guest did not mount the shared repository at " +
                                   std::string(kGuestRepo) + " (its provisioning is in the serial log)",
                  logs_ + "/serial.log");
  r = run_step(ssh_command(root, "mountpoint -q " + std::string(kGuestView) + " || " + guest_mount_command()),
               mount_log, 60s);
  if (r.status != 0) return failed("mount", "gate mount inside the guest failed", mount_log);
  say("gate mount runs in the guest at " + std::string(kGuestView) + ", over the shared repository");
  if (o_.skip_host_mount) return {};
  std::error_code ec;
  fs::create_directories(s_.mount, ec);
  r = run_step(sshfs_command(root, kGuestView, s_.mount), mount_log, 60s);
  if (r.status != 0) return failed("sshfs", "sshfs onto the guest's view failed", mount_log);
  say("mounted the guest's view at " + s_.mount + " (sshfs)");
  return {};
}

void UpRun::summary() {
  const auto secs = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0_).count();
  out_ << "gate: '" << s_.name << "' is up (" << s_.get("method") << ", " << s_.get("accel") << ", "
       << secs << " s)\n";
  if (!o_.skip_host_mount) out_ << "  work in:  " << s_.mount << "\n";
  out_ << "  locks:    gate locks --vm-name " << s_.name << "\n";
  if (s_.get("method") == "sshfs")
    out_ << "  edits land in " << s_.repo << " as they are written (virtio-fs: no copy)\n";
  out_ << "  logs:     " << logs_ << "/\n"
       << "  ssh:      " << shell_join(ssh_command(ssh_, "")) << "\n"
       << "  stop:     gate down --vm-name " << s_.name << "\n";
}

std::vector<std::string> UpRun::host_mount_command(const std::string& repo,
                                                  const std::string& mount,
                                                  const std::string& socket) const {
  MountCommand m;
  m.gate = o_.gate_binary;
  m.root = repo;
  m.mountpoint = mount;
  m.broker_socket = socket;
  return mount_command(m, o_.locks);
}

std::string UpRun::guest_mount_command() const {
  MountCommand guest;
  guest.gate = "/opt/gate/bin/gate";
  guest.root = kGuestRepo;
  guest.mountpoint = kGuestView;
  guest.broker_port = kGuestBrokerPort;
  guest.foreground = false;
  guest.log_file = kGuestMountLog;
  const std::vector<std::string> unit = {
      "systemd-run", std::string("--unit=") + kGuestViewUnit, "--service-type=forking",
      "--setenv=LD_LIBRARY_PATH=/opt/gate/lib", "--setenv=HOME=/root",  // (its history's home)
      "--property=After=gate-broker.service",
      "--property=Wants=gate-broker.service", "--property=TimeoutStopSec=20",
      "--property=CollectMode=inactive-or-failed", "--quiet"};
  // A mount that fails to start says why in the unit's journal: shown in mount.log.
  return shell_join(unit) + " " + shell_join(mount_command(guest, o_.locks)) +
         " || { journalctl --no-pager -o cat -n 20 -u " + kGuestViewUnit + " >&2; exit 1; }";
}

void UpRun::dry_run() {
  QemuConfig q;
  q.name = o_.name;
  const auto cloud = o_.image.empty() ? cloud_image(o_.base, o_.image_mirror) : std::nullopt;
  if (!cloud) {
    q.kernel = "<vm-dir>/vmlinuz";
    q.initrd = "<vm-dir>/initrd.img";
  } else {
    q.cidata = "<vm-dir>/cidata.img";
    q.mac = kGuestMac;
  }
  q.disk = "<vm-dir>/disk.qcow2";
  q.seed = "<vm-dir>/seed.img";
  q.ssh_port = o_.ssh_port ? o_.ssh_port : 2222;
  q.serial_log = "<logs>/serial.log";
  q.qmp_socket = "<state>/qmp.sock";
  q.pid_file = "<state>/qemu.pid";
  q.memory_mib = o_.memory_mib;
  q.cpus = o_.cpus;
  SshTarget t;
  t.port = q.ssh_port;
  t.identity = "<key>";
  t.known_hosts = "<state>/known_hosts";
  out_ << "gate up --dry-run: the steps and commands, none run:\n"
       << "1. image: "
       << (!o_.image.empty() ? o_.image
           : cloud ? cloud->url + cloud->file + ", verified with " + cloud->url + cloud->sums +
                         " (the cached copy while that checksum names it)"
                   : "cached " + o_.base + " image, else mmdebstrap bookworm + mkfs.ext4 -d")
       << "\n"
       << "2. disk: ln <image> <vm-dir>/base." << (cloud ? "qcow2" : "raw (and its kernel and initrd)")
       << "; qemu-img create -f qcow2 -F " << (cloud ? "qcow2 -b <vm-dir>/base.qcow2" : "raw -b <vm-dir>/base.raw")
       << " <vm-dir>/disk.qcow2 " << o_.disk_size << " (unless the disk is there already)\n"
       << "3. seed: mkfs.ext4 -L GATESEED -d <authorized key, gate binary and libraries> <vm-dir>/seed.img\n";
  if (cloud)
    out_ << "   cloud-init: mkfs.vfat -C -n CIDATA <vm-dir>/cidata.img; mcopy user-data meta-data network-config\n";
  out_
       << "4. vm: " << shell_join(qemu_command(q)) << "\n"
       << "5. ssh: " << shell_join(ssh_command(t, "true", 3)) << " (until it answers)\n";
  if (o_.method == "sshfs") {
    out_ << "   with virtio-fs (started before 4.): "
         << shell_join(virtiofsd_command(find_virtiofsd(), "<state>/virtiofs.sock", o_.repo_path)) << "\n"
         << "   the guest mounts it at boot: mount -t virtiofs " << kVirtiofsTag << " " << kGuestRepo << "\n"
         << "6. guest mount (as root): " << guest_mount_command() << "\n"
         << "7. sshfs: " << shell_join(sshfs_command(as_root(t), kGuestView, "<host-mount>")) << "\n";
  } else {
    out_ << "6. tunnel: " << shell_join(tunnel_command(t, "<state>/broker.sock", kGuestBrokerPort)) << "\n"
         << "7. mount: "
         << shell_join(host_mount_command(o_.repo_path, "<host-mount>", "<state>/broker.sock"))
         << "\n";
  }
}

int UpRun::run() {
  if (o_.method != "host-direct" && o_.method != "sshfs") {
    err_ << "gate up: --host-mount-method must be host-direct or sshfs\n";
    return 2;
  }
  if (o_.dry_run) {
    dry_run();
    return 0;
  }
  if (auto old = load_stack(o_.name)) {
    if (qemu_running(*old)) {
      const bool view_ok = o_.skip_host_mount || mount_state(old->mount) == MountState::Mounted;
      if (view_ok) {
        out_ << "gate: '" << o_.name << "' is already up (ssh port " << old->get("ssh_port")
             << "); work in " << old->mount << "\n";
        return 0;
      }
    }
    say("'" + o_.name + "' was left half up; cleaning it first");
    DownOptions d;
    std::ostringstream sink;
    vm_down(*old, d, sink, sink);
  }
  for (Status (UpRun::*step)() : {&UpRun::prepare, &UpRun::start_vm, &UpRun::wait_for_ssh,
                                    &UpRun::wait_for_broker_in_guest,
                                    o_.method == "sshfs" ? &UpRun::sshfs : &UpRun::host_direct})
    if (Status s = (this->*step)(); !s.ok()) return fail(s);
  if (Status saved = save_stack(s_); !saved.ok()) return fail(failed("state", saved.message(), ""));
  summary();
  return 0;
}

}  // namespace

int vm_up(const VmOptions& o, std::ostream& out, std::ostream& err) {
  g_verbose = o.verbose;
  return UpRun(o, out, err).run();
}

}  // namespace gate::vm
