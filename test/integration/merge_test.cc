// Stale replacements merged through a real mount (--stale-writes merge, the
// default): real agent processes read a file, think, and write it back the ways
// agents do; no line any of them added is lost, and real conflicts keep both sides.
#include <sys/mount.h>
#include <sys/xattr.h>

#include <set>

#include "support/agent_saves.h"

using namespace gate::test;
namespace json = boost::json;

namespace {

// The broker's count of stale replacements with `outcome`, from /metrics.
std::string stale_metric(const gate::BrokerEndpoint& ep, const std::string& outcome) {
  gate::BrokerClient c(ep);
  const std::string body = c.request("GET", "/metrics", "").body;
  const std::string name = "gate_stale_replacements_total{outcome=\"" + outcome + "\"} ";
  const auto at = body.find(name);
  if (at == std::string::npos) return "missing";
  return body.substr(at + name.size(), body.find('\n', at) - at - name.size());
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::string line;
  for (char c : text) {
    if (c == '\n') out.push_back(std::exchange(line, ""));
    else line += c;
  }
  if (!line.empty()) out.push_back(line);
  return out;
}

}  // namespace

TEST_CASE("merge: two agents each add a line to what they read: both lines are kept, theirs first",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("todo.md");
  write_file(m.in_root("todo.md"), "# todo\n- one\n");
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "# todo\n- one\n- beta\n") == 0);
  // alpha writes what it built from its read: beta's line is not in it.
  REQUIRE(as_status("alpha", kSave, f, "# todo\n- one\n- alpha\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  CHECK(slurp(m.in_root("todo.md")) == "# todo\n- one\n- beta\n- alpha\n");
  CHECK(slurp(f) == "# todo\n- one\n- beta\n- alpha\n");  // through the view, no stale size
  CHECK(stale_xattr(m) == "merge refused=0 merged=1 conflicts=0");

  // By a temp file renamed over it, the same (Claude Code's way of saving).
  REQUIRE(as_status("gamma", kRead, f) == 0);
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("alpha", kSave, f, "# todo\n- one\n- beta\n- alpha\n- alpha 2\n") == 0);
  REQUIRE(as_status("gamma", kRenameSave, f, "# todo\n- one\n- beta\n- alpha\n- gamma\n") == 0);
  CHECK(slurp(f) == "# todo\n- one\n- beta\n- alpha\n- alpha 2\n- gamma\n");
  CHECK(stale_xattr(m) == "merge refused=0 merged=2 conflicts=0");

  // Changes in different places of a file merge too; an edit made after a fresh
  // read is the agent's own content, untouched.
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("gamma", kRead, f) == 0);
  REQUIRE(as_status("gamma", kSave, f, "# TODO\n- one\n- beta\n- alpha\n- alpha 2\n- gamma\n") == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);  // re-read, as edit tools do, and a blind write anyway
  REQUIRE(as_status("beta", kSave, f, "# todo\n- one\n- beta\n- alpha\n- alpha 2\n- gamma!\n") == 0);
  CHECK(slurp(f) == "# TODO\n- one\n- beta\n- alpha\n- alpha 2\n- gamma!\n");
  REQUIRE(as_status("delta", kRead, f) == 0);
  REQUIRE(as_status("delta", kRead, f) == 0);
  REQUIRE(as_status("delta", kSave, f, "edited from the latest\n") == 0);
  CHECK(slurp(f) == "edited from the latest\n");
  CHECK(stale_xattr(m) == "merge refused=0 merged=3 conflicts=0");
  CHECK(stale_metric(broker.endpoint(), "merged") == "3");  // the broker counts them too
  CHECK(stale_metric(broker.endpoint(), "conflict") == "0");
}

