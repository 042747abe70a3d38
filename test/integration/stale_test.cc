// Stale replacements through a real mount (locking.md, "Stale replacement"): real
// processes with their own GATE_AGENT read and save one file the ways agents do,
// and `--stale-writes refuse` refuses exactly the saves that would undo another
// agent's change.
#include "support/agent_saves.h"

using namespace gate::test;

namespace {

// Claude Code's save: a temp file renamed over the file; when the rename fails,
// the file written directly.
const char* kClaudeSave =
    "printf %s \"$2\" > \"$1.tmp.$$\"; if mv \"$1.tmp.$$\" \"$1\"; then exit 0; fi; "
    "rm -f \"$1.tmp.$$\"; echo fallback; printf %s \"$2\" > \"$1\"";

bool busy(const AgentRun& r) { return r.status != 0 && r.out.find("busy") != std::string::npos; }

}  // namespace

TEST_CASE("refuse: a save over a file another agent changed since this one read it fails with "
          "EBUSY and changes nothing, and after a re-read the save goes through",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--stale-writes", "refuse"});
  const std::string f = m.at("notes.txt");
  write_file(m.in_root("notes.txt"), "one\n");

  REQUIRE(as("alpha", kRead, f).status == 0);
  REQUIRE(as("beta", kRead, f).status == 0);
  REQUIRE(as("beta", kSave, f, "one\nbeta\n").status == 0);  // beta read the latest

  // alpha builds on "one\n" only: beta's line would be lost.
  AgentRun stale = as("alpha", kSave, f, "one\nalpha\n");
  INFO(stale.out << "\nmount log:\n" << m.log());
  CHECK(busy(stale));
  CHECK(slurp(m.in_root("notes.txt")) == "one\nbeta\n");
  CHECK(stale_xattr(m) == "refuse refused=1 merged=0 conflicts=0");
  CHECK(m.log().find("refused a stale replacement of notes.txt by alpha") != std::string::npos);

  // Until alpha reads again, it stays refused; its next read is its new base.
  CHECK(busy(as("alpha", kSave, f, "one\nalpha\n")));
  REQUIRE(as("alpha", kRead, f).status == 0);
  CHECK(as("alpha", kSave, f, "one\nbeta\nalpha\n").status == 0);
  CHECK(slurp(m.in_root("notes.txt")) == "one\nbeta\nalpha\n");
  CHECK(stale_xattr(m) == "refuse refused=2 merged=0 conflicts=0");

  // Its own change does not make it stale: saved twice in a row, no read between.
  CHECK(as("alpha", kSave, f, "one\nbeta\nalpha\nagain\n").status == 0);
  CHECK(as("alpha", kRenameSave, f, "one\nbeta\nalpha\nagain\nand again\n").status == 0);
  CHECK(slurp(m.in_root("notes.txt")) == "one\nbeta\nalpha\nagain\nand again\n");
  CHECK(stale_xattr(m) == "refuse refused=2 merged=0 conflicts=0");
}

TEST_CASE("refuse: Claude Code's save (temp file renamed over the file, then O_TRUNC when the "
          "rename fails) is refused on both paths",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--stale-writes", "refuse"});
  const std::string f = m.at("app.py");
  write_file(m.in_root("app.py"), "print(1)\n");

  REQUIRE(as("claude", kRead, f).status == 0);
  REQUIRE(as("codex", kRead, f).status == 0);
  REQUIRE(as("codex", kSave, f, "print(1)\nprint(2)\n").status == 0);

  AgentRun r = as("claude", kClaudeSave, f, "print(1)\nprint(3)\n");
  INFO(r.out << "\nmount log:\n" << m.log());
  CHECK(r.out.find("fallback") != std::string::npos);  // the rename was refused
  CHECK(busy(r));                                     // and so was the fallback
  CHECK(slurp(m.in_root("app.py")) == "print(1)\nprint(2)\n");
  CHECK(stale_xattr(m) == "refuse refused=2 merged=0 conflicts=0");
  {
    gate::BrokerClient c(broker.endpoint());
    CHECK(c.request("GET", "/metrics", "").body.find(
              "gate_stale_replacements_total{outcome=\"refused\"} 2") != std::string::npos);
  }
  // No temp file left behind by the refused rename (the agent removed it).
  CHECK(sh("ls -a '" + m.root() + "' | grep -c tmp", nullptr, 10s) != 0);

  // After a re-read, the same save goes through (by the rename).
  REQUIRE(as("claude", kRead, f).status == 0);
  AgentRun ok = as("claude", kClaudeSave, f, "print(1)\nprint(2)\nprint(3)\n");
  CHECK(ok.status == 0);
  CHECK(ok.out.find("fallback") == std::string::npos);
  CHECK(slurp(m.in_root("app.py")) == "print(1)\nprint(2)\nprint(3)\n");
}

