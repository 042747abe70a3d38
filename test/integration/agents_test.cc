// Agents and content versions through a real mount: every lock names the agent,
// process and command it is for (GATE_AGENT of the caller or its nearest ancestor,
// else the process), and `gate locks` shows them; every change of a file's content
// through the mount gives it a new version at the broker.
#include "support/mount_fixture.h"

using namespace gate::test;
namespace json = boost::json;

namespace {

// A shell script run through the mount by a real process (started by `prefix`,
// e.g. `env GATE_AGENT=x`), which opens files, writes its pid ($$) to a ready file
// outside the mount, then sleeps holding them. The process that holds is killed
// by that pid on scope exit, even when it is a grandchild of the one started.
class Holder {
 public:
  Holder(const Mount& m, const std::string& name, std::vector<std::string> prefix,
         const std::string& script)
      : ready_(m.scratch() + "/" + name + ".pid") {
    prefix.insert(prefix.end(), {"sh", "-c", script, "sh", m.mnt(), ready_});
    child_ = Child::spawn(prefix);
  }
  ~Holder() {
    if (pid_ > 0) ::kill(pid_, SIGKILL);
  }
  // The pid the script wrote, once it holds its files (0 if it never did).
  pid_t await() {
    eventually([&] { return (pid_ = std::atoi(read_file(ready_).c_str())) > 0; }, 20s);
    return pid_;
  }

 private:
  std::string ready_;
  Child child_;
  pid_t pid_ = 0;
};

// Opens $1/FILE for appending on fd 3, says its pid, then holds it.
std::string hold(const std::string& file, const char* redirect = "3>>") {
  return std::string("exec ") + redirect + " \"$1/" + file +
         "\" && echo $$ > \"$2.tmp\" && mv \"$2.tmp\" \"$2\" && exec sleep 120";
}

json::object locks_json(const gate::BrokerEndpoint& ep) {
  std::string out;
  REQUIRE(sh(gate_binary() + " locks --json --broker-port " + std::to_string(ep.port), &out,
             20s) == 0);
  return json::parse(out).as_object();
}

// The first lock (or queued request) on `key` in `list`.
json::object entry(const json::object& status, const char* list, const std::string& key) {
  for (const auto& l : status.at(list).as_array())
    if (l.as_object().at("path") == key.c_str()) return l.as_object();
  FAIL("no entry for " << key << " in " << list << ": " << json::serialize(status));
  return {};
}

}  // namespace

TEST_CASE("each lock names the agent, process and command it is for", "[mount][agents]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  for (const char* f : {"a.txt", "b.txt", "c.txt", "d.txt"}) write_file(m.in_root(f), "x\n");

  Holder a(m, "a", {"env", "GATE_AGENT=alpha"}, hold("a.txt"));
  Holder b(m, "b", {gate_binary(), "run", "--agent", "beta", "--"}, hold("b.txt", "3<"));
  // A helper child that clears its environment (as Codex's does) still belongs to
  // the agent of the shell that started it; `; true` keeps that shell alive.
  Holder c(m, "c", {"env", "GATE_AGENT=gamma"},
           "env -i sh -c '" + hold("c.txt") + "' sh \"$1\" \"$2\"; true");
  Holder d(m, "d", {"env", "-u", "GATE_AGENT"}, hold("d.txt"));
  const pid_t pa = a.await(), pb = b.await(), pc = c.await(), pd = d.await();
  REQUIRE(pa > 0);
  REQUIRE(pb > 0);
  REQUIRE(pc > 0);
  REQUIRE(pd > 0);

  // A reader queued behind alpha's writer shows its agent too.
  Holder e(m, "e", {"env", "GATE_AGENT=delta"}, hold("a.txt", "3<"));
  REQUIRE(eventually([&] { return total_queued(broker.endpoint()) == 1; }));

  auto status = locks_json(broker.endpoint());
  INFO(json::serialize(status) << "\nmount log:\n" << m.log());
  auto la = entry(status, "locks", "a.txt");
  CHECK(la.at("agent") == "alpha");
  CHECK(la.at("pid") == pa);
  CHECK(la.at("command") == "sh");
  CHECK(la.at("mode") == "write");
  auto lb = entry(status, "locks", "b.txt");
  CHECK(lb.at("agent") == "beta");
  CHECK(lb.at("pid") == pb);
  CHECK(lb.at("mode") == "read");
  auto lc = entry(status, "locks", "c.txt");
  CHECK(lc.at("agent") == "gamma");
  CHECK(lc.at("pid") == pc);
  auto ld = entry(status, "locks", "d.txt");
  CHECK(ld.at("agent") == json::value("pid-" + std::to_string(pd)));
  CHECK(ld.at("command") == "sh");
  auto qa = entry(status, "queue", "a.txt");
  CHECK(qa.at("agent") == "delta");
  CHECK(qa.at("mode") == "read");

  // The table shows the same, with how long each has held or waited.
  std::string table;
  REQUIRE(sh(gate_binary() + " locks --broker-port " + std::to_string(broker.endpoint().port),
             &table, 20s) == 0);
  INFO(table);
  CHECK(table.find("AGENT") != std::string::npos);
  CHECK(table.find("PID") != std::string::npos);
  CHECK(table.find("COMMAND") != std::string::npos);
  for (const char* agent : {"alpha", "beta", "gamma", "delta"})
    CHECK(table.find(agent) != std::string::npos);
  CHECK(table.find("WAITING FOR") != std::string::npos);
}

