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

bool stop_pid(pid_t pid, const std::string& marker, const char* what) {
  if (stop_process(pid, marker, std::chrono::seconds(10))) return true;
  std::cerr << "gate down: the " << what << " (pid " << pid << ") did not stop\n";
  return false;
}

// Stops what a stack started, whatever state it is in; true when nothing is left.
bool stop_stack(const StackState& s) {
  bool ok = stop_pid(s.mount_pid, s.broker_socket, "mount");
  ok = unmount_fuse(s.mount) && ok;
  return stop_pid(s.broker_pid, s.broker_socket, "broker") && ok;
}

void print_summary(const StackState& s, const std::string& headline) {
  std::cout << headline << "\n"
            << "  work in:  " << s.mount << "   (a locked view of " << s.repo << ")\n"
            << "  locks:    gate locks --broker-socket " << s.broker_socket << "\n"
            << "  logs:     " << s.log_dir() << "/\n"
            << "  stop:     gate down --vm-name " << s.name << "\n";
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
  if (args.count("host-mount")) o.host_mount = args["host-mount"].as<std::string>();
  o.method = args["host-mount-method"].as<std::string>();
  o.ssh_port = args["ssh-port"].as<std::uint16_t>();
  o.memory_mib = args["memory"].as<int>();
  o.cpus = args["cpus"].as<int>();
  o.disk_size = args["disk-size"].as<std::string>();
  if (args.count("max-hold-ms")) o.max_hold_ms = args["max-hold-ms"].as<std::int64_t>();
  if (args.count("lease-ms")) o.lease_ms = args["lease-ms"].as<std::int64_t>();
  if (args.count("meta-wait-ms")) o.meta_wait_ms = args["meta-wait-ms"].as<std::int64_t>();
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
       "guest image: debian-12 (built here from Debian's packages), ubuntu-24.04, ubuntu-22.04")
      ("image", po::value<std::string>()->default_value(""), "a disk built by 'gate image build'")
      ("host-mount", po::value<std::string>(),
       "where the locked view appears (default: $XDG_STATE_HOME/gate/mounts/NAME)")
      ("host-mount-method", po::value<std::string>()->default_value("host-direct"),
       "host-direct (host FUSE mount, broker in the VM) or sshfs (mount served from the VM)")
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
  if (!(*args)["local"].as<bool>()) return up_vm(*args, self_exe());
  std::error_code ec;
  const fs::path repo = fs::canonical((*args)["repo-path"].as<std::string>(), ec);
  if (ec || !fs::is_directory(repo))
    return cli::fail(me, "'" + (*args)["repo-path"].as<std::string>() + "' is not a directory");

  StackState s;
  s.name = args->count("vm-name") ? (*args)["vm-name"].as<std::string>() : stack_name_for(repo.string());
  if (auto old = load_stack(s.name)) {
    if (process_runs(old->broker_pid, old->broker_socket) && process_runs(old->mount_pid, old->broker_socket)) {
      if (old->repo != repo.string())
        return cli::fail(me, "'" + s.name + "' is already up for " + old->repo +
                                 "; choose another --vm-name");
      print_summary(*old, "gate: '" + s.name + "' is already up");
      return 0;
    }
    std::cerr << me << ": '" << s.name << "' was left half up; cleaning it first\n";
    stop_stack(*old);
    remove_stack_state(s.name);
  }

  s.repo = repo.string();
  s.mount = args->count("host-mount") ? fs::absolute((*args)["host-mount"].as<std::string>()).string()
                                    : user_state_root() + "/mounts/" + s.name;
  s.broker_state_dir = s.state_dir() + "/broker";
  s.broker_socket = s.state_dir() + "/broker.sock";
  s.started_at = format_iso8601(wall_clock_micros());
  for (const auto& dir : {s.broker_state_dir, s.log_dir(), s.mount}) {
    fs::create_directories(dir, ec);
    if (ec) return cli::fail(me, "cannot create " + dir + ": " + ec.message());
  }

  const std::string exe = self_exe();
  std::vector<std::string> broker_argv = {exe, "broker", "--state-dir", s.broker_state_dir,
                                          "--port", "0", "--unix-socket", s.broker_socket,
                                          "--ready-fd", "{READY_FD}"};
  std::vector<std::string> mount_argv = {exe, "mount", "--foreground", "--root", s.repo,
                                         "--mount", s.mount, "--broker-socket", s.broker_socket,
                                         "--ready-fd", "{READY_FD}"};
  for (const char* opt : {"lease-ms", "max-hold-ms"}) {
    if (!args->count(opt)) continue;
    const std::string v = std::to_string((*args)[opt].as<std::int64_t>());
    broker_argv.insert(broker_argv.end(), {std::string("--") + opt, v});
    mount_argv.insert(mount_argv.end(), {std::string("--") + opt, v});
  }
  if (args->count("meta-wait-ms"))
    mount_argv.insert(mount_argv.end(),
                      {"--meta-wait-ms", std::to_string((*args)["meta-wait-ms"].as<std::int64_t>())});
  if (args->count("acquire-timeout-ms"))
    mount_argv.insert(mount_argv.end(), {"--acquire-timeout-ms",
                                         std::to_string((*args)["acquire-timeout-ms"].as<std::int64_t>())});

  std::cout << "gate: starting the broker (log " << s.log_dir() << "/broker.log)\n" << std::flush;
  Daemon broker = start_daemon(broker_argv, s.log_dir() + "/broker.log", std::chrono::seconds(20));
  if (broker.pid < 0)
    return cli::fail(me, "the broker did not start: " + broker.error + "; last lines of " +
                             s.log_dir() + "/broker.log:\n" + tail_file(s.log_dir() + "/broker.log", 5));
  s.broker_pid = broker.pid;

  std::cout << "gate: mounting " << s.repo << " at " << s.mount << " (log " << s.log_dir()
            << "/mount.log)\n" << std::flush;
  Daemon mount = start_daemon(mount_argv, s.log_dir() + "/mount.log", std::chrono::seconds(20));
  if (mount.pid < 0) {
    stop_pid(s.broker_pid, s.broker_socket, "broker");
    return cli::fail(me, "the mount did not start: " + mount.error + "; last lines of " +
                             s.log_dir() + "/mount.log:\n" + tail_file(s.log_dir() + "/mount.log", 5));
  }
  s.mount_pid = mount.pid;
  if (Status saved = save_stack(s); !saved.ok()) {
    stop_stack(s);
    return cli::fail(me, saved.message());
  }
  print_summary(s, "gate: '" + s.name + "' is up");
  return 0;
}

