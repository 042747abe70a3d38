#pragma once
// The locked mount's test fixture: a real broker's view of a key, a real
// `gate mount` process, forked processes that talk to the test over pipes, and
// small file helpers. Every wait is bounded; mounts and processes are taken down
// by RAII even when a check fails.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "client/broker_client.h"
#include "client/wire_key.h"
#include "support/test_support.h"

namespace gate::test {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

inline bool is_mounted(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string id, parent, dev, root, point;
    f >> id >> parent >> dev >> root >> point;
    if (point == path) return true;
  }
  return false;
}

inline bool have_tool(const std::string& name) {
  return std::system(("command -v " + name + " >/dev/null 2>&1").c_str()) == 0;
}

inline void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

inline std::string slurp(const std::string& path) { return gate::test::read_file(path); }

// Runs a shell script (bounded); returns the exit status, output in *out.
inline int sh(const std::string& script, std::string* out = nullptr, std::chrono::seconds limit = 60s) {
  TempDir tmp("gate-sh");
  const std::string log = tmp.path() + "/out";
  Child c = Child::spawn({"/bin/sh", "-c", script}, log);
  int status = c.wait(limit);
  if (out) *out = slurp(log);
  return status;
}

// What the broker says about one key.
struct KeyState {
  std::vector<std::string> holders;  // modes of held locks
  std::size_t queued = 0;
};

inline KeyState key_state(const BrokerEndpoint& ep, const std::string& key) {
  BrokerClient client(ep);
  gate::HttpReply r = client.status(key);
  KeyState s;
  if (r.status != 200) return s;
  boost::json::value v = boost::json::parse(r.body);
  const std::string wire = gate::wire_key(key);  // as the broker names it
  for (auto& l : v.at("locks").as_array())
    if (l.at("path").as_string() == wire) s.holders.emplace_back(l.at("mode").as_string());
  for (auto& q : v.at("queue").as_array())
    if (q.at("path").as_string() == wire) ++s.queued;
  return s;
}

// The fence of the first lock held on `key` (0: none).
inline std::uint64_t key_state_fence(const BrokerEndpoint& ep, const std::string& key) {
  BrokerClient client(ep);
  gate::HttpReply r = client.status(key);
  if (r.status != 200) return 0;
  const boost::json::value v = boost::json::parse(r.body);
  for (auto& l : v.at("locks").as_array())
    if (l.at("path").as_string() == gate::wire_key(key)) return l.at("fence").to_number<std::uint64_t>();
  return 0;
}

inline std::size_t total_locks(const BrokerEndpoint& ep) {
  BrokerClient client(ep);
  gate::HttpReply r = client.status();
  if (r.status != 200) return 999;
  return boost::json::parse(r.body).at("locks").as_array().size();
}

inline std::size_t total_queued(const BrokerEndpoint& ep) {
  BrokerClient client(ep);
  gate::HttpReply r = client.status();
  if (r.status != 200) return 999;
  return boost::json::parse(r.body).at("queue").as_array().size();
}

// `gate mount --foreground` on a fresh root (or `root`, kept) and mount point; up
// when constructed, unmounted (SIGTERM, then fusermount3 -u / -uz) when destroyed.
class Mount {
 public:
  explicit Mount(const BrokerEndpoint& ep, std::vector<std::string> extra = {}, std::string root = "")
      : base_("gate-mount-test"),
        root_(root.empty() ? base_.path() + "/root" : std::move(root)),
        mnt_(base_.path() + "/mnt") {
    ::mkdir(root_.c_str(), 0755);
    ::mkdir(mnt_.c_str(), 0755);
    log_path_ = base_.path() + "/mount.log";
    start(ep, std::move(extra));
  }
  ~Mount() { take_down(); }

  const std::string& root() const { return root_; }
  const std::string& mnt() const { return mnt_; }
  std::string at(const std::string& rel) const { return mnt_ + "/" + rel; }
  std::string in_root(const std::string& rel) const { return root_ + "/" + rel; }
  std::string log() const { return slurp(log_path_); }
  const std::string& scratch() const { return base_.path(); }
  pid_t pid() const { return child_.pid(); }

  void kill9() { child_.kill_and_wait(); }
  // The view's next process: the dead mount (after kill9()) unmounted, and a new one
  // on the same root and mount point, as after a crash and a restart.
  void restart(const BrokerEndpoint& ep, std::vector<std::string> extra = {}) {
    take_down();
    start(ep, std::move(extra));
  }
  // Waits for the mount to end by itself: its exit status (128 + signal), -1 on timeout.
  int wait_exit(std::chrono::milliseconds timeout) { return child_.wait(timeout); }
  std::string history_dir() const { return base_.path() + "/history"; }
  int terminate() {
    child_.signal(SIGTERM);
    return child_.wait(15s);
  }