TEST_CASE("gate run starts a command as an agent and refuses bad use", "[cli][agents]") {
  std::string out;
  CHECK(sh(gate_binary() + " run --agent tester -- sh -c 'echo $GATE_AGENT'", &out, 10s) == 0);
  CHECK(out == "tester\n");
  // The command's own flags are its own, not gate's.
  CHECK(sh(gate_binary() + " run --agent t2 printenv --null GATE_AGENT", &out, 10s) == 0);
  CHECK(out == std::string("t2") + '\0');
  CHECK(sh(gate_binary() + " run --agent tester -- sh -c 'exit 7'", &out, 10s) == 7);
  CHECK(sh(gate_binary() + " run -- true 2>&1", &out, 10s) == 2);
  CHECK(out.find("--agent") != std::string::npos);
  CHECK(sh(gate_binary() + " run --agent 'two words' -- true 2>&1", &out, 10s) == 2);
  CHECK(out.find("without spaces") != std::string::npos);
  CHECK(sh(gate_binary() + " run --agent x 2>&1", &out, 10s) == 2);
  CHECK(out.find("no command") != std::string::npos);
  CHECK(sh(gate_binary() + " run --agent x -- /no/such/program 2>&1", &out, 10s) == 127);
  CHECK(out.find("cannot run '/no/such/program'") != std::string::npos);
}


TEST_CASE("what changes a file's content through the mount gives it a new version while reads and "
          "metadata do not",
          "[mount][versions]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const auto ep = broker.endpoint();
  write_file(m.in_root("f"), "one\n");
  write_file(m.in_root("g"), "gee\n");
  auto version = [&](const char* key) { return key_version(ep, key); };
  // A handle's release reaches the broker after close() returns: wait for it.
  auto settled = [&] { return eventually([&] { return total_locks(ep) == 0; }); };
  std::uint64_t last = 0;
  auto changed = [&](const char* key) {
    REQUIRE(settled());
    const std::uint64_t now = version(key);
    INFO(key << ": version " << now << " after " << last << "; mount log:\n" << m.log());
    CHECK(now > last);
    last = now;
  };
  auto unchanged = [&](const char* key) {
    REQUIRE(settled());
    CHECK(version(key) == last);
  };

  CHECK(version("f") == 0);
  CHECK(slurp(m.at("f")) == "one\n");  // read-only open
  unchanged("f");
  {
    int fd = ::open(m.at("f").c_str(), O_RDWR);  // opened for writing, nothing written
    REQUIRE(fd >= 0);
    ::close(fd);
  }
  unchanged("f");
  {
    int fd = ::open(m.at("f").c_str(), O_WRONLY);
    REQUIRE(::pwrite(fd, "ONE", 3, 0) == 3);
    ::close(fd);
  }
  changed("f");
  REQUIRE(::truncate(m.at("f").c_str(), 2) == 0);
  changed("f");
  {
    int fd = ::open(m.at("f").c_str(), O_RDWR);
    REQUIRE(::fallocate(fd, 0, 0, 8192) == 0);
    ::close(fd);
  }
  changed("f");
  {
    int fd = ::open(m.at("f").c_str(), O_WRONLY | O_TRUNC);  // truncated, nothing written
    ::close(fd);
  }
  changed("f");
  REQUIRE(::chmod(m.at("f").c_str(), 0600) == 0);
  REQUIRE(::utimensat(AT_FDCWD, m.at("f").c_str(), nullptr, 0) == 0);
  unchanged("f");

  // A temp file renamed over f: f gets a new version (and so does the temp name).
  write_file(m.at("f.tmp"), "renamed\n");
  REQUIRE(settled());
  const std::uint64_t tmp_version = version("f.tmp");
  CHECK(tmp_version > last);  // created
  REQUIRE(::rename(m.at("f.tmp").c_str(), m.at("f").c_str()) == 0);
  changed("f");
  CHECK(version("f.tmp") > tmp_version);

  last = version("g");
  REQUIRE(::unlink(m.at("g").c_str()) == 0);
  changed("g");

  last = 0;
  write_file(m.at("new"), "created\n");
  changed("new");

  // Versions survive a kill -9 of the broker, and later changes go above them.
  const std::uint64_t f_before = version("f");
  broker.kill9();
  broker.start();
  CHECK(version("f") == f_before);
  last = f_before;
  write_file(m.at("f"), "after the restart\n");
  changed("f");
  CHECK(slurp(m.in_root("f")) == "after the restart\n");
}
