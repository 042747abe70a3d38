// The gate command line as a user meets it: help, versions, usage errors, the
// non-root fallback for the state directory, and `gate up --local` / `gate down`.
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "core/process.h"
#include "support/test_support.h"

using namespace gate;
namespace fs = std::filesystem;

namespace {

RunResult gate_cmd(std::vector<std::string> args) {
  args.insert(args.begin(), test::gate_binary());
  return run_command(args, std::chrono::seconds(60));
}

std::map<std::string, std::string> read_env_file(const std::string& path) {
  std::map<std::string, std::string> kv;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (auto eq = line.find('='); eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  return kv;
}

bool mounted(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.find(" " + path + " ") != std::string::npos) return true;
  return false;
}


}  // namespace

TEST_CASE("gate --version names the version and the build", "[cli]") {
  auto r = gate_cmd({"--version"});
  CHECK(r.status == 0);
  CHECK(r.output.rfind("gate 0.", 0) == 0);
  CHECK(r.output.find("build") != std::string::npos);
}

TEST_CASE("an unknown subcommand prints the usage and exits 2", "[cli]") {
  auto r = gate_cmd({"frobnicate"});
  CHECK(r.status == 2);
  CHECK(r.output.find("no command 'frobnicate'") != std::string::npos);
  CHECK(r.output.find("broker") != std::string::npos);
  CHECK(gate_cmd({}).status == 2);
}

TEST_CASE("every subcommand has --help and gate help shows it", "[cli]") {
  for (const char* cmd : {"broker", "mount", "locks", "up", "down"}) {
    CAPTURE(cmd);
    auto r = gate_cmd({cmd, "--help"});
    CHECK(r.status == 0);
    CHECK(r.output.find(std::string("Usage: gate ") + cmd) != std::string::npos);
    auto h = gate_cmd({"help", cmd});
    CHECK(h.status == 0);
    CHECK(h.output == r.output);
  }
}

TEST_CASE("a bad flag is a usage error with a hint, not a crash", "[cli]") {
  auto r = gate_cmd({"broker", "--no-such-flag"});
  CHECK(r.status == 2);
  CHECK(r.output.find("gate broker: unrecognised option '--no-such-flag'") != std::string::npos);
  CHECK(r.output.find("Try 'gate broker --help'") != std::string::npos);
  auto bad_value = gate_cmd({"broker", "--port", "seventy"});
  CHECK(bad_value.status == 2);
  CHECK(bad_value.output.find("terminate") == std::string::npos);
}

TEST_CASE("a broker on a state dir it cannot write says so", "[cli]") {
  auto r = gate_cmd({"broker", "--state-dir", "/proc/version/gate", "--port", "0"});
  CHECK(r.status == 1);
  CHECK(r.output.find("not writable") != std::string::npos);
  CHECK(r.output.find("--state-dir") != std::string::npos);
}

TEST_CASE("a broker refuses a non-loopback address without --allow-remote", "[cli]") {
  auto r = gate_cmd({"broker", "--host", "0.0.0.0", "--port", "0"});
  CHECK(r.status == 2);
  CHECK(r.output.find("--allow-remote") != std::string::npos);
}

TEST_CASE("gate locks without a broker says which address it tried", "[cli]") {
  auto r = gate_cmd({"locks", "--broker-port", "1"});
  CHECK(r.status == 1);
  CHECK(r.output.find("127.0.0.1:1") != std::string::npos);
}

TEST_CASE("a second broker on the same state dir is refused", "[cli]") {
  test::BrokerProcess broker;
  auto r = gate_cmd({"broker", "--state-dir", broker.state_dir(), "--port", "0"});
  CHECK(r.status == 1);
  CHECK(r.output.find("another broker is using the state directory") != std::string::npos);
}

