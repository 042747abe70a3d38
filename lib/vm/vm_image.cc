#include "vm/vm_image.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/files.h"
#include "core/process.h"
#include "vm/image_fetch.h"
#include "vm/vm_commands.h"

namespace gate::vm {

namespace fs = std::filesystem;

namespace {

constexpr const char* kImageVersion = "4";  // bump when the image recipe changes

// A tool to run: where tool_path finds it, else its name (which then fails to run
// and is reported as not installed).
std::string find_tool(const std::string& name) {
  const std::string at = tool_path(name);
  return at.empty() ? name : at;
}

// Runs a logged command; a failure names the step.
Status logged(std::vector<std::string> argv, const std::string& log_path,
                   std::chrono::milliseconds timeout, const std::string& step) {
  argv[0] = find_tool(argv[0]);
  RunResult r = run_logged(argv, log_path, timeout);
  if (r.status == 0) return {};
  if (r.status == 127) return Status::failure(step + ": " + argv[0] + " is not installed");
  return Status::failure(step + " failed (exit " + std::to_string(r.status) + "); see " + log_path);
}

bool write_file(const fs::path& path, const std::string& text, mode_t mode = 0644) {
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  ::chmod(path.c_str(), mode);
  return static_cast<bool>(out);
}

const char* kProvisionScript = R"SH(#!/bin/sh
# gate-provision: installs what the seed disk of this VM carries.
set -eu
seed=/run/gate-seed
mkdir -p "$seed"
if ! mount -o ro LABEL=GATESEED "$seed"; then
  echo "gate-provision: no seed disk (label GATESEED)" >&2
  exit 1
fi
install -d -m 700 -o gate -g gate /home/gate/.ssh
install -m 600 -o gate -g gate "$seed/authorized_keys" /home/gate/.ssh/authorized_keys
rm -rf /opt/gate
mkdir -p /opt/gate
cp -R --preserve=mode,timestamps "$seed/opt-gate/." /opt/gate/
chown -R root:root /opt/gate
install -m 644 "$seed/gate-broker.env" /etc/default/gate-broker
# The carried C++ runtime may need a newer C library than a cloud guest's (Debian 12's
# needs glibc 2.36; Ubuntu 22.04 has 2.35): the guest's own runtime then.
if ! LD_LIBRARY_PATH=/opt/gate/lib /opt/gate/bin/gate --version >/dev/null 2>&1; then
  rm -f /opt/gate/lib/libstdc++.so.* /opt/gate/lib/libgcc_s.so.*
fi
if [ -f "$seed/boot.sh" ]; then
  sh -eu "$seed/boot.sh" "$seed" || echo "gate-provision: the seed's boot.sh failed" >&2
fi
umount "$seed"
echo "gate-provision: installed $(LD_LIBRARY_PATH=/opt/gate/lib /opt/gate/bin/gate --version)"
)SH";

const char* kProvisionUnit = R"([Unit]
Description=Install gate from this VM's seed disk
DefaultDependencies=no
After=local-fs.target systemd-udev-settle.service
Wants=systemd-udev-settle.service
Before=ssh.service gate-broker.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/gate-provision
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
)";

const char* kBrokerUnit = R"([Unit]
Description=gate lock broker
After=gate-provision.service
Requires=gate-provision.service

[Service]
Environment=LD_LIBRARY_PATH=/opt/gate/lib
EnvironmentFile=-/etc/default/gate-broker
ExecStart=/opt/gate/bin/gate broker --state-dir /var/lib/gate --host 127.0.0.1 --port 8787 $GATE_BROKER_ARGS
User=gate
StateDirectory=gate
Restart=on-failure
RestartSec=1
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes

[Install]
WantedBy=multi-user.target
)";

