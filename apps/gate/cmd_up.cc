// gate up / gate down: bring up (and stop) a broker with a locked mount of a
// directory, in the background, with one command.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "cli.h"
#include "commands.h"
#include "core/iso_time.h"
#include "core/mounts.h"
#include "core/process.h"
#include "vm/local_stack.h"
#include "vm/stack_state.h"
#include "vm/vm_instance.h"

namespace gate::cmd {

namespace fs = std::filesystem;

namespace {

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? "gate" : p.string();
}

// The lock flags gate up passes on to the broker and the mount it starts.
gate::vm::LockSettings lock_settings(const po::variables_map& args) {
  gate::vm::LockSettings l;
  auto get = [&args](const char* flag) -> std::optional<std::int64_t> {
    if (!args.count(flag)) return std::nullopt;
    return args[flag].as<std::int64_t>();
  };
  l.lease_ms = get("lease-ms");
  l.max_hold_ms = get("max-hold-ms");
  l.meta_wait_ms = get("meta-wait-ms");
  l.acquire_timeout_ms = get("acquire-timeout-ms");
  l.no_history = args["no-history"].as<bool>();
  if (args.count("history-max-file")) l.history_max_file = args["history-max-file"].as<std::string>();
  if (args.count("history-max-bytes")) l.history_max_bytes = args["history-max-bytes"].as<std::string>();
  if (args.count("stale-writes")) l.stale_writes = args["stale-writes"].as<std::string>();
  return l;
}

}  // namespace

int up_vm(const po::variables_map& args, const std::string& exe) {
  gate::vm::VmOptions o;
  o.repo_path = args["repo-path"].as<std::string>();
  if (args.count("vm-name")) o.name = args["vm-name"].as<std::string>();
  o.vm_dir = args["vm-dir"].as<std::string>();
  o.ssh_key = args["ssh-key"].as<std::string>();
  o.base = args["base"].as<std::string>();
  o.image = args["image"].as<std::string>();
  o.image_mirror = args["image-mirror"].as<std::string>();
  if (args.count("host-mount")) o.host_mount = args["host-mount"].as<std::string>();
  o.method = args["host-mount-method"].as<std::string>();
  o.ssh_port = args["ssh-port"].as<std::uint16_t>();
  o.memory_mib = args["memory"].as<int>();
  o.cpus = args["cpus"].as<int>();
  o.disk_size = args["disk-size"].as<std::string>();
  o.locks = lock_settings(args);
  o.accel = args["accel"].as<std::string>();
  if (o.accel != "auto" && o.accel != "kvm" && o.accel != "tcg") {
    std::cerr << "gate up: --accel must be auto, kvm or tcg\n";
    return 2;
  }
  o.redownload = args["redownload"].as<bool>();
  o.skip_build = args["skip-build"].as<bool>();
  o.skip_host_mount = args["skip-host-mount"].as<bool>();
  o.verbose = args["verbose"].as<bool>();
  o.dry_run = args["dry-run"].as<bool>();
  o.keep_vm_on_error = args["keep-vm-on-error"].as<bool>();
  o.ssh_wait_s = args["ssh-wait-s"].as<int>();
  o.gate_binary = exe;
  return gate::vm::vm_up(o, std::cout, std::cerr);
}

