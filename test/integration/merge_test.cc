// Stale replacements merged through a real mount (--stale-writes merge, the
// default): real agent processes read a file, think, and write it back the ways
// agents do; no line any of them added is lost, and real conflicts keep both sides.
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/xattr.h>

#include <csignal>
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

// The names in `dir` (ls -A), one per line.
std::string listing(const std::string& dir) {
  std::string names;
  REQUIRE(sh("ls -A '" + dir + "'", &names, 10s) == 0);
  return names;
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

TEST_CASE("merge: a merge takes the file's place by a rename: the saved file's mode and attributes "
          "stay, nothing is left beside it, and the view shows the merge at once",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("doc.md"), src = m.in_root("doc.md");
  auto inode_of = [](const std::string& path) {
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    return st;
  };
  // As a shell redirection saves (O_TRUNC): the file keeps its mode and attributes.
  write_file(src, "a\nb\nc\n");
  REQUIRE(::chmod(src.c_str(), 0640) == 0);
  REQUIRE(::setxattr(src.c_str(), "user.note", "kept", 4, 0) == 0);
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "top\na\nb\nc\n") == 0);
  const ino_t before = inode_of(src).st_ino;
  REQUIRE(as_status("alpha", kSave, f, "a\nb\nc\nend\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  const std::string merged = "top\na\nb\nc\nend\n";
  CHECK(slurp(src) == merged);
  CHECK(inode_of(src).st_ino != before);  // a new file took the name
  CHECK((inode_of(src).st_mode & 07777) == 0640);
  char note[16] = {};
  CHECK(::getxattr(src.c_str(), "user.note", note, sizeof note) == 4);
  CHECK(std::string(note) == "kept");
  CHECK(inode_of(f).st_size == static_cast<off_t>(merged.size()));  // not the agent's size
  CHECK(slurp(f) == merged);
  // A change of attributes through the view reaches the merged file.
  REQUIRE(::chmod(f.c_str(), 0600) == 0);
  CHECK((inode_of(src).st_mode & 07777) == 0600);

  // As Claude Code saves (a temp file renamed over it): the merge takes the temp
  // file's mode, as the rename would have given the file.
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "top\na\nb\nc\nend\nbeta\n") == 0);
  REQUIRE(as_status("alpha", "printf %s \"$2\" > \"$1.tmp\" && chmod 644 \"$1.tmp\" && mv \"$1.tmp\" \"$1\"",
                    f, "alpha\ntop\na\nb\nc\nend\n") == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  const std::string merged2 = "alpha\ntop\na\nb\nc\nend\nbeta\n";
  CHECK(slurp(src) == merged2);
  CHECK((inode_of(src).st_mode & 07777) == 0644);
  CHECK(inode_of(f).st_size == static_cast<off_t>(merged2.size()));
  CHECK(slurp(f) == merged2);
  REQUIRE(::chmod(f.c_str(), 0600) == 0);
  CHECK((inode_of(src).st_mode & 07777) == 0600);
  CHECK(stale_xattr(m) == "merge refused=0 merged=2 conflicts=0");
  // Nothing but the file itself in the directory: no temp file of the merge's, and
  // the agent's temp file went with its rename.
  CHECK(listing(m.root()) == "doc.md\n");
}

TEST_CASE("merge: a merge that comes out as what the agent wrote changes nothing: the same file, "
          "the same mtime",
          "[mount][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string f = m.at("f.txt");
  write_file(m.in_root("f.txt"), "a\nb\n");
  REQUIRE(as_status("alpha", kRead, f) == 0);
  REQUIRE(as_status("beta", kSave, f, "a\nb\nc\n") == 0);
  // alpha made the same change: it says what its file was just before close.
  const AgentRun r = as("alpha",
                        "exec 3>\"$1\" && printf %s \"$2\" >&3 && stat -L -c '%i %y' /proc/$$/fd/3",
                        f, "a\nb\nc\n");
  REQUIRE(r.status == 0);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  INFO("mount log:\n" << m.log());
  std::string now;
  REQUIRE(sh("stat -c '%i %y' '" + m.in_root("f.txt") + "'", &now, 10s) == 0);
  CHECK(now == r.out);
  CHECK(slurp(f) == "a\nb\nc\n");
}

namespace {

// GATE_TEST_FAULT for the mounts a test starts, while it lives.
struct Fault {
  explicit Fault(const char* what) { ::setenv("GATE_TEST_FAULT", what, 1); }
  ~Fault() { ::unsetenv("GATE_TEST_FAULT"); }
};

// Whether the history in `dir` keeps `text` as a version of `key`.
bool history_keeps(const std::string& dir, const std::string& key, const std::string& text) {
  for (const auto& v : history_of(dir, key)) {
    std::string out;
    const auto n = v.as_object().at("version").to_number<std::uint64_t>();
    if (sh(gate_binary() + " show --history-dir '" + dir + "' '" + key + "@" + std::to_string(n) + "'",
           &out, 20s) == 0 &&
        out == text)
      return true;
  }
  return false;
}

}  // namespace

TEST_CASE("merge: the mount killed half way through writing a merge leaves no mix: the agent's "
          "content or the file as it was, and loses nothing",
          "[mount][merge]") {
  Fault fault("kill-mid-merge");  // the mount kills itself (SIGKILL) half way through the write
  BrokerProcess broker;
  std::string base;
  for (int i = 0; i < 4000; ++i) base += "line " + std::to_string(i) + "\n";  // 40 KB: pages to tear
  const std::string theirs = "theirs\n" + base, mine = base + "mine\n";

  SECTION("saved in place (O_TRUNC): the agent's content stays") {
    Mount m(broker.endpoint());
    const std::string f = m.at("f.txt");
    write_file(m.in_root("f.txt"), base);
    REQUIRE(as_status("alpha", kRead, f) == 0);
    REQUIRE(as_status("beta", kSave, f, theirs) == 0);
    as_status("alpha", kSave, f, mine);  // its close may or may not see the mount go
    REQUIRE(m.wait_exit(30s) == 128 + SIGKILL);
    INFO("mount log:\n" << m.log());
    CHECK(slurp(m.in_root("f.txt")) == mine);
    CHECK(listing(m.root()) == "f.txt\n");
    CHECK(history_keeps(m.history_dir(), "f.txt", theirs));
  }
  SECTION("saved by a rename: the file stays as it was, and the agent's temp file keeps its content") {
    Mount m(broker.endpoint());
    const std::string f = m.at("f.txt");
    write_file(m.in_root("f.txt"), base);
    REQUIRE(as_status("alpha", kRead, f) == 0);
    REQUIRE(as_status("beta", kSave, f, theirs) == 0);
    CHECK(as_status("alpha", "printf %s \"$2\" > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"", f, mine) != 0);
    REQUIRE(m.wait_exit(30s) == 128 + SIGKILL);
    INFO("mount log:\n" << m.log());
    CHECK(slurp(m.in_root("f.txt")) == theirs);
    CHECK(slurp(m.in_root("f.txt.tmp")) == mine);
    CHECK(listing(m.root()) == "f.txt\nf.txt.tmp\n");
  }
}