Status customize_tree(const fs::path& root) {
  bool ok = true;
  ok &= write_file(root / "etc/hostname", "gate-vm\n");
  ok &= write_file(root / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 gate-vm\n");
  ok &= write_file(root / "etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 1\n");
  ok &= write_file(root / "etc/network/interfaces",
                   "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n");
  ok &= write_file(root / "etc/fuse.conf", "user_allow_other\n");
  ok &= write_file(root / "etc/ssh/sshd_config.d/gate.conf",
                   "PasswordAuthentication no\nUseDNS no\nPermitRootLogin prohibit-password\n");
  ok &= write_file(root / "usr/local/sbin/gate-provision", kProvisionScript, 0755);
  ok &= write_file(root / "etc/systemd/system/gate-provision.service", kProvisionUnit);
  ok &= write_file(root / "etc/systemd/system/gate-broker.service", kBrokerUnit);
  std::error_code ec;
  const fs::path wants = root / "etc/systemd/system/multi-user.target.wants";
  fs::create_directories(wants, ec);
  for (const char* unit : {"gate-provision.service", "gate-broker.service"}) {
    fs::remove(wants / unit, ec);
    fs::create_symlink(std::string("/etc/systemd/system/") + unit, wants / unit, ec);
    ok &= !ec;
  }
  // Units that only slow a short-lived VM's boot down.
  for (const char* unit : {"apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                           "fstrim.timer", "man-db.timer", "systemd-networkd-wait-online.service"}) {
    fs::remove(root / "etc/systemd/system" / unit, ec);
    fs::create_symlink("/dev/null", root / "etc/systemd/system" / unit, ec);
  }
  if (!ok) return Status::failure("writing the guest's configuration failed");
  return {};
}

}  // namespace

std::string tool_path(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  if (const char* path = std::getenv("PATH")) {
    std::istringstream dirs(path);
    std::string dir;
    while (std::getline(dirs, dir, ':'))
      if (!dir.empty() && ::access((dir + "/" + name).c_str(), X_OK) == 0) return dir + "/" + name;
  }
  for (const char* dir : {"/usr/sbin/", "/sbin/"})
    if (::access((dir + name).c_str(), X_OK) == 0) return dir + name;
  return "";
}

bool ImageFiles::complete() const {
  return fs::exists(disk) && (firmware_boot() || (fs::exists(kernel) && fs::exists(initrd)));
}

std::string disk_format(const std::string& path) {
  char magic[4] = {};
  std::ifstream in(path, std::ios::binary);
  in.read(magic, sizeof magic);
  return in && std::string(magic, 4) == "QFI\xfb" ? "qcow2" : "raw";
}

std::string image_cache_root() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return std::string(xdg) + "/gate/images";
  if (const char* home = std::getenv("HOME"); home && *home)
    return std::string(home) + "/.cache/gate/images";
  return "/tmp/gate-images-" + std::to_string(::getuid());
}

std::string cloud_cache_dir(const std::string& base) { return image_cache_root() + "/" + base; }

ImageFiles cached_image(const std::string& base) {
  const std::string dir = image_cache_root() + "/" + base + "-v" + kImageVersion;
  return {dir + "/disk.raw", dir + "/vmlinuz", dir + "/initrd.img"};
}

bool known_base(const std::string& base) { return base == "debian-12" || is_cloud_base(base); }

bool base_is_offline(const std::string& base) { return base == "debian-12"; }

namespace {

// Without root, mmdebstrap builds in a user namespace (its unshare mode), where the
// subordinate ids of /etc/subuid stand for the guest's owners; commands that must see
// those owners as the guest does (mkfs.ext4 -d, removing the tree) run in the same
// kind of namespace through mmdebstrap's --unshare-helper.
std::vector<std::string> in_namespace(bool rootless, std::vector<std::string> argv) {
  argv[0] = find_tool(argv[0]);
  if (rootless) argv.insert(argv.begin(), {"mmdebstrap", "--unshare-helper"});
  return argv;
}

Status check_rootless(const std::string& log_path) {
  RunResult r = run_logged({"mmdebstrap", "--unshare-helper", "true"}, log_path, std::chrono::seconds(30));
  if (r.status == 0) return {};
  if (r.status == 127) return Status::failure("mmdebstrap is not installed (apt install mmdebstrap)");
  const char* user = std::getenv("USER");
  const std::string who = user && *user ? user : "$USER";
  return Status::failure(
      "building the VM image without root needs user namespaces with subordinate ids, and they do "
      "not work here (see " + log_path + "). Install uidmap; give " + who +
      " a range of 65536 ids that no one else has in /etc/subuid and /etc/subgid ('sudo usermod "
      "--add-subuids FIRST-LAST --add-subgids FIRST-LAST " + who + "'); allow unprivileged user namespaces (Ubuntu 24.04: "
      "'sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0'). Or build it once as root: "
      "'sudo gate image build', or boot a cloud image: 'gate up --base ubuntu-24.04'");
}

// Where the rootless build's tree lives: a directory the namespace's root (a
// subordinate id, "other" to the user's own files) can enter, which the user's cache
// often is not (a 0700 home). Made with a random name under $TMPDIR (else /var/tmp),
// mode 0711, and named in `note` so that a later build can remove what a killed one
// left.
Result<fs::path> namespace_scratch(const fs::path& note) {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/var/tmp") + "/gate-image-XXXXXX";
  if (!::mkdtemp(tmpl.data())) return Status::failure("cannot make a directory in " + tmpl + ": " + std::strerror(errno));
  ::chmod(tmpl.c_str(), 0711);
  std::ofstream(note) << tmpl << "\n";
  return fs::path(tmpl);
}

}  // namespace