TEST_CASE("refuse: appends, in-place writes, new files, saves by agents that read the latest and "
          "saves over an empty file are never refused",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--stale-writes", "refuse"});
  const std::string f = m.at("log.txt");
  write_file(m.in_root("log.txt"), "start\n");
  REQUIRE(as("alpha", kRead, f).status == 0);
  REQUIRE(as("beta", "echo beta >> \"$1\"", f).status == 0);

  // alpha is stale on log.txt, but none of these replaces what beta wrote.
  CHECK(as("alpha", "echo alpha >> \"$1\"", f).status == 0);
  CHECK(as("alpha", "printf S | dd of=\"$1\" bs=1 seek=0 conv=notrunc 2>/dev/null", f).status == 0);
  CHECK(as("alpha", kSave, m.at("new.txt"), "new\n").status == 0);
  CHECK(slurp(m.in_root("log.txt")) == "Start\nbeta\nalpha\n");

  // gamma never read it and read nothing: a blind save is not refused.
  CHECK(as("gamma", kSave, m.at("other.txt"), "x\n").status == 0);
  // An agent whose read is the latest saves.
  REQUIRE(as("delta", kRead, f).status == 0);
  CHECK(as("delta", kSave, f, "delta\n").status == 0);

  // Over an empty file nothing can be lost.
  write_file(m.in_root("empty.txt"), "");
  REQUIRE(as("alpha", kRead, m.at("empty.txt")).status == 0);
  REQUIRE(as("beta", "touch \"$1\" && : > \"$1\"", m.at("empty.txt")).status == 0);
  CHECK(as("alpha", kSave, m.at("empty.txt"), "alpha\n").status == 0);
  CHECK(stale_xattr(m) == "refuse refused=0 merged=0 conflicts=0");
}

TEST_CASE("refuse: a file deleted and made again since the agent read it is stale too",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--stale-writes", "refuse"});
  const std::string f = m.at("cfg.toml");
  write_file(m.in_root("cfg.toml"), "a = 1\n");
  REQUIRE(as("alpha", kRead, f).status == 0);
  REQUIRE(as("beta", "rm \"$1\" && printf 'b = 2\\n' > \"$1\"", f).status == 0);
  AgentRun r = as("alpha", kSave, f, "a = 1\nc = 3\n");
  INFO(r.out << "\nmount log:\n" << m.log());
  CHECK(busy(r));
  CHECK(slurp(m.in_root("cfg.toml")) == "b = 2\n");
}

TEST_CASE("off: a stale save goes through as before, and what it replaced is in the history",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--stale-writes", "off"});
  const std::string f = m.at("notes.txt");
  write_file(m.in_root("notes.txt"), "one\n");
  REQUIRE(as("alpha", kRead, f).status == 0);
  REQUIRE(as("beta", kSave, f, "one\nbeta\n").status == 0);
  CHECK(as("alpha", kSave, f, "one\nalpha\n").status == 0);
  CHECK(slurp(m.in_root("notes.txt")) == "one\nalpha\n");
  CHECK(stale_xattr(m) == "off refused=0 merged=0 conflicts=0");
  std::string out;
  REQUIRE(sh(gate_binary() + " history --history-dir '" + m.scratch() + "/history' '" + f + "'",
             &out, 20s) == 0);
  CHECK(out.find("beta") != std::string::npos);
}

TEST_CASE("gate mount and gate up take stale-writes merge, refuse or off, and say so otherwise",
          "[mount][stale]") {
  std::string out;
  CHECK(sh(gate_binary() + " mount --root /tmp --mount /tmp/x --stale-writes sometimes 2>&1", &out,
           20s) == 2);
  CHECK(out.find("--stale-writes must be merge, refuse or off, not 'sometimes'") != std::string::npos);
  CHECK(sh(gate_binary() + " mount --root /tmp --mount /tmp/x --no-history --stale-writes merge 2>&1",
           &out, 20s) == 2);
  CHECK(out.find("needs the history") != std::string::npos);
  CHECK(sh("GATE_STALE_WRITES=bogus " + gate_binary() + " up --local --repo-path /tmp 2>&1", &out,
           20s) == 2);
  CHECK(out.find("--stale-writes must be merge, refuse or off") != std::string::npos);
}

TEST_CASE("an open that waited for its lock while a rename replaced the file opens the new file, "
          "so nothing is read from or written to the file that is gone",
          "[mount][stale]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--meta-wait-ms", "20000"});
  const std::string f = m.at("f.txt");
  for (const bool writer : {false, true}) {
    INFO((writer ? "a writer" : "a reader") << " waits\nmount log:\n" << m.log());
    write_file(m.in_root("f.txt"), "old\n");
    write_file(m.in_root("f.txt.tmp"), "new\n");
    // A holds f.txt; a rename of the temp file over it queues, then B's open.
    const std::string ready = m.scratch() + "/held";
    ::unlink(ready.c_str());
    Child a = Child::spawn(
        {"sh", "-c", "exec 3>>\"$1\"; echo held > \"$2\"; exec sleep 60", "sh", f, ready});
    REQUIRE(eventually([&] { return read_file(ready) == "held\n"; }, 20s));
    Child rename = Child::spawn({"mv", m.at("f.txt.tmp"), f});
    REQUIRE(eventually([&] { return key_state(broker.endpoint(), "f.txt").queued == 1; }, 20s));
    const std::string out = m.scratch() + "/b.out";
    Child b = writer ? Child::spawn({"sh", "-c", "printf 'from b\\n' > \"$1\"", "sh", f}, out)
                     : Child::spawn({"cat", f}, out);
    REQUIRE(eventually([&] { return key_state(broker.endpoint(), "f.txt").queued == 2; }, 20s));
    a.kill_and_wait();
    CHECK(rename.wait(20s) == 0);
    CHECK(b.wait(20s) == 0);
    if (writer) CHECK(slurp(m.in_root("f.txt")) == "from b\n");
    else CHECK(read_file(out) == "new\n");
  }
}
