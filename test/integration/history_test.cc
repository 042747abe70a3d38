// The history through a real mount: what agents overwrite is kept byte for byte,
// `gate history` and `gate show` give it back, the size bound evicts the oldest,
// and a full or broken store never stops the mount.
#include <sys/mount.h>
#include <sys/xattr.h>

#include "support/agent_saves.h"

using namespace gate::test;
namespace json = boost::json;

namespace {

// Saves `text` to `file` through the mount as agent `agent`, by a shell redirection
// (O_TRUNC) or by a temp file renamed over it, as the agents do.
void save(const std::string& agent, const std::string& file, const std::string& text, bool rename) {
  const std::string script = rename ? "printf %s \"$1\" > \"$2.tmp\" && mv \"$2.tmp\" \"$2\""
                                    : "printf %s \"$1\" > \"$2\"";
  Child c = Child::spawn({"env", "GATE_AGENT=" + agent, "sh", "-c", script, "sh", text, file});
  REQUIRE(c.wait(20s) == 0);
}

// A small tmpfs, unmounted on scope exit.
struct Tmpfs {
  explicit Tmpfs(const std::string& dir, const std::string& size) : path(dir) {
    ::mkdir(dir.c_str(), 0755);
    mounted = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, ("size=" + size).c_str()) == 0;
  }
  ~Tmpfs() {
    if (mounted) ::umount2(path.c_str(), MNT_DETACH);
  }
  std::string path;
  bool mounted = false;
};

}  // namespace

TEST_CASE("three agents rewrite one file ten times: every replaced version is listed with its "
          "agent and shown byte for byte",
          "[mount][history]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string hist = m.scratch() + "/history";
  std::vector<std::pair<std::string, std::string>> written{{"", "original\n"}};
  write_file(m.in_root("f.txt"), written[0].second);
  const char* agents[] = {"alpha", "beta", "gamma"};
  for (int round = 0; round < 10; ++round)
    for (int a = 0; a < 3; ++a) {
      std::string text;
      for (int line = 0; line <= round; ++line)
        text += std::string(agents[a]) + " round " + std::to_string(round) + " line " +
                std::to_string(line) + "\n";
      save(agents[a], m.at("f.txt"), text, (round + a) % 2 == 1);
      written.emplace_back(agents[a], text);
    }
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));

  json::array h = history_of(hist, m.at("f.txt"));
  INFO(json::serialize(h) << "\nmount log:\n" << m.log());
  REQUIRE(h.size() == written.size());
  std::uint64_t last = 0;
  for (std::size_t i = 0; i < h.size(); ++i) {
    const auto& e = h[i].as_object();
    const std::uint64_t v = e.at("version").to_number<std::uint64_t>();
    CHECK((i == 0 || v > last));
    last = v;
    CHECK(e.at("kept").as_bool());
    if (i > 0) CHECK(e.at("agent") == json::value(written[i].first));
    CHECK(show(hist, m.at("f.txt"), v) == written[i].second);
  }
  // The text view names the agents and the line counts.
  std::string table;
  REQUIRE(sh(gate_binary() + " history --history-dir '" + hist + "' '" + m.at("f.txt") + "'",
             &table, 20s) == 0);
  CHECK(table.find("gamma") != std::string::npos);
  CHECK(table.find("+10 -10") != std::string::npos);  // gamma's last save over beta's
}

TEST_CASE("the history's size bound evicts the oldest versions first", "[mount][history]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--history-max-bytes", "350"});
  const std::string hist = m.scratch() + "/history";
  write_file(m.in_root("f"), std::string(100, '0'));
  for (char c = '1'; c <= '8'; ++c) save("a", m.at("f"), std::string(100, c), false);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  json::array h = history_of(hist, m.at("f"));
  INFO(json::serialize(h));
  REQUIRE(h.size() == 9);
  // 8 replaced versions of 100 bytes, at most 350 kept: the 3 newest (and the
  // current file).
  for (std::size_t i = 0; i < h.size(); ++i)
    CHECK(h[i].as_object().at("kept").as_bool() == (i >= 5));
  CHECK(show(hist, m.at("f"), h[7].as_object().at("version").to_number<std::uint64_t>()) ==
        std::string(100, '7'));
  std::string out;
  CHECK(sh(gate_binary() + " show --history-dir '" + hist + "' '" + m.at("f") + "@" +
               std::to_string(h[0].as_object().at("version").to_number<std::uint64_t>()) + "'",
           &out, 20s) == 1);
  CHECK(out.find("no longer kept") != std::string::npos);
}