Status build_offline_image(const std::string& base, bool force, const std::string& log_path,
                           const Progress& progress) {
  if (!base_is_offline(base))
    return Status::failure("no offline recipe for " + base + "; use --base debian-12");
  ImageFiles out = cached_image(base);
  if (out.complete() && !force) return {};
  const bool rootless = ::geteuid() != 0;
  if (rootless)
    if (Status e = check_rootless(log_path); !e.ok()) return e;
  const fs::path dir = fs::path(out.disk).parent_path();
  const fs::path work = dir.string() + ".building";
  const fs::path note = dir.string() + ".scratch";  // a rootless build's scratch directory
  std::error_code ec;
  // A rootless tree is owned by subordinate ids: removed as them. True when gone.
  auto remove_scratch = [&](const fs::path& scratch) {
    if (rootless && fs::exists(scratch / "root"))
      run_logged(in_namespace(true, {"rm", "-rf", (scratch / "root").string()}), log_path, std::chrono::minutes(5));
    fs::remove_all(rootless ? scratch : scratch / "root", ec);
    return !fs::exists(scratch / "root");
  };
  if (const auto left = read_file(note.string()); left && !left->empty()) {  // by a killed build
    remove_scratch(left->substr(0, left->find('\n')));
    fs::remove(note, ec);
  }
  fs::remove_all(work, ec);
  fs::create_directories(work, ec);
  if (ec) return Status::failure("cannot create " + work.string() + ": " + ec.message());
  fs::path scratch = work;
  if (rootless) {
    Result<fs::path> made = namespace_scratch(note);
    if (!made.ok()) return made.status();
    scratch = *made;
  }
  const fs::path root = scratch / "root";
  const fs::path stage = work / "stage";

  // The guest boots the host's Debian kernel and initrd (linux-image-amd64), with the
  // kernel's modules copied in for FUSE and virtio: no kernel install and no
  // initramfs build inside the guest, which would triple the build time.
  std::string kernel, initrd, version;
  for (const auto& e : fs::directory_iterator("/boot", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("vmlinuz-", 0) != 0) continue;
    const std::string v = name.substr(8);
    if (fs::exists("/boot/initrd.img-" + v) && fs::is_directory("/lib/modules/" + v) && v > version)
      version = v;
  }
  Status err;
  if (version.empty())
    err = Status::failure("no Debian kernel to boot the guest with: install linux-image-amd64 (it puts "
                          "vmlinuz, initrd.img and modules in /boot and /lib/modules)");
  kernel = "/boot/vmlinuz-" + version;
  initrd = "/boot/initrd.img-" + version;

  // gate's files for the guest, staged here and packed as root's, so that they land
  // with the right owners whether mmdebstrap runs as root or in a user namespace.
  if (err.ok()) err = customize_tree(stage);
  fs::create_directories(stage / "usr/lib/modules", ec);
  if (err.ok())
    err = logged({"tar", "--owner=0", "--group=0", "--numeric-owner", "--mode=a+rX,go-w", "-C", stage.string(), "-cf",
                  (work / "stage.tar").string(), "."},
                 log_path, std::chrono::minutes(1), "packing gate's guest files");
  if (err.ok()) {
    progress(std::string("building the Debian 12 guest image from Debian's packages (mmdebstrap") +
             (rootless ? ", without root" : "") + ")");
    err = logged(
        {"mmdebstrap", rootless ? "--mode=unshare" : "--mode=root", "--variant=apt",
         "--include=systemd-sysv,openssh-server,fuse3,udev,iproute2,ifupdown,"
         "isc-dhcp-client,kmod,dbus",
         "--customize-hook=chroot \"$1\" useradd --create-home --shell /bin/bash --groups systemd-journal gate",
         "--customize-hook=" + shell_join({"tar-in", (work / "stage.tar").string(), "/"}),
         "--customize-hook=" + shell_join({"copy-in", "/lib/modules/" + version, "/usr/lib/modules/"}),
         "bookworm", root.string()},
        log_path, std::chrono::minutes(15), "mmdebstrap");
  }
  if (err.ok()) {
    fs::copy_file(kernel, work / "vmlinuz", fs::copy_options::overwrite_existing, ec);
    if (!ec) fs::copy_file(initrd, work / "initrd.img", fs::copy_options::overwrite_existing, ec);
    if (ec) err = Status::failure("copying the kernel failed: " + ec.message());
  }
  if (err.ok()) {
    progress("writing the guest disk (mkfs.ext4 -d)");
    // In the namespace mkfs runs as a subordinate id: it writes into a file made here,
    // which only the disk's copy below outlives (no one kept a way into the image).
    const fs::path disk = scratch / "disk.raw";
    std::ofstream(disk).close();
    fs::permissions(disk, rootless ? fs::perms(0666) : fs::perms(0644), ec);
    err = logged(in_namespace(rootless, {"mkfs.ext4", "-q", "-F", "-L", "gate-root", "-d", root.string(),
                                         disk.string(), "3G"}),
                 log_path, std::chrono::minutes(10), "mkfs.ext4");
    if (err.ok() && rootless)
      err = logged({"cp", "--sparse=always", disk.string(), (work / "disk.raw").string()}, log_path,
                   std::chrono::minutes(10), "copying the guest disk");
    if (rootless) fs::remove(disk, ec);
  }
  const bool removed = remove_scratch(scratch);
  if (removed && rootless) fs::remove(note, ec);
  if (!removed && err.ok())
    err = Status::failure("cannot remove the build's tree " + root.string() +
                          " (its files belong to your subordinate ids): 'mmdebstrap --unshare-helper rm -rf " +
                          root.string() + "' removes it");
  fs::remove_all(stage, ec);
  fs::remove(work / "stage.tar", ec);
  if (!err.ok()) {
    fs::remove_all(work, ec);
    return err;
  }
  fs::remove_all(dir, ec);
  fs::rename(work, dir, ec);
  if (ec) return Status::failure("cannot move the image into " + dir.string() + ": " + ec.message());
  progress("image ready: " + out.disk);
  return {};
}