TEST_CASE("merge: a real conflict installs the later writer's content and keeps the other side, "
          "listed by gate conflicts",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("cfg.ini");
  write_file(m.in_root("cfg.ini"), "port = 80\n");
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "port = 8080\n") == 0);
  REQUIRE(as_status("alpha", kSave, f, "port = 9090\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  CHECK(slurp(f) == "port = 9090\n");
  CHECK(stale_xattr(m) == "merge refused=0 merged=0 conflicts=1");
  CHECK(stale_metric(broker.endpoint(), "conflict") == "1");
  CHECK(m.log().find("was installed as written: both sides changed the same lines") != std::string::npos);

  std::string out;
  REQUIRE(sh(gate_binary() + " conflicts --json --history-dir '" + m.scratch() + "/history'", &out,
             20s) == 0);
  INFO(out);
  json::array c = json::parse(out).as_array();
  REQUIRE(c.size() == 1);
  const json::object& e = c[0].as_object();
  CHECK(e.at("path") == "cfg.ini");
  CHECK(e.at("agent") == "alpha");
  CHECK(e.at("reason") == "both sides changed the same lines");
  // Both sides can be shown: the replaced version, and what alpha wrote.
  const auto theirs = e.at("replaced_version").to_number<std::uint64_t>();
  REQUIRE(sh(gate_binary() + " show '" + f + "@" + std::to_string(theirs) + "'", &out, 20s) == 0);
  CHECK(out == "port = 8080\n");
  const auto mine = e.at("version").to_number<std::uint64_t>();
  REQUIRE(sh(gate_binary() + " show '" + f + "@" + std::to_string(mine) + "'", &out, 20s) == 0);
  CHECK(out == "port = 9090\n");
  // The table names both and how to see them.
  REQUIRE(sh(gate_binary() + " conflicts '" + f + "'", &out, 20s) == 0);
  CHECK(out.find("cfg.ini") != std::string::npos);
  CHECK(out.find("gate show") != std::string::npos);
}

TEST_CASE("merge: binary content is not merged, and both sides stay", "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("blob.bin");
  write_file(m.in_root("blob.bin"), std::string("\0\1\2base\n", 8));
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("beta", "printf '\\000beta\\n' > \"$1\"", f) == 0);
  REQUIRE(as_status("alpha", "printf '\\000alpha\\n' > \"$1\"", f) == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  CHECK(slurp(f) == std::string("\0alpha\n", 7));
  CHECK(stale_xattr(m) == "merge refused=0 merged=0 conflicts=1");
  std::string out;
  REQUIRE(sh(gate_binary() + " conflicts --json '" + f + "'", &out, 20s) == 0);
  INFO(out);
  CHECK(out.find("binary content is not merged") != std::string::npos);
}

TEST_CASE("merge: four agents read, think and write one file back with a line added, ten rounds "
          "each, by O_TRUNC and by rename: no line is lost and nobody hangs",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("shared.txt");
  write_file(m.in_root("shared.txt"), "start\n");
  // read; think 25-75 ms; write back what was read plus one line.
  const std::string loop =
      "i=0; while [ $i -lt 10 ]; do i=$((i+1)); c=$(cat \"$1\") || exit 1; "
      "sleep 0.0$(( (i * 7 + $2) % 5 + 2 ))5; "
      "if [ $(( (i + $2) % 2 )) = 0 ]; then printf '%s\\n%s\\n' \"$c\" \"$3 line $i\" > \"$1\"; "
      // Claude Code's way: a temp file renamed over it; when the rename fails (a
      // rename waits at most --meta-wait-ms), the file written directly.
      "else printf '%s\\n%s\\n' \"$c\" \"$3 line $i\" > \"$1.tmp.$$\" && "
      "{ mv \"$1.tmp.$$\" \"$1\" || { rm -f \"$1.tmp.$$\"; "
      "printf '%s\\n%s\\n' \"$c\" \"$3 line $i\" > \"$1\"; }; }; fi || exit 1; done";
  std::vector<Child> agents;
  TempDir logs("gate-merge-agents");
  for (int a = 0; a < 4; ++a) {
    const std::string name = "agent" + std::to_string(a);
    agents.push_back(Child::spawn({"env", "GATE_AGENT=" + name, "sh", "-c", loop, "sh", f,
                                   std::to_string(a), name},
                                  logs.path() + "/" + name));
  }
  for (int a = 0; a < 4; ++a) {
    const int status = agents[a].wait(120s);
    INFO("agent" << a << ": " << read_file(logs.path() + "/agent" + std::to_string(a)));
    CHECK(status == 0);
  }
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  const auto lines = lines_of(slurp(f));
  const std::set<std::string> have(lines.begin(), lines.end());
  INFO(slurp(f) << "\n" << stale_xattr(m) << "\nmount log:\n" << m.log());
  std::vector<std::string> lost;
  for (int a = 0; a < 4; ++a)
    for (int i = 1; i <= 10; ++i) {
      const std::string line = "agent" + std::to_string(a) + " line " + std::to_string(i);
      if (!have.count(line)) lost.push_back(line);
    }
  CHECK(lost.empty());
  CHECK(lines.size() == 41);  // and none twice
  CHECK(have.count("start") == 1);
}

TEST_CASE("merge: a file over --history-max-file is not merged: the agent's content is installed "
          "and the conflict says why",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--history-max-file", "1K"});
  const std::string f = m.at("big.txt");
  const std::string body(2000, 'x');
  write_file(m.in_root("big.txt"), body + "\n");
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "beta\n" + body + "\n") == 0);
  REQUIRE(as_status("alpha", kSave, f, body + "\nalpha\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  CHECK(slurp(f) == body + "\nalpha\n");
  std::string out;
  REQUIRE(sh(gate_binary() + " conflicts --json '" + f + "'", &out, 20s) == 0);
  INFO(out << "\nmount log:\n" << m.log());
  CHECK(out.find("over --history-max-file") != std::string::npos);
}

TEST_CASE("merge: a merge that does not fit on the disk leaves what the agent wrote, never a mix, "
          "and keeps both sides",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  // The file lives on a 16 KiB tmpfs inside the root, filled up but for its page.
  const std::string small = m.in_root("small");
  ::mkdir(small.c_str(), 0755);
  REQUIRE(::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=16k") == 0);
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{small};
  const std::string base(4000, 'b');
  write_file(small + "/f.txt", base + "\n");
  sh("dd if=/dev/zero of='" + small + "/filler' bs=4096 count=16 2>/dev/null", nullptr, 20s);
  const std::string f = m.at("small/f.txt");
  const std::string theirs = std::string(59, 't') + "\n" + base + "\n";
  const std::string mine = base + "\n" + std::string(59, 'm') + "\n";  // each fits its page
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, theirs) == 0);
  REQUIRE(as_status("alpha", kSave, f, mine) == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  CHECK(slurp(small + "/f.txt") == mine);  // the merge (4,120 bytes) needed a second page
  std::string out;
  REQUIRE(sh(gate_binary() + " conflicts --json '" + f + "'", &out, 20s) == 0);
  INFO(out);
  CHECK(out.find("the merge could not be written: No space left on device") != std::string::npos);
  auto c = json::parse(out).as_array();
  REQUIRE(c.size() == 1);
  const auto replaced = c[0].as_object().at("replaced_version").to_number<std::uint64_t>();
  REQUIRE(sh(gate_binary() + " show '" + f + "@" + std::to_string(replaced) + "'", &out, 20s) == 0);
  CHECK(out == theirs);
}

TEST_CASE("merge: a file deleted and made again since the agent read it is merged with the new one",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("notes.md");
  write_file(m.in_root("notes.md"), "a\nb\nc\n");
  REQUIRE(as_status("alpha", kRead, f) == 0);
  // beta removes the file and writes it anew, with a line at the top.
  REQUIRE(as_status("beta", "rm \"$1\" && printf 'top\\na\\nb\\nc\\n' > \"$1\"", f) == 0);
  REQUIRE(as_status("alpha", kSave, f, "a\nb\nc\nend\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  CHECK(slurp(f) == "top\na\nb\nc\nend\n");
  CHECK(stale_xattr(m) == "merge refused=0 merged=1 conflicts=0");
}