TEST_CASE("a user who cannot write /var/lib/gate gets a broker on their own state dir", "[cli]") {
  if (::geteuid() != 0) return;  // needs root to become another user
  test::TempDir home;
  ::chmod(home.path().c_str(), 0777);
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const std::string log = home.path() + "/broker.log";
  auto child = test::Child::spawn(
      {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
       "XDG_STATE_HOME=" + home.path() + "/state", "GATE_STATE_DIR=/var/lib/gate-test-unwritable",
       test::gate_binary(), "broker", "--port", "0", "--ready-fd", std::to_string(fds[1])},
      log, fds[1]);
  ::close(fds[1]);
  char buf[32] = {};
  ssize_t n = ::read(fds[0], buf, sizeof buf - 1);  // EOF if the broker fails
  ::close(fds[0]);
  // GATE_STATE_DIR was set explicitly, so the broker must refuse rather than fall back.
  CHECK(n <= 0);
  CHECK(child.wait(std::chrono::seconds(10)) == 1);
  CHECK(test::read_file(log).find("not writable") != std::string::npos);

  REQUIRE(::pipe(fds) == 0);
  auto fallback = test::Child::spawn(
      {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-u", "GATE_STATE_DIR",
       "XDG_STATE_HOME=" + home.path() + "/state", test::gate_binary(), "broker", "--port", "0",
       "--ready-fd", std::to_string(fds[1])},
      log, fds[1]);
  ::close(fds[1]);
  n = ::read(fds[0], buf, sizeof buf - 1);
  ::close(fds[0]);
  CHECK(n > 0);
  fallback.signal(SIGTERM);
  CHECK(fallback.wait(std::chrono::seconds(10)) == 0);
  CHECK(fs::exists(home.path() + "/state/gate/broker/locks.db"));
  CHECK(test::read_file(log).find("using " + home.path() + "/state/gate/broker") != std::string::npos);
}

TEST_CASE("gate up --local shows a locked view and gate down leaves nothing behind", "[cli][up]") {
  test::TempDir tmp;
  test::ScopedEnv xdg("XDG_STATE_HOME", tmp.path() + "/state");
  const std::string repo = tmp.path() + "/my repo";
  fs::create_directories(repo);
  { std::ofstream(repo + "/hello.txt") << "hi\n"; }

  auto up = gate_cmd({"up", "--local", "--repo-path", repo});
  INFO(up.output);
  REQUIRE(up.status == 0);
  const std::string state = tmp.path() + "/state/gate/state/my-repo/up.env";
  auto kv = read_env_file(state);
  const std::string mnt = kv["mount"];
  const pid_t broker_pid = std::stoi(kv["broker_pid"]);
  const pid_t mount_pid = std::stoi(kv["mount_pid"]);
  // Whatever happens below, stop what was started.
  struct Cleanup {
    std::string mnt;
    pid_t a, b;
    ~Cleanup() {
      for (pid_t p : {a, b})
        if (process_alive(p)) ::kill(p, SIGKILL);
      run_command({"fusermount3", "-uz", mnt});
    }
  } cleanup{mnt, broker_pid, mount_pid};
  CHECK(up.output.find("work in:  " + mnt) != std::string::npos);
  CHECK(up.output.find("gate down") != std::string::npos);
  CHECK(test::read_file(mnt + "/hello.txt") == "hi\n");
  { std::ofstream(mnt + "/new.txt") << "through the mount\n"; }
  CHECK(test::read_file(repo + "/new.txt") == "through the mount\n");

  auto status = gate_cmd({"status"});
  INFO(status.output);
  CHECK(status.status == 0);
  CHECK(status.output.find("ok   history of replaced versions in " + tmp.path() + "/state/gate/history/") !=
        std::string::npos);
  CHECK(status.output.find("ok   stale replacements: merge (0 refused, 0 merged, 0 conflicts)") !=
        std::string::npos);
  // Run as root on Linux 6.9+ (as CI does), reads go straight to the repository.
  if (test::kernel_passthrough_expected())
    CHECK(status.output.find("ok   read-only opens read straight from the repository (passthrough; ") !=
          std::string::npos);
  else
    CHECK(status.output.find("note read-only opens are read through the view: ") != std::string::npos);

  auto again = gate_cmd({"up", "--local", "--repo-path", repo});
  CHECK(again.status == 0);
  CHECK(again.output.find("already up") != std::string::npos);

  auto down = gate_cmd({"down"});
  INFO(down.output);
  CHECK(down.status == 0);
  CHECK_FALSE(process_alive(broker_pid));
  CHECK_FALSE(process_alive(mount_pid));
  CHECK_FALSE(mounted(mnt));
  CHECK_FALSE(fs::exists(state));
  CHECK(gate_cmd({"down"}).output.find("nothing is up") != std::string::npos);
}

TEST_CASE("gate up refuses what is not a directory", "[cli][up]") {
  test::TempDir tmp;
  test::ScopedEnv xdg("XDG_STATE_HOME", tmp.path());
  auto r = gate_cmd({"up", "--local", "--repo-path", tmp.path() + "/missing"});
  CHECK(r.status == 1);
  CHECK(r.output.find("is not a directory") != std::string::npos);
  CHECK(gate_cmd({"up", "--local"}).status == 2);
}