namespace {

// YAML: a single-quoted scalar, and a literal block indented under its key.
std::string yaml_quoted(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string yaml_block(const std::string& text, const std::string& indent) {
  std::string out = "|\n";
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) out += line.empty() ? "\n" : indent + line + "\n";
  return out;
}

std::string yaml_file(const std::string& path, const std::string& mode, const std::string& content) {
  return "  - path: " + path + "\n    permissions: '" + mode + "'\n    content: " +
         yaml_block(content, "      ");
}

}  // namespace

std::string cloud_init_user_data(const CloudInitSeed& s) {
  // What customize_tree() bakes into gate's own image, written by cloud-init instead.
  // runcmd runs once per instance; the units are enabled, so later boots provision
  // from the seed disk by themselves.
  return "#cloud-config\n"
         "hostname: " + yaml_quoted(s.hostname) + "\n"
         "ssh_pwauth: false\n"
         // The guest only runs gate's broker: a locale that needs no generation (slow
         // under TCG; Debian's locale-gen ignores cloud-init's request and then fails).
         "locale: C.UTF-8\n"
         "users:\n"
         "  - name: gate\n"
         "    shell: /bin/bash\n"
         "    groups: [adm, systemd-journal]\n"
         "    lock_passwd: true\n"
         "    ssh_authorized_keys:\n"
         "      - " + yaml_quoted(s.authorized_key) + "\n"
         "write_files:\n" +
         yaml_file("/etc/ssh/sshd_config.d/gate.conf", "0644",
                   "PasswordAuthentication no\nUseDNS no\nPermitRootLogin prohibit-password\n") +
         yaml_file("/etc/fuse.conf", "0644", "user_allow_other\n") +
         yaml_file("/usr/local/sbin/gate-provision", "0755", kProvisionScript) +
         yaml_file("/etc/systemd/system/gate-provision.service", "0644", kProvisionUnit) +
         yaml_file("/etc/systemd/system/gate-broker.service", "0644", kBrokerUnit) +
         "runcmd:\n"
         "  - [systemctl, daemon-reload]\n"
         "  - [systemctl, enable, --now, gate-provision.service, gate-broker.service]\n";
}

