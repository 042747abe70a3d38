// AgentResolver on a procfs laid out by hand (every case, exactly), and on the
// real /proc with real processes.
#include <signal.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "mount/agent_resolver.h"
#include "support/test_support.h"

using gate::mount::AgentResolver;
using gate::mount::clean_agent_name;
using gate::test::TempDir;

namespace {

// One process (or thread) in a fake /proc.
struct FakeProc {
  const TempDir& root;

  void add(pid_t pid, pid_t ppid, const std::string& comm, std::uint64_t start,
           const std::string& environ, pid_t tgid = 0, bool environ_readable = true) const {
    const std::string dir = root.path() + "/" + std::to_string(pid);
    std::filesystem::create_directories(dir);
    std::ofstream(dir + "/stat") << pid << " (" << comm << ") S " << ppid
                                 << " 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 " << start
                                 << " 1000 100\n";
    std::ofstream(dir + "/status") << "Name:\t" << comm << "\nUmask:\t0022\nState:\tS\nTgid:\t"
                                   << (tgid ? tgid : pid) << "\nPid:\t" << pid << "\nPPid:\t"
                                   << ppid << "\n";
    std::filesystem::remove(dir + "/environ");
    if (environ_readable) std::ofstream(dir + "/environ") << environ;
  }
  void remove(pid_t pid) const {
    std::filesystem::remove_all(root.path() + "/" + std::to_string(pid));
  }
};

std::string env(std::initializer_list<std::string> vars) {
  std::string out;
  for (const auto& v : vars) out += v + '\0';
  return out;
}

}  // namespace

TEST_CASE("a request is attributed to GATE_AGENT of the caller or its nearest ancestor",
          "[unit][agents]") {
  TempDir root("gate-fake-proc");
  FakeProc proc{root};
  proc.add(1, 0, "init", 1, env({"PATH=/bin"}));
  proc.add(100, 1, "claude", 50, env({"HOME=/root", "GATE_AGENT=claude-1"}));
  proc.add(200, 100, "bash", 60, env({"PATH=/bin"}));
  proc.add(210, 200, "codex helper", 61, "");  // cleared its environment
  proc.add(300, 1, "node", 70, env({"GATE_AGENT=gemini"}));
  proc.add(301, 1, "libuv-worker", 71, "", /*tgid=*/300);
  proc.add(400, 1, "vim", 80, env({"TERM=xterm"}));
  // Every lookup looks again (the fake /proc changes between them).
  AgentResolver r(root.path(), 4096, std::chrono::milliseconds(0));

  SECTION("its own variable") {
    auto c = r.resolve(100);
    CHECK(c.pid == 100);
    CHECK(c.agent == "claude-1");
    CHECK(c.command == "claude");
  }
  SECTION("a grandchild that cleared its environment still belongs to the agent") {
    auto c = r.resolve(210);
    CHECK(c.pid == 210);
    CHECK(c.agent == "claude-1");
    CHECK(c.command == "codex helper");
  }
  SECTION("a thread counts as its process") {
    auto c = r.resolve(301);
    CHECK(c.tid == 301);
    CHECK(c.pid == 300);
    CHECK(c.agent == "gemini");
    CHECK(c.command == "node");
  }
  SECTION("no agent anywhere: the process itself") {
    auto c = r.resolve(400);
    CHECK(c.pid == 400);
    CHECK(c.agent == "pid-400");
    CHECK(c.command == "vim");
  }
  SECTION("an environment it may not read is skipped, not fatal") {
    proc.add(220, 100, "sudo", 62, "", 0, /*environ_readable=*/false);
    CHECK(r.resolve(220).agent == "claude-1");
  }
  SECTION("a caller gone before the lookup gets a fallback") {
    auto c = r.resolve(999);
    CHECK(c.pid == 999);
    CHECK(c.agent == "pid-999");
    CHECK(c.command == "?");
  }
  SECTION("a pid used again by a new process is looked up afresh") {
    CHECK(r.resolve(200).agent == "claude-1");
    proc.remove(200);
    proc.add(200, 300, "python3", 90, env({"PATH=/bin"}));
    auto c = r.resolve(200);
    CHECK(c.agent == "gemini");
    CHECK(c.command == "python3");
  }
  SECTION("a process that execs with its own GATE_AGENT is looked up afresh") {
    // `env GATE_AGENT=codex codex`: pid and start time stay, comm and environment change.
    CHECK(r.resolve(200).agent == "claude-1");
    CHECK(r.resolve(200).command == "bash");
    proc.add(200, 100, "codex", 60, env({"GATE_AGENT=codex"}));
    auto c = r.resolve(200);
    CHECK(c.agent == "codex");
    CHECK(c.command == "codex");
  }
  SECTION("a known process is served from the cache") {
    CHECK(r.resolve(210).agent == "claude-1");
    // Its ancestors' files may go (they exit); the answer for the same process stays.
    proc.remove(100);
    proc.remove(200);
    CHECK(r.resolve(210).agent == "claude-1");
  }
  SECTION("a loop in the parent links ends") {
    proc.add(500, 501, "a", 5, "");
    proc.add(501, 500, "b", 6, "");
    CHECK(r.resolve(500).agent == "pid-500");
  }
}

TEST_CASE("agent names are cleaned for showing and sending", "[unit][agents]") {
  CHECK(clean_agent_name("codex") == "codex");
  CHECK(clean_agent_name("my agent\t1\n") == "my_agent_1_");
  CHECK(clean_agent_name(std::string(100, 'x')).size() == 64);
  CHECK(clean_agent_name("").empty());
}

TEST_CASE("a real child with its environment cleared belongs to its parent's agent",
          "[unit][agents]") {
  TempDir dir("gate-agents");
  const std::string pidfile = dir.path() + "/pid";
  auto shell = gate::test::Child::spawn(
      {"env", "GATE_AGENT=outer", "sh", "-c",
       "env -i sleep 60 & echo $! > " + pidfile + ".tmp && mv " + pidfile + ".tmp " + pidfile +
           "; wait"});
  pid_t sleeper = 0;
  REQUIRE(gate::test::eventually([&] {
    sleeper = std::atoi(gate::test::read_file(pidfile).c_str());
    return sleeper > 0;
  }));
  struct Reap {
    pid_t pid;
    ~Reap() { ::kill(pid, SIGKILL); }
  } reap{sleeper};
  AgentResolver r;
  // `env -i` execs sleep: wait until the child shows its final command.
  REQUIRE(gate::test::eventually([&] { return r.resolve(sleeper).command == "sleep"; }));
  auto c = r.resolve(sleeper);
  CHECK(c.pid == sleeper);
  CHECK(c.agent == "outer");
  CHECK(r.resolve(shell.pid()).agent == "outer");
}
