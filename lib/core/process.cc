#include "core/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <deque>
#include <fstream>
#include <ostream>

#include "core/iso_time.h"

namespace gate {

namespace {

std::vector<char*> to_argv(std::vector<std::string>& args) {
  std::vector<char*> out;
  for (auto& a : args) out.push_back(a.data());
  out.push_back(nullptr);
  return out;
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

int pidfd_for(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

// In a child before exec: close every descriptor from `from` up (but `keep`), so
// that children see only stdio (some tools, e.g. mmdebstrap's dash scripts, break
// when they get high descriptor numbers).
void close_inherited(int from, int keep = -1) {
  if (keep >= from) {
    ::syscall(SYS_close_range, from, keep - 1, 0);
    ::syscall(SYS_close_range, keep + 1, ~0U, 0);
  } else {
    ::syscall(SYS_close_range, from, ~0U, 0);
  }
}

}  // namespace

RunResult run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  RunResult result;
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return result;
  std::vector<std::string> args = argv;
  auto cargv = to_argv(args);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(out[0]);
    ::close(out[1]);
    return result;
  }
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    close_inherited(3);
    ::execvp(cargv[0], cargv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  char buf[4096];
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ::kill(pid, SIGKILL);
      result.output += "\n(killed after " + std::to_string(timeout.count()) + " ms)";
      break;
    }
    pollfd p{out[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    ssize_t n = ::read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    result.output.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  result.status = decode_status(status);
  return result;
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) {
    if (!out.empty()) out.push_back(' ');
    const bool plain = !a.empty() && a.find_first_not_of(
                                         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                         "0123456789-_./:=,@+%") == std::string::npos;
    if (plain) {
      out += a;
      continue;
    }
    out.push_back('\'');
    for (char c : a) {
      if (c == '\'') out += "'\\''";
      else out.push_back(c);
    }
    out.push_back('\'');
  }
  return out;
}

RunResult run_logged(const std::vector<std::string>& argv, const std::string& log_path,
                     std::chrono::milliseconds timeout, std::ostream* echo) {
  if (echo) *echo << "gate: $ " << shell_join(argv) << "\n" << std::flush;
  {
    std::ofstream out(log_path, std::ios::app);
    out << format_iso8601(wall_clock_micros()) << " $ " << shell_join(argv) << "\n";
  }
  RunResult r = run_command(argv, timeout);
  std::ofstream out(log_path, std::ios::app);
  out << r.output << (r.output.empty() || r.output.back() == '\n' ? "" : "\n") << "(exit "
      << r.status << ")\n";
  return r;
}

Daemon start_daemon(const std::vector<std::string>& argv, const std::string& log_path,
                    std::chrono::milliseconds timeout) {
  Daemon d;
  int ready[2];
  if (::pipe2(ready, O_CLOEXEC) != 0) {
    d.error = "pipe failed";
    return d;
  }
  std::vector<std::string> args = argv;
  bool wants_ready = false;
  for (auto& a : args)
    if (a == "{READY_FD}") {
      a = std::to_string(ready[1]);
      wants_ready = true;
    }
  auto cargv = to_argv(args);
  const int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    d.error = "cannot open log file " + log_path;
    ::close(ready[0]);
    ::close(ready[1]);
    return d;
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setsid();
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::fcntl(ready[1], F_SETFD, 0);  // the daemon keeps the write end
    close_inherited(3, wants_ready ? ready[1] : -1);
    ::signal(SIGINT, SIG_DFL);
    ::execvp(cargv[0], cargv.data());
    ::_exit(127);
  }
  ::close(log_fd);
  ::close(ready[1]);
  if (pid < 0) {
    ::close(ready[0]);
    d.error = "fork failed";
    return d;
  }
  d.pid = pid;
  if (!wants_ready) {
    ::close(ready[0]);
    return d;
  }
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (line.find('\n') == std::string::npos) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{ready[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    char buf[256];
    ssize_t n = ::read(ready[0], buf, sizeof buf);
    if (n <= 0) break;  // the daemon exited (or closed the fd) without a word
    line.append(buf, static_cast<std::size_t>(n));
  }
  ::close(ready[0]);
  if (line.find('\n') == std::string::npos) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      d.error = "it exited with status " + std::to_string(decode_status(status));
    } else {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      d.error = "it was not ready after " + std::to_string(timeout.count()) + " ms";
    }
    d.pid = -1;
    return d;
  }
  d.ready_line = line.substr(0, line.find('\n'));
  return d;
}

bool process_alive(pid_t pid) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  // A zombie (ours, or one whose parent does not reap it) counts as gone.
  int status;
  if (::waitpid(pid, &status, WNOHANG) == pid) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text;
  std::getline(stat, text);
  auto paren = text.rfind(')');
  if (paren != std::string::npos && paren + 2 < text.size()) {
    const char state = text[paren + 2];
    if (state == 'Z' || state == 'X') return false;
  }
  return true;
}

bool process_runs(pid_t pid, const std::string& marker) {
  if (!process_alive(pid)) return false;
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return cmdline.find(marker) != std::string::npos;
}

bool stop_process(pid_t pid, const std::string& marker, std::chrono::milliseconds grace) {
  if (!process_runs(pid, marker)) return true;
  ::kill(pid, SIGTERM);
  if (wait_for_exit(pid, grace)) return true;
  ::kill(pid, SIGKILL);
  return wait_for_exit(pid, std::chrono::seconds(5));
}

bool wait_for_exit(pid_t pid, std::chrono::milliseconds timeout) {
  if (!process_alive(pid)) return true;
  int fd = pidfd_for(pid);
  if (fd < 0) return !process_alive(pid);
  pollfd p{fd, POLLIN, 0};
  int r;
  do {
    r = ::poll(&p, 1, static_cast<int>(timeout.count()));
  } while (r < 0 && errno == EINTR);
  ::close(fd);
  int status;
  ::waitpid(pid, &status, WNOHANG);  // reap it if it was our child
  return r > 0 || !process_alive(pid);
}

std::string tail_file(const std::string& path, int lines) {
  std::ifstream in(path);
  std::deque<std::string> last;
  std::string line;
  while (std::getline(in, line)) {
    last.push_back(line);
    if (static_cast<int>(last.size()) > lines) last.pop_front();
  }
  std::string out;
  for (auto& l : last) out += "  " + l + "\n";
  return out;
}

}  // namespace gate