int up(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("repo-path", po::value<std::string>(), "the directory to share (required)")
      ("local", po::bool_switch(), "run the broker on this machine instead of in a VM")
      ("vm-name", po::value<std::string>(),
       "name of this setup (default: gate-vm; with --local, the directory's name)")
      ("vm-dir", po::value<std::string>()->default_value(""),
       "where the VM's disk lives (default: $XDG_STATE_HOME/gate/vms/NAME)")
      ("ssh-key", po::value<std::string>()->default_value(""),
       "public key to log into the VM with; its private key must be beside it "
       "(default: a key pair gate makes once)")
      ("base", po::value<std::string>()->default_value("debian-12"),
       "guest image: debian-12 (built here from Debian's packages), or a cloud image booted with its "
       "own kernel and provisioned by cloud-init: ubuntu-24.04, ubuntu-22.04, debian-12-cloud "
       "(downloaded, verified and cached)")
      ("image-mirror", po::value<std::string>()->default_value(""),
       "cloud images: a mirror laid out like the publisher's site (env GATE_IMAGE_MIRROR)")
      ("image", po::value<std::string>()->default_value(""), "a disk built by 'gate image build'")
      ("host-mount", po::value<std::string>(),
       "where the locked view appears (default: $XDG_STATE_HOME/gate/mounts/NAME)")
      ("host-mount-method", po::value<std::string>()->default_value("host-direct"),
       "host-direct (host FUSE mount, broker in the VM) or sshfs (mount served from the VM over "
       "the repository shared with virtio-fs; root only)")
      ("ssh-port", po::value<std::uint16_t>()->default_value(0), "host port for the VM's ssh (0: free one)")
      ("memory", po::value<int>()->default_value(1024), "VM memory in MiB")
      ("cpus", po::value<int>()->default_value(2), "VM CPUs")
      ("disk-size", po::value<std::string>()->default_value("20G"), "VM disk size")
      ("lease-ms", po::value<std::int64_t>(), "lease of each lock (env GATE_LEASE_MS)")
      ("max-hold-ms", po::value<std::int64_t>(), "hold cap of each lock (env GATE_MAX_HOLD_MS)")
      ("acquire-timeout-ms", po::value<std::int64_t>(),
       "with --local: opens give up (EAGAIN) after this long (env GATE_ACQUIRE_TIMEOUT_MS)")
      ("meta-wait-ms", po::value<std::int64_t>(),
       "chmod, rename, unlink, create... through the mount wait at most this long for their "
       "lock, then fail with EBUSY (default 1000; env GATE_META_WAIT_MS)")
      ("history-max-file", po::value<std::string>(),
       "the view keeps no version of files larger than this (default 8M)")
      ("history-max-bytes", po::value<std::string>(),
       "the view's history holds at most this much (default 1G)")
      ("no-history", po::bool_switch(), "the view keeps no history of replaced versions")
      ("stale-writes", po::value<std::string>(),
       "what the view does with a stale replacement: merge, refuse or off (default merge; "
       "off with --no-history; env GATE_STALE_WRITES)")
      ("accel", po::value<std::string>()->default_value("auto"),
       "auto (KVM when it really works, else TCG), kvm or tcg")
      ("redownload", po::bool_switch(), "rebuild (or download) the image and the VM disk")
      ("skip-build", po::bool_switch(), "never build an image; fail if none is cached")
      ("skip-host-mount", po::bool_switch(), "start everything but the host view")
      ("ssh-wait-s", po::value<int>()->default_value(300), "how long to wait for the VM's ssh")
      ("verbose", po::bool_switch(), "show every command as it runs")
      ("dry-run", po::bool_switch(), "print every step and command, run none")
      ("keep-vm-on-error", po::bool_switch(), "leave what was started running when a step fails");
  po::positional_options_description pos;
  pos.add("repo-path", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate up [--local] --repo-path DIR [options]",
                       "Brings up a broker and a locked view of DIR in the background and prints "
                       "where to work: the broker in a QEMU VM (default), or on this machine with "
                       "--local. Run again, it reuses what is up.",
                       &code, &pos);
  if (!args) return code;
  const std::string me = argv[0];
  if (!args->count("repo-path")) {
    std::cerr << me << ": which directory? e.g. gate up --local --repo-path ~/src/project\n";
    return 2;
  }
  for (const char* size : {"history-max-file", "history-max-bytes"})
    if (args->count(size) && !parse_size((*args)[size].as<std::string>()))
      return std::cerr << me << ": --" << size << " takes a size such as 8M or 1G\n", 2;
  if (args->count("stale-writes")) {
    const std::string v = (*args)["stale-writes"].as<std::string>();
    if (v != "merge" && v != "refuse" && v != "off")
      return std::cerr << me << ": --stale-writes must be merge, refuse or off, not '" << v << "'\n", 2;
    if (v == "merge" && (*args)["no-history"].as<bool>())
      return std::cerr << me << ": --stale-writes merge needs the history: drop --no-history, or use refuse\n", 2;
  }
  if (!(*args)["local"].as<bool>()) return up_vm(*args, self_exe());
  gate::vm::LocalOptions o;
  o.repo_path = (*args)["repo-path"].as<std::string>();
  if (args->count("vm-name")) o.name = (*args)["vm-name"].as<std::string>();
  if (args->count("host-mount")) o.host_mount = (*args)["host-mount"].as<std::string>();
  o.locks = lock_settings(*args);
  o.gate_binary = self_exe();
  return gate::vm::local_up(o, std::cout, std::cerr);
}

int down(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("vm-name", po::value<std::string>(), "which setup (default: the only one up)")
      ("skip-unmount", po::bool_switch(), "leave the host view mounted");
  po::positional_options_description pos;
  pos.add("vm-name", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate down [--vm-name NAME] [options]",
                       "Unmounts the locked view (releasing its locks) and stops what 'gate up' "
                       "started: the broker, or the VM and its tunnel.",
                       &code, &pos);
  if (!args) return code;
  const std::string me = argv[0];
  std::string name;
  if (args->count("vm-name")) {
    name = (*args)["vm-name"].as<std::string>();
  } else {
    auto all = list_stacks();
    if (all.empty()) {
      std::cout << "gate: nothing is up\n";
      return 0;
    }
    if (all.size() > 1) {
      std::cerr << me << ": several setups are up; say which with --vm-name:";
      for (auto& n : all) std::cerr << " " << n;
      std::cerr << "\n";
      return 2;
    }
    name = all.front();
  }
  auto s = load_stack(name);
  if (!s) {
    std::cout << "gate: '" << name << "' is not up\n";
    return 0;
  }
  bool clean;
  if (s->mode == "vm") {
    gate::vm::DownOptions o;
    o.skip_unmount = (*args)["skip-unmount"].as<bool>();
    clean = gate::vm::vm_down(*s, o, std::cout, std::cerr);
  } else {
    clean = gate::vm::local_down(*s, std::cerr);
    remove_stack_state(name);
  }
  if (!clean)
    return cli::fail(me, "'" + name + "' stopped, but " + s->mount +
                             " is still mounted; run: fusermount3 -uz " + s->mount);
  std::cout << "gate: '" << name << "' is down (logs kept in " << s->log_dir() << "/)\n";
  return 0;
}

}  // namespace gate::cmd