int down(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("vm-name", po::value<std::string>(), "which setup (default: the only one up)")
      ("force", po::bool_switch(), "stop even if copying the VM's edits back fails")
      ("skip-unmount", po::bool_switch(), "leave the host view mounted")
      ("no-sync-back", po::bool_switch(), "sshfs: do not copy the VM's edits back into the repository");
  po::positional_options_description pos;
  pos.add("vm-name", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate down [--vm-name NAME] [options]",
                       "Unmounts the locked view (releasing its locks) and stops what 'gate up' "
                       "started: the broker, or the VM and its tunnel. In sshfs mode the VM's "
                       "edits are first copied back into the repository.",
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
    o.force = (*args)["force"].as<bool>();
    o.skip_unmount = (*args)["skip-unmount"].as<bool>();
    o.no_sync_back = (*args)["no-sync-back"].as<bool>();
    clean = gate::vm::vm_down(*s, o, std::cout, std::cerr);
    if (!clean && load_stack(name)) return 1;  // refused: the VM keeps the edits
  } else {
    clean = stop_stack(*s);
    remove_stack_state(name);
  }
  if (!clean)
    return cli::fail(me, "'" + name + "' stopped, but " + s->mount +
                             " is still mounted; run: fusermount3 -uz " + s->mount);
  std::cout << "gate: '" << name << "' is down (logs kept in " << s->log_dir() << "/)\n";
  return 0;
}

}  // namespace gate::cmd