TEST_CASE("a full or unusable history never stops the mount", "[mount][history]") {
  BrokerProcess broker;
  TempDir scratch("gate-history-disk");
  SECTION("a store on a full disk") {
    Tmpfs small(scratch.path() + "/small", "1m");
    REQUIRE(small.mounted);
    Mount m(broker.endpoint(), {"--history-dir", small.path});
    for (int i = 0; i < 5; ++i) {
      const std::string text(300'000, static_cast<char>('a' + i));
      if (i % 2 == 0) {
        write_file(m.at("big"), text);
      } else {
        write_file(m.at("big.tmp"), text);
        REQUIRE(::rename(m.at("big.tmp").c_str(), m.at("big").c_str()) == 0);
      }
      CHECK(slurp(m.in_root("big")) == text);
    }
    CHECK(eventually([&] { return m.log().find("history: ") != std::string::npos; }));
    CHECK(m.log().find("files are served as usual") != std::string::npos);
    // The view tells `gate status` of the last miss.
    char buf[4096];
    const ssize_t n = ::getxattr(m.mnt().c_str(), "user.gate.history.problem", buf, sizeof buf);
    REQUIRE(n > 0);
    CHECK(std::string(buf, static_cast<std::size_t>(n)).find("MiB free") != std::string::npos);
  }
  SECTION("a store that cannot be opened") {
    const std::string not_a_dir = scratch.path() + "/file";
    write_file(not_a_dir, "not a directory\n");
    Mount m(broker.endpoint(), {"--history-dir", not_a_dir});
    save("a", m.at("f"), "one\n", false);
    save("a", m.at("f"), "two\n", true);
    CHECK(slurp(m.in_root("f")) == "two\n");
    CHECK(m.log().find("no history of replaced versions") != std::string::npos);
  }
}

TEST_CASE("gate history and gate show refuse what they cannot answer", "[cli][history]") {
  TempDir dir("gate-history-cli");
  std::string out;
  CHECK(sh(gate_binary() + " history /etc/hostname", &out, 20s) == 1);
  CHECK(out.find("not inside a gate view") != std::string::npos);
  CHECK(sh(gate_binary() + " history --history-dir '" + dir.path() + "' f", &out, 20s) == 1);
  CHECK(out.find("no history at") != std::string::npos);
  CHECK(sh(gate_binary() + " show f", &out, 20s) == 2);
  CHECK(out.find("PATH@VERSION") != std::string::npos);
  CHECK(sh(gate_binary() + " show f@-1", &out, 20s) == 2);
  CHECK(sh(gate_binary() + " history", &out, 20s) == 2);
}

TEST_CASE("gate restore writes a kept version back as a new version and loses nothing",
          "[mount][history]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string hist = m.scratch() + "/history";
  write_file(m.in_root("f"), "one\n");
  save("alpha", m.at("f"), "two\n", false);
  save("beta", m.at("f"), "three\n", true);
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  json::array before = history_of(hist, m.at("f"));
  REQUIRE(before.size() == 3);
  const auto first = before[0].as_object().at("version").to_number<std::uint64_t>();

  std::string out;
  REQUIRE(sh("env GATE_AGENT=restorer " + gate_binary() + " restore --history-dir '" + hist +
                 "' '" + m.at("f") + "@" + std::to_string(first) + "'",
             &out, 20s) == 0);
  INFO(out);
  CHECK(out.find("restored f to the content of version " + std::to_string(first)) !=
        std::string::npos);
  CHECK(slurp(m.in_root("f")) == "one\n");
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  json::array after = history_of(hist, m.at("f"));
  INFO(json::serialize(after));
  REQUIRE(after.size() == 4);
  const auto& newest = after[3].as_object();
  CHECK(newest.at("agent") == "restorer");
  CHECK(newest.at("version").to_number<std::uint64_t>() >
        after[2].as_object().at("version").to_number<std::uint64_t>());
  // What the restore replaced ("three") is kept, and so is every older version.
  CHECK(show(hist, m.at("f"), after[2].as_object().at("version").to_number<std::uint64_t>()) ==
        "three\n");
  CHECK(show(hist, m.at("f"), newest.at("version").to_number<std::uint64_t>()) == "one\n");

  CHECK(sh(gate_binary() + " restore --history-dir '" + hist + "' '" + m.at("f") + "@999999'",
           &out, 20s) == 1);
  CHECK(out.find("no version 999999") != std::string::npos);
  CHECK(sh(gate_binary() + " restore --history-dir '" + hist + "' f@1", &out, 20s) == 1);
  CHECK(out.find("no view") != std::string::npos);
}

TEST_CASE("gate log lists the changes across the view newest first, by agent and time",
          "[mount][history]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string hist = m.scratch() + "/history";
  ::mkdir(m.in_root("src").c_str(), 0755);
  save("alpha", m.at("src/a.c"), "a\n", false);
  save("beta", m.at("src/b.c"), "b\n", true);
  save("alpha", m.at("notes.md"), "n\n", false);
  {
    // A helper that clears its environment still works for the agent that started it.
    Child c = Child::spawn({"env", "GATE_AGENT=gamma", "sh", "-c",
                            "env -i sh -c 'printf h > \"$1\"' sh \"$1\"; true", "sh",
                            m.at("helper.txt")});
    REQUIRE(c.wait(20s) == 0);
  }
  REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  auto log_json = [&](const std::string& args) {
    std::string out;
    INFO(out);
    REQUIRE(sh(gate_binary() + " log --json --history-dir '" + hist + "' " + args, &out, 20s) == 0);
    return json::parse(out).as_array();
  };
  json::array all = log_json("'" + m.mnt() + "'");
  INFO(json::serialize(all));
  REQUIRE(all.size() >= 4);
  CHECK(all[0].as_object().at("path") == "helper.txt");  // newest first
  CHECK(all[0].as_object().at("agent") == "gamma");
  CHECK(all[1].as_object().at("path") == "notes.md");
  CHECK(all[1].as_object().at("agent") == "alpha");
  for (std::size_t i = 1; i < all.size(); ++i)
    CHECK(all[i - 1].as_object().at("time").as_string() >= all[i].as_object().at("time").as_string());
  json::array beta = log_json("--agent beta '" + m.mnt() + "'");
  REQUIRE_FALSE(beta.empty());
  for (const auto& e : beta) CHECK(e.as_object().at("agent") == "beta");
  json::array src = log_json("'" + m.at("src") + "'");
  for (const auto& e : src) CHECK(e.as_object().at("path").as_string().starts_with("src/"));
  CHECK(log_json("--since 1h '" + m.mnt() + "'").size() == all.size());
  std::string out;
  CHECK(sh(gate_binary() + " log --since soon '" + m.mnt() + "'", &out, 20s) == 2);
  CHECK(out.find("--since") != std::string::npos);
}