 private:
  void start(const BrokerEndpoint& ep, std::vector<std::string> extra) {
    std::vector<std::string> argv = {gate::test::gate_binary(), "mount", "--foreground",
                                     "--root", root_, "--mount", mnt_,
                                     "--log-level", "debug", "--owner", "test"};
    if (!ep.unix_socket.empty()) {
      argv.insert(argv.end(), {"--broker-socket", ep.unix_socket});
    } else {
      argv.insert(argv.end(), {"--broker-host", ep.host, "--broker-port", std::to_string(ep.port)});
    }
    // The history goes into the scratch directory (removed with it), unless the test
    // chooses.
    if (std::find(extra.begin(), extra.end(), "--history-dir") == extra.end())
      argv.insert(argv.end(), {"--history-dir", base_.path() + "/history"});
    argv.insert(argv.end(), extra.begin(), extra.end());
    if (spawn_until_ready(child_, argv, log_path_) != "ready") {
      take_down();
      FAIL("gate mount did not come up; its log:\n" << log());
    }
  }

  void take_down() {
    if (child_.running()) {
      child_.signal(SIGTERM);
      if (child_.wait(15s) < 0) child_.kill_and_wait();
    }
    if (is_mounted(mnt_)) sh("fusermount3 -u '" + mnt_ + "' 2>/dev/null", nullptr, 10s);
    if (is_mounted(mnt_)) sh("fusermount3 -uz '" + mnt_ + "'", nullptr, 10s);
  }

  TempDir base_;
  std::string root_, mnt_, log_path_;
  Child child_;
};

// A forked copy of this process running `body`, talking to the test over pipes:
// the child reports lines, the test sends commands. Killed and reaped on scope exit.
class Forked {
 public:
  explicit Forked(std::function<int(Forked&)> body) {
    int up[2], down[2];
    REQUIRE(::pipe2(up, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(down, O_CLOEXEC) == 0);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // gone with the test, even after a crash
      if (::getppid() != parent) ::_exit(1);
      // Catch's signal handlers came along with fork; this child dies like any process.
      for (int sig : {SIGINT, SIGTERM, SIGSEGV, SIGABRT, SIGILL, SIGFPE})
        ::signal(sig, SIG_DFL);
      // Only the pipes come along: an inherited descriptor of a locked file would make
      // the child wait for itself (which the mount rightly refuses with EDEADLK).
      out_ = ::fcntl(up[1], F_DUPFD, 500);
      in_ = ::fcntl(down[0], F_DUPFD, 500);
      ::close_range(3, 499, 0);
      ::close_range(static_cast<unsigned>(std::max(in_, out_)) + 1, ~0U, 0);
      ::_exit(body(*this));
    }
    ::close(up[1]);
    ::close(down[0]);
    in_ = up[0];
    out_ = down[1];
  }
  ~Forked() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    ::close(in_);
    ::close(out_);
  }
  Forked(const Forked&) = delete;
  Forked& operator=(const Forked&) = delete;

  pid_t pid() const { return pid_; }

  // Child side.
  void report(const std::string& line) {
    std::string l = line + "\n";
    (void)!::write(out_, l.data(), l.size());
  }
  std::string command() {
    std::string l;
    char c;
    while (::read(in_, &c, 1) == 1 && c != '\n') l += c;
    return l;
  }

  // Test side: the next line, or nullopt when none came within `limit`.
  std::optional<std::string> line(std::chrono::milliseconds limit = 10s) {
    auto end = Clock::now() + limit;
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string l = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return l;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
      if (left.count() < 0) return std::nullopt;
      pollfd p{in_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      char b[256];
      ssize_t n = ::read(in_, b, sizeof b);
      if (n <= 0) return std::nullopt;
      buf_.append(b, static_cast<std::size_t>(n));
    }
  }
  void tell(const std::string& cmd) {
    std::string l = cmd + "\n";
    (void)!::write(out_, l.data(), l.size());
  }
  int wait(std::chrono::milliseconds limit = 10s) {
    int pfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    if (pfd >= 0) {
      pollfd p{pfd, POLLIN, 0};
      int ready = ::poll(&p, 1, static_cast<int>(limit.count()));
      ::close(pfd);
      if (ready <= 0) return -1;
    }
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1;
  std::string buf_;
};

// A process that opens `path` with `flags`, reports "open" (or the errno), holds it
// until told "close", closes and reports "closed".
inline std::unique_ptr<Forked> holder(const std::string& path, int flags) {
  return std::make_unique<Forked>([path, flags](Forked& self) {
    int fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) {
      self.report("errno " + std::to_string(errno));
      return 1;
    }
    self.report("open");
    if (self.command() == "write") {
      (void)!::write(fd, "x", 1);
      self.command();
    }
    ::close(fd);
    self.report("closed");
    return 0;
  });
}

// A process's file descriptor on the test side, closed on scope exit.
struct Fd {
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  void close() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  int fd;
};

}  // namespace gate::test
