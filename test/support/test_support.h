#pragma once
// Real components for tests, each cleaned up by RAII even when a test fails:
// a temporary directory, a child process, and a real `gate broker` process.
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/config.h"

namespace gate::test {

// Path of the gate binary under test (set by CMake).
std::string gate_binary();

// mkdtemp under $TMPDIR (or /tmp); removed recursively on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "gate-test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A child process; killed (SIGKILL) and reaped on destruction if still running,
// and sent SIGTERM by the kernel should the test process die first (a crash skips
// destructors). Spawn it from the test's main thread: the signal follows the thread.
class Child {
 public:
  Child() = default;
  // Starts argv[0] (searched in PATH). stdout/stderr go to log_path when given.
  static Child spawn(const std::vector<std::string>& argv, const std::string& log_path = "",
                     int keep_fd = -1);
  Child(Child&& other) noexcept;
  Child& operator=(Child&& other) noexcept;
  ~Child();

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }
  void signal(int sig) const;
  // Waits for exit; returns the exit status (128+signal when killed), or -1 on
  // timeout (the child is left running).
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(30));
  void kill_and_wait();

 private:
  pid_t pid_ = -1;
};

// Starts a gate daemon as `child` with `--ready-fd` on a pipe added to argv, and
// returns the first line it writes there (without the newline): "" when it exits or
// writes nothing within 20 s.
std::string spawn_until_ready(Child& child, std::vector<std::string> argv,
                              const std::string& log_path);

// A real `gate broker` on an ephemeral loopback port (and a Unix socket when asked),
// with its own state directory. The constructor returns once the broker listens.
class BrokerProcess {
 public:
  struct Options {
    std::string state_dir;  // empty: a fresh temporary directory owned by this object
    bool unix_socket = false;
    std::vector<std::string> extra_args;
  };
  BrokerProcess();
  explicit BrokerProcess(Options options);
  ~BrokerProcess();

  BrokerEndpoint endpoint() const;         // TCP
  BrokerEndpoint unix_endpoint() const;    // Unix socket (when asked for)
  pid_t pid() const { return child_.pid(); }
  const std::string& state_dir() const { return state_dir_; }
  const std::string& log_path() const { return log_path_; }

  void kill9();               // SIGKILL and reap
  int stop();                 // SIGTERM; returns the exit status
  void start();               // (re)start on the same state dir and port
  std::string log() const;    // the broker's log so far

 private:
  Options options_;
  std::unique_ptr<TempDir> own_dir_;
  std::string state_dir_;
  std::string log_path_;
  std::string socket_path_;
  std::uint16_t port_ = 0;
  Child child_;
};

// Sets an environment variable for its lifetime, then restores the old value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value);
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> previous_;
};

// Polls `done` until it holds or `limit` passes; for states that have no event to
// wait on (the broker's queue, a file's contents, a process's /proc entries).
template <typename F>
inline bool eventually(F done, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (done()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// The broker's content version of `key` (GET /v1/locks/status?path=KEY's
// "versions"): 0 when it never changed; throws when the broker does not answer.
std::uint64_t key_version(const BrokerEndpoint& ep, const std::string& key);

// Reads a whole file ("" when missing).
std::string read_file(const std::string& path);

// Whether a mount made by this process may read files straight from below (FUSE
// passthrough): root, on Linux 6.9 or later (Debian's kernels build it in).
bool kernel_passthrough_expected();

}  // namespace gate::test