std::string cloud_init_meta_data(const CloudInitSeed& s) {
  return "instance-id: " + yaml_quoted(s.instance_id) + "\nlocal-hostname: " + yaml_quoted(s.hostname) + "\n";
}

std::string cloud_init_network_config() {
  return std::string("version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"") + kGuestMac +
         "\"\n    set-name: eth0\n    dhcp4: true\n";
}

Status make_cloud_init_seed(const CloudInitSeed& s, const std::string& work_dir,
                            const std::string& image_path, const std::string& log_path) {
  std::error_code ec;
  const fs::path dir = fs::path(work_dir) / "cidata";
  fs::remove_all(dir, ec);
  if (!write_file(dir / "user-data", cloud_init_user_data(s), 0600) ||
      !write_file(dir / "meta-data", cloud_init_meta_data(s)) ||
      !write_file(dir / "network-config", cloud_init_network_config()))
    return Status::failure("cannot write the cloud-init seed files in " + dir.string());
  fs::remove(image_path, ec);
  Status err = logged({"mkfs.vfat", "-C", "-n", "CIDATA", image_path, "1024"}, log_path,
                      std::chrono::seconds(30), "making the cloud-init seed (dosfstools)");
  if (err.ok())
    err = logged({"mcopy", "-i", image_path, (dir / "user-data").string(), (dir / "meta-data").string(),
                  (dir / "network-config").string(), "::"},
                 log_path, std::chrono::seconds(30), "writing the cloud-init seed (mtools)");
  fs::remove_all(dir, ec);
  return err;
}

std::vector<std::string> carried_libraries(const std::string& binary) {
  std::vector<std::string> libs;
  RunResult r = run_command({"ldd", binary}, std::chrono::seconds(10));
  std::istringstream in(r.output);
  std::string line;
  while (std::getline(in, line)) {
    auto arrow = line.find("=> ");
    if (arrow == std::string::npos) continue;
    std::string path = line.substr(arrow + 3);
    path = path.substr(0, path.find(' '));
    const std::string name = fs::path(path).filename().string();
    // The C library family must be the guest's own.
    bool libc = false;
    for (const char* skip : {"libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux"})
      libc |= name.rfind(skip, 0) == 0;
    if (!libc && fs::exists(path)) libs.push_back(path);
  }
  return libs;
}

Status make_seed_image(const SeedContents& c, const std::string& work_dir,
                       const std::string& image_path, const std::string& log_path) {
  std::error_code ec;
  const fs::path dir = fs::path(work_dir) / "seed";
  fs::remove_all(dir, ec);
  fs::create_directories(dir / "opt-gate/bin", ec);
  fs::create_directories(dir / "opt-gate/lib", ec);
  if (!write_file(dir / "authorized_keys", c.authorized_key + "\n", 0600) ||
      !write_file(dir / "gate-broker.env", "GATE_BROKER_ARGS=" + c.broker_args + "\n") ||
      (!c.boot_script.empty() && !write_file(dir / "boot.sh", c.boot_script)))
    return Status::failure("cannot write the seed files in " + dir.string());
  fs::copy_file(c.gate_binary, dir / "opt-gate/bin/gate", fs::copy_options::overwrite_existing, ec);
  if (ec) return Status::failure("cannot copy " + c.gate_binary + ": " + ec.message());
  // Debug information is not needed in the guest and would triple the seed.
  run_command({"strip", "--strip-debug", (dir / "opt-gate/bin/gate").string()}, std::chrono::seconds(60));
  std::uintmax_t bytes = fs::file_size(dir / "opt-gate/bin/gate", ec);
  for (const auto& lib : carried_libraries(c.gate_binary)) {
    const fs::path to = dir / "opt-gate/lib" / fs::path(lib).filename();
    fs::copy_file(fs::canonical(lib), to, fs::copy_options::overwrite_existing, ec);
    if (ec) return Status::failure("cannot copy " + lib + ": " + ec.message());
    bytes += fs::file_size(to, ec);
  }
  const std::uintmax_t mib = std::max<std::uintmax_t>(32, bytes * 2 / (1024 * 1024) + 16);
  Status err = logged({"mkfs.ext4", "-q", "-F", "-L", "GATESEED", "-d", dir.string(), image_path,
                       std::to_string(mib) + "M"},
                           log_path, std::chrono::minutes(2), "making the seed disk");
  fs::remove_all(dir, ec);
  return err;
}

}  // namespace gate::vm
