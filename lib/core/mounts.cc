#include "core/mounts.h"

#include <sys/stat.h>
#include <poll.h>
#include <signal.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/process.h"

namespace gate {

namespace {

// mountinfo writes space, tab, newline and backslash as \NNN (octal).
std::string unescape_mountinfo(const std::string& field) {
  std::string decoded;
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size()) {
      decoded.push_back(static_cast<char>(std::stoi(field.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      decoded.push_back(field[i]);
    }
  }
  return decoded;
}

struct MountEntry {
  std::string mountpoint, fstype, source;
};

// Each line: id parent dev root MOUNTPOINT options [optional...] - FSTYPE SOURCE superopts
std::vector<MountEntry> read_mountinfo() {
  std::vector<MountEntry> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> fields;
    for (std::string w; f >> w;) fields.push_back(w);
    if (fields.size() < 5) continue;
    MountEntry e;
    e.mountpoint = unescape_mountinfo(fields[4]);
    for (std::size_t i = 5; i + 2 < fields.size(); ++i)
      if (fields[i] == "-") {
        e.fstype = fields[i + 1];
        e.source = unescape_mountinfo(fields[i + 2]);
        break;
      }
    out.push_back(std::move(e));
  }
  return out;
}

// The errno of a statfs of `path` (0: it answered), asked in a child so that a view
// whose daemon hangs cannot hang the caller: ETIMEDOUT when no answer came within
// `limit` (the child, maybe stuck in the kernel, is killed and left to init).
int statfs_errno(const std::string& path, std::chrono::milliseconds limit) {
  const char* name = path.c_str();
  const pid_t pid = ::fork();
  if (pid < 0) return errno;
  if (pid == 0) {
    struct statfs st {};
    ::_exit(::statfs(name, &st) == 0 ? 0 : (errno & 0xff));
  }
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  bool answered = true;
  if (pidfd >= 0) {
    pollfd p{pidfd, POLLIN, 0};
    int r;
    do r = ::poll(&p, 1, static_cast<int>(limit.count()));
    while (r < 0 && errno == EINTR);
    answered = r > 0;
    ::close(pidfd);
  }
  int status = 0;
  if (!answered) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, WNOHANG);
    return ETIMEDOUT;
  }
  if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return ECHILD;
  return WEXITSTATUS(status);
}

}  // namespace

bool listed_in_mountinfo(const std::string& path) {
  for (const auto& e : read_mountinfo())
    if (e.mountpoint == path) return true;
  return false;
}

std::vector<GateView> gate_views() {
  std::vector<GateView> out;
  for (const auto& e : read_mountinfo())
    if (e.fstype == "fuse.gate" && e.source.rfind("gate:", 0) == 0)
      out.push_back({e.source.substr(5), e.mountpoint});
  return out;
}

MountState mount_state(const std::string& path) {
  // statfs, not stat: the kernel answers a stat of a FUSE view's root from its cache
  // of the root's attributes (a day, on a watched view) even after the daemon died,
  // while a statfs always goes to the connection, which then answers ENOTCONN. A
  // daemon that does not answer within the limit is alive, if hung: not stale.
  if (statfs_errno(path, std::chrono::seconds(2)) == ENOTCONN) return MountState::Stale;
  // As mountinfo writes it: absolute and normalised, without touching the path (which
  // may be a view whose daemon is stopped).
  std::error_code ec;
  std::string listed = std::filesystem::absolute(path, ec).lexically_normal().string();
  if (listed.size() > 1 && listed.back() == '/') listed.pop_back();
  return listed_in_mountinfo(listed) ? MountState::Mounted : MountState::NotMounted;
}

bool unmount_fuse(const std::string& path) {
  if (mount_state(path) == MountState::NotMounted) return true;
  run_command({"fusermount3", "-u", path}, std::chrono::seconds(10));
  if (listed_in_mountinfo(path)) run_command({"fusermount3", "-uz", path}, std::chrono::seconds(10));
  return !listed_in_mountinfo(path);
}

}  // namespace gate
