#pragma once
// Child processes for gate's own use: run a command and capture its output, start
// a daemon and wait until it says it is ready, wait for a pid to end, and check
// whether a pid is alive. One place, so that every child is logged the same way.
#include <sys/types.h>

#include <chrono>
#include <iosfwd>
#include <string>
#include <vector>

namespace gate {

struct RunResult {
  int status = -1;  // exit status; 128+signal when killed; -1 when it could not run
  std::string output;  // stdout and stderr together
};

// Runs argv[0] (searched in PATH) to completion, at most `timeout`.
RunResult run_command(const std::vector<std::string>& argv,
                      std::chrono::milliseconds timeout = std::chrono::seconds(60));

// run_command that appends a timestamped "$ command" line, the output and the exit
// status to log_path, and also shows the command on *echo when given.
RunResult run_logged(const std::vector<std::string>& argv, const std::string& log_path,
                     std::chrono::milliseconds timeout, std::ostream* echo = nullptr);

// One string for logs and --dry-run, quoted as a shell would need it.
std::string shell_join(const std::vector<std::string>& argv);

struct Daemon {
  pid_t pid = -1;
  std::string ready_line;  // what the daemon wrote to its ready fd
  std::string error;       // non-empty when it did not become ready
};

// Starts argv in its own session with stdin from /dev/null and stdout/stderr
// appended to log_path. The string "{READY_FD}" in argv is replaced by the number
// of a pipe the daemon writes one line to once it is ready; waits for that line at
// most `timeout` (on failure the daemon is killed and error says why). Without
// "{READY_FD}" it returns at once with the pid.
Daemon start_daemon(const std::vector<std::string>& argv, const std::string& log_path,
                    std::chrono::milliseconds timeout);

bool process_alive(pid_t pid);
// Whether pid is alive and its command line mentions `marker`: guards against a pid
// that a crash or reboot freed and an unrelated process reused.
bool process_runs(pid_t pid, const std::string& marker);
// SIGTERM, wait up to `grace`, then SIGKILL, for a process that process_runs().
// True when it is gone (or was never ours).
bool stop_process(pid_t pid, const std::string& marker, std::chrono::milliseconds grace);
// Waits for a process (not necessarily our child) to end. False on time-out.
bool wait_for_exit(pid_t pid, std::chrono::milliseconds timeout);

// The last `lines` lines of a file, for error messages.
std::string tail_file(const std::string& path, int lines);

}  // namespace gate
