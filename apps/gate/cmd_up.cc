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
#include "core/process.h"
#include "local_stack.h"

namespace gate::cmd {

namespace fs = std::filesystem;

namespace {

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? "gate" : p.string();
}

// Whether pid still runs a command line that mentions `marker` (guards against a
// pid reused by an unrelated process after a crash or reboot).
bool ours(pid_t pid, const std::string& marker) {
  if (!process_alive(pid)) return false;
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return cmdline.find(marker) != std::string::npos;
}

bool is_mounted(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // Field 5 is the mount point (with spaces escaped as \040).
    std::size_t pos = 0;
    for (int i = 0; i < 4 && pos != std::string::npos; ++i) pos = line.find(' ', pos + 1);
    if (pos == std::string::npos) continue;
    auto end = line.find(' ', pos + 1);
    std::string mp = line.substr(pos + 1, end - pos - 1);
    std::string decoded;
    for (std::size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded.push_back(static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8)));
        i += 3;
      } else {
        decoded.push_back(mp[i]);
      }
    }
    if (decoded == path) return true;
  }
  return false;
}

void unmount(const std::string& path, bool lazy) {
  run_command({"fusermount3", lazy ? "-uz" : "-u", path}, std::chrono::seconds(10));
}

bool stop_pid(pid_t pid, const std::string& marker, const char* what) {
  if (!ours(pid, marker)) return true;
  ::kill(pid, SIGTERM);
  if (wait_for_exit(pid, std::chrono::seconds(10))) return true;
  std::cerr << "gate down: the " << what << " (pid " << pid
            << ") did not stop within 10 s; killing it\n";
  ::kill(pid, SIGKILL);
  return wait_for_exit(pid, std::chrono::seconds(5));
}

// Stops what a stack started, whatever state it is in; true when nothing is left.
bool stop_stack(const StackState& s) {
  bool ok = stop_pid(s.mount_pid, s.broker_socket, "mount");
  if (is_mounted(s.mount)) unmount(s.mount, false);
  if (is_mounted(s.mount)) unmount(s.mount, true);
  ok = stop_pid(s.broker_pid, s.broker_socket, "broker") && ok;
  return ok && !is_mounted(s.mount);
}

void print_summary(const StackState& s, const std::string& headline) {
  std::cout << headline << "\n"
            << "  work in:  " << s.mount << "   (a locked view of " << s.repo << ")\n"
            << "  locks:    gate locks --broker-socket " << s.broker_socket << "\n"
            << "  logs:     " << s.log_dir() << "/\n"
            << "  stop:     gate down --name " << s.name << "\n";
}

}  // namespace

int up(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("local", po::bool_switch(), "run the broker on this machine (no VM)")
      ("repo-path", po::value<std::string>(), "the directory to share (required)")
      ("name", po::value<std::string>(), "name of this setup (default: the directory's name)")
      ("host-mount", po::value<std::string>(),
       "where the locked view appears (default: $XDG_STATE_HOME/gate/mounts/NAME)")
      ("lease-ms", po::value<std::int64_t>(), "lease of each lock (env GATE_LEASE_MS)")
      ("max-hold-ms", po::value<std::int64_t>(), "hold cap of each lock (env GATE_MAX_HOLD_MS)")
      ("acquire-timeout-ms", po::value<std::int64_t>(),
       "opens give up (EAGAIN) after this long (env GATE_ACQUIRE_TIMEOUT_MS)");
  po::positional_options_description pos;
  pos.add("repo-path", 1);
  int code = 0;
  auto vm = cli::parse(argc, argv, desc, "gate up --local [--repo-path] DIR [options]",
                       "Starts a broker and a locked FUSE view of DIR in the background and "
                       "prints where to work. Run again, it reuses what is up.",
                       &code, &pos);
  if (!vm) return code;
  const std::string me = argv[0];
  if (!vm->count("repo-path")) {
    std::cerr << me << ": which directory? e.g. gate up --local --repo-path ~/src/project\n";
    return 2;
  }
  if (!(*vm)["local"].as<bool>()) {
    std::cerr << me << ": this build runs the broker on this machine only: add --local\n";
    return 2;
  }
  std::error_code ec;
  const fs::path repo = fs::canonical((*vm)["repo-path"].as<std::string>(), ec);
  if (ec || !fs::is_directory(repo))
    return cli::fail(me, "'" + (*vm)["repo-path"].as<std::string>() + "' is not a directory");

  StackState s;
  s.name = vm->count("name") ? (*vm)["name"].as<std::string>() : stack_name_for(repo.string());
  if (auto old = load_stack(s.name)) {
    if (ours(old->broker_pid, old->broker_socket) && ours(old->mount_pid, old->broker_socket)) {
      if (old->repo != repo.string())
        return cli::fail(me, "'" + s.name + "' is already up for " + old->repo +
                                 "; choose another --name");
      print_summary(*old, "gate: '" + s.name + "' is already up");
      return 0;
    }
    std::cerr << me << ": '" << s.name << "' was left half up; cleaning it first\n";
    stop_stack(*old);
    remove_stack_state(s.name);
  }

  s.repo = repo.string();
  s.mount = vm->count("host-mount") ? fs::absolute((*vm)["host-mount"].as<std::string>()).string()
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
    if (!vm->count(opt)) continue;
    const std::string v = std::to_string((*vm)[opt].as<std::int64_t>());
    broker_argv.insert(broker_argv.end(), {std::string("--") + opt, v});
    mount_argv.insert(mount_argv.end(), {std::string("--") + opt, v});
  }
  if (vm->count("acquire-timeout-ms"))
    mount_argv.insert(mount_argv.end(), {"--acquire-timeout-ms",
                                         std::to_string((*vm)["acquire-timeout-ms"].as<std::int64_t>())});

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
  std::string error;
  if (!save_stack(s, &error)) {
    stop_stack(s);
    return cli::fail(me, error);
  }
  print_summary(s, "gate: '" + s.name + "' is up");
  return 0;
}

int down(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("name", po::value<std::string>(), "which setup (default: the only one up)");
  po::positional_options_description pos;
  pos.add("name", 1);
  int code = 0;
  auto vm = cli::parse(argc, argv, desc, "gate down [--name NAME]",
                       "Unmounts the locked view (releasing its locks) and stops the broker that "
                       "'gate up' started.",
                       &code, &pos);
  if (!vm) return code;
  const std::string me = argv[0];
  std::string name;
  if (vm->count("name")) {
    name = (*vm)["name"].as<std::string>();
  } else {
    auto all = list_stacks();
    if (all.empty()) {
      std::cout << "gate: nothing is up\n";
      return 0;
    }
    if (all.size() > 1) {
      std::cerr << me << ": several setups are up; say which with --name:";
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
  const bool clean = stop_stack(*s);
  remove_stack_state(name);
  if (!clean)
    return cli::fail(me, "'" + name + "' stopped, but " + s->mount +
                             " is still mounted; run: fusermount3 -uz " + s->mount);
  std::cout << "gate: '" << name << "' is down (logs kept in " << s->log_dir() << "/)\n";
  return 0;
}

}  // namespace gate::cmd