TEST_CASE("gate locks finds the broker of the one running setup and asks which when several run",
          "[cli][up]") {
  test::TempDir tmp;
  test::ScopedEnv xdg("XDG_STATE_HOME", tmp.path() + "/state");
  // No setup: the default address, and an error that says so.
  auto none = gate_cmd({"locks"});
  CHECK(none.status == 1);
  CHECK(none.output.find("127.0.0.1:8787") != std::string::npos);
  CHECK(none.output.find("no setup") != std::string::npos);

  struct Setup {
    std::string repo, mnt;
    pid_t broker = -1, mount = -1;
    ~Setup() {
      for (pid_t p : {broker, mount})
        if (p > 0 && process_alive(p)) ::kill(p, SIGKILL);
      if (!mnt.empty()) run_command({"fusermount3", "-uz", mnt});
    }
  };
  auto start = [&](Setup& s, const std::string& name, std::vector<std::string> extra = {}) {
    s.repo = tmp.path() + "/" + name;
    fs::create_directories(s.repo);
    std::ofstream(s.repo + "/" + name + ".txt") << name << "\n";
    std::vector<std::string> args{"up", "--local", "--repo-path", s.repo};
    args.insert(args.end(), extra.begin(), extra.end());
    auto up = gate_cmd(args);
    INFO(up.output);
    REQUIRE(up.status == 0);
    auto kv = read_env_file(tmp.path() + "/state/gate/state/" + name + "/up.env");
    s.mnt = kv["mount"];
    s.broker = std::stoi(kv["broker_pid"]);
    s.mount = std::stoi(kv["mount_pid"]);
  };
  Setup one, two;
  start(one, "first");
  // Held open through the first view: its broker is the one that must answer.
  std::ifstream held(one.mnt + "/first.txt");
  REQUIRE(held.good());
  auto found = gate_cmd({"locks"});
  INFO(found.output);
  CHECK(found.status == 0);
  CHECK(found.output.find("first.txt") != std::string::npos);

  start(two, "second", {"--no-history"});  // gate up passes the history flags on
  auto quiet = gate_cmd({"status", "--vm-name", "second"});
  CHECK(quiet.output.find("history of replaced versions: off") != std::string::npos);
  CHECK(quiet.output.find("stale replacements: not checked (--stale-writes off)") != std::string::npos);
  auto several = gate_cmd({"locks"});
  CHECK(several.status == 1);
  CHECK(several.output.find("2 setups are running (first, second)") != std::string::npos);
  CHECK(several.output.find("--vm-name") != std::string::npos);
  auto named = gate_cmd({"locks", "--vm-name", "first"});
  CHECK(named.status == 0);
  CHECK(named.output.find("first.txt") != std::string::npos);
  CHECK(gate_cmd({"locks", "--vm-name", "second"}).output.find("first.txt") == std::string::npos);
  auto unknown = gate_cmd({"locks", "--vm-name", "third"});
  CHECK(unknown.status == 1);
  CHECK(unknown.output.find("no setup named 'third'") != std::string::npos);
  held.close();
  CHECK(gate_cmd({"down", "--vm-name", "first"}).status == 0);
  CHECK(gate_cmd({"down", "--vm-name", "second"}).status == 0);
}

TEST_CASE("what a test starts ends with it even when the test process crashes", "[cli]") {
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t test_like = ::fork();
  REQUIRE(test_like >= 0);
  if (test_like == 0) {
    // A stand-in for a test binary that starts a daemon, then dies without running
    // any destructor.
    ::close(pipe_fds[0]);
    test::Child daemon = test::Child::spawn({"sleep", "120"});
    const pid_t pid = daemon.pid();
    if (::write(pipe_fds[1], &pid, sizeof pid) != sizeof pid) ::_exit(2);
    ::_exit(0);  // no destructors, as after SIGSEGV
  }
  ::close(pipe_fds[1]);
  pid_t daemon = 0;
  REQUIRE(::read(pipe_fds[0], &daemon, sizeof daemon) == sizeof daemon);
  ::close(pipe_fds[0]);
  int status = 0;
  REQUIRE(::waitpid(test_like, &status, 0) == test_like);
  // The orphan was re-parented and got SIGTERM: its pidfd turns readable when it ends.
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, daemon, 0));
  if (pidfd < 0) {
    CHECK(errno == ESRCH);  // ended (and reaped) already
    return;
  }
  pollfd p{pidfd, POLLIN, 0};
  const bool ended = ::poll(&p, 1, 5000) == 1;
  ::close(pidfd);
  if (!ended) ::kill(daemon, SIGKILL);
  CHECK(ended);
}
