#include "vm/local_stack.h"

#include <filesystem>
#include <ostream>

#include "core/config.h"
#include "core/iso_time.h"
#include "core/mounts.h"
#include "core/process.h"

namespace gate::vm {

namespace fs = std::filesystem;

namespace {

bool stop_pid(pid_t pid, const std::string& marker, const char* what, std::ostream& err) {
  if (stop_process(pid, marker, std::chrono::seconds(10))) return true;
  err << "gate down: the " << what << " (pid " << pid << ") did not stop\n";
  return false;
}

int failed(std::ostream& err, const std::string& message) {
  err << "gate up: " << message << "\n";
  return 1;
}

}  // namespace

bool local_down(const StackState& s, std::ostream& err) {
  bool ok = stop_pid(s.mount_pid, s.broker_socket, "mount", err);
  ok = unmount_fuse(s.mount) && ok;
  return stop_pid(s.broker_pid, s.broker_socket, "broker", err) && ok;
}

void print_local_summary(const StackState& s, const std::string& headline, std::ostream& out) {
  out << headline << "\n"
      << "  work in:  " << s.mount << "   (a locked view of " << s.repo << ")\n"
      << "  locks:    gate locks --broker-socket " << s.broker_socket << "\n"
      << "  logs:     " << s.log_dir() << "/\n"
      << "  stop:     gate down --vm-name " << s.name << "\n";
}

int local_up(const LocalOptions& o, std::ostream& out, std::ostream& err) {
  std::error_code ec;
  const fs::path repo = fs::canonical(o.repo_path, ec);
  if (ec || !fs::is_directory(repo)) return failed(err, "'" + o.repo_path + "' is not a directory");

  StackState s;
  s.name = o.name.empty() ? stack_name_for(repo.string()) : o.name;
  if (auto old = load_stack(s.name)) {
    if (process_runs(old->broker_pid, old->broker_socket) &&
        process_runs(old->mount_pid, old->broker_socket)) {
      if (old->repo != repo.string())
        return failed(err, "'" + s.name + "' is already up for " + old->repo +
                               "; choose another --vm-name");
      print_local_summary(*old, "gate: '" + s.name + "' is already up", out);
      return 0;
    }
    err << "gate up: '" << s.name << "' was left half up; cleaning it first\n";
    local_down(*old, err);
    remove_stack_state(s.name);
  }

  s.repo = repo.string();
  s.mount = o.host_mount.empty() ? user_state_root() + "/mounts/" + s.name
                                 : fs::absolute(o.host_mount).string();
  s.broker_state_dir = s.state_dir() + "/broker";
  s.broker_socket = s.state_dir() + "/broker.sock";
  s.started_at = format_iso8601(wall_clock_micros());
  for (const auto& dir : {s.broker_state_dir, s.log_dir(), s.mount}) {
    fs::create_directories(dir, ec);
    if (ec) return failed(err, "cannot create " + dir + ": " + ec.message());
  }

  const std::string broker_log = s.log_dir() + "/broker.log", mount_log = s.log_dir() + "/mount.log";
  out << "gate: starting the broker (log " << broker_log << ")\n" << std::flush;
  Daemon broker = start_daemon(broker_command(o.gate_binary, s.broker_state_dir, s.broker_socket, o.locks),
                               broker_log, std::chrono::seconds(20));
  if (broker.pid < 0)
    return failed(err, "the broker did not start: " + broker.error + "; last lines of " +
                           broker_log + ":\n" + tail_file(broker_log, 5));
  s.broker_pid = broker.pid;

  out << "gate: mounting " << s.repo << " at " << s.mount << " (log " << mount_log << ")\n"
      << std::flush;
  MountCommand m;
  m.gate = o.gate_binary;
  m.root = s.repo;
  m.mountpoint = s.mount;
  m.broker_socket = s.broker_socket;
  Daemon mount = start_daemon(mount_command(m, o.locks), mount_log, std::chrono::seconds(20));
  if (mount.pid < 0) {
    stop_pid(s.broker_pid, s.broker_socket, "broker", err);
    return failed(err, "the mount did not start: " + mount.error + "; last lines of " + mount_log +
                           ":\n" + tail_file(mount_log, 5));
  }
  s.mount_pid = mount.pid;
  if (Status saved = save_stack(s); !saved.ok()) {
    local_down(s, err);
    return failed(err, saved.message());
  }
  print_local_summary(s, "gate: '" + s.name + "' is up", out);
  return 0;
}

}  // namespace gate::vm
