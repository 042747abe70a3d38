// The history store on a real file system: contents kept byte for byte, once per
// content, bounded, and never a reason for a file operation to fail.
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <cstdlib>
#include <fstream>

#include "mount/history_store.h"
#include "mount/ignore_rules.h"
#include "support/test_support.h"

using namespace gate;
using namespace gate::mount;
using gate::test::TempDir;

namespace {

constexpr Micros kT = 1'800'000'000'000'000;

// A file with `content`, opened for reading; closed on scope exit.
struct Source {
  Source(const TempDir& dir, const std::string& name, const std::string& content)
      : path(dir.path() + "/" + name) {
    std::ofstream(path, std::ios::binary) << content;
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
  }
  ~Source() { ::close(fd); }
  std::string path;
  int fd = -1;
};

std::unique_ptr<HistoryStore> open_store(HistoryOptions o) {
  o.min_free_bytes = 0;
  auto s = HistoryStore::open(o);
  INFO(s.message());
  REQUIRE(s.ok());
  return std::move(s).value();
}

}  // namespace

TEST_CASE("kept versions come back byte for byte, with who made them", "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  auto store = open_store({.dir = dir.path() + "/h"});
  const std::string binary("a\0b\nc", 5);
  Source v1(files, "v1", "first\nline\n"), v2(files, "v2", binary);
  REQUIRE(store->keep("src/a.c", 0, v1.fd, kT).ok());
  REQUIRE(store->made("src/a.c", 17, kT + 5, {"claude", 42, "node"}, "write").ok());
  REQUIRE(store->keep("src/a.c", 17, v2.fd, kT + 9).ok());
  // Keeping a version twice keeps the first content.
  Source other(files, "other", "something else");
  REQUIRE(store->keep("src/a.c", 17, other.fd, kT + 10).ok());

  auto versions = store->versions("src/a.c");
  REQUIRE(versions.ok());
  REQUIRE(versions->size() == 2);
  const HistoryEntry& first = (*versions)[0];
  CHECK(first.version == 0);
  CHECK(first.made_at == 0);  // made before this mount saw it
  CHECK(first.size == 11);
  CHECK(store->content(first.blob) == "first\nline\n");
  const HistoryEntry& second = (*versions)[1];
  CHECK(second.version == 17);
  CHECK(second.by.agent == "claude");
  CHECK(second.by.pid == 42);
  CHECK(second.by.command == "node");
  CHECK(second.event == "write");
  CHECK(second.made_at == kT + 5);
  CHECK(store->content(second.blob) == binary);
  CHECK(store->versions("other")->empty());
}

TEST_CASE("equal contents are stored once", "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  auto store = open_store({.dir = dir.path()});
  Source same(files, "s", std::string(1000, 'x'));
  REQUIRE(store->keep("a", 1, same.fd, kT).ok());
  REQUIRE(store->keep("b", 2, same.fd, kT).ok());
  CHECK(store->versions("a")->at(0).blob == store->versions("b")->at(0).blob);
  CHECK(store->total_bytes() == 1000);
}

TEST_CASE("the store keeps no file over the cap and evicts the oldest contents first",
          "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  auto store = open_store({.dir = dir.path(), .max_file_bytes = 100, .max_total_bytes = 250});
  Source big(files, "big", std::string(101, 'b'));
  Status refused = store->keep("big", 1, big.fd, kT);
  CHECK_FALSE(refused.ok());
  CHECK(refused.message().find("over --history-max-file") != std::string::npos);
  CHECK(store->versions("big")->empty());

  Source a(files, "a", std::string(100, 'a')), b(files, "b", std::string(100, 'b')),
      c(files, "c", std::string(100, 'c'));
  REQUIRE(store->keep("f", 1, a.fd, kT + 1).ok());
  REQUIRE(store->keep("f", 2, b.fd, kT + 2).ok());
  const std::string oldest = store->versions("f")->at(0).blob;
  CHECK(store->content(oldest) == std::string(100, 'a'));
  REQUIRE(store->keep("f", 3, c.fd, kT + 3).ok());  // 300 > 250: the oldest goes
  auto versions = store->versions("f");
  REQUIRE(versions->size() == 3);
  CHECK(versions->at(0).blob.empty());  // evicted, still listed
  CHECK_FALSE(store->content(oldest));
  CHECK_FALSE(versions->at(1).blob.empty());
  CHECK_FALSE(versions->at(2).blob.empty());
  CHECK(store->total_bytes() == 200);
}

TEST_CASE("below the free-space floor the store keeps nothing and says why", "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  HistoryOptions o{.dir = dir.path()};
  o.min_free_bytes = std::uint64_t{1} << 62;  // more than any disk has
  auto store = HistoryStore::open(o);
  REQUIRE(store.ok());
  Source s(files, "s", "content");
  Status st = (*store)->keep("k", 1, s.fd, kT);
  CHECK_FALSE(st.ok());
  CHECK(st.message().find("MiB free") != std::string::npos);
  CHECK((*store)->versions("k")->empty());
}

TEST_CASE("a corrupt history index is refused with a way out", "[unit][history]") {
  TempDir dir("gate-history");
  std::ofstream(dir.path() + "/history.db") << std::string(4096, 'z');
  auto store = HistoryStore::open({.dir = dir.path()});
  CHECK_FALSE(store.ok());
  CHECK(store.message().find("move it aside") != std::string::npos);
}

TEST_CASE("changes across the tree are listed newest first, by agent when asked",
          "[unit][history]") {
  TempDir dir("gate-history");
  auto store = open_store({.dir = dir.path()});
  REQUIRE(store->made("a", 5, kT + 1, {"alpha", 1, "sh"}, "write").ok());
  REQUIRE(store->made("b", 6, kT + 2, {"beta", 2, "sh"}, "rename").ok());
  REQUIRE(store->made("a", 7, kT + 3, {"beta", 2, "sh"}, "write").ok());
  auto all = store->changes(0, "");
  REQUIRE(all->size() == 3);
  CHECK(all->at(0).version == 7);
  CHECK(all->at(2).version == 5);
  auto beta = store->changes(0, "beta");
  REQUIRE(beta->size() == 2);
  CHECK(beta->at(0).key == "a");
  CHECK(beta->at(1).key == "b");
  CHECK(store->changes(kT + 3, "")->size() == 1);
}

TEST_CASE("the history leaves out .git/ and what the repository ignores", "[unit][history]") {
  TempDir repo("gate-ignore");
  std::ofstream(repo.path() + "/.gitignore") << "build/\n*.o\n";
  SECTION("a git work tree") {
    REQUIRE(std::system(("git init -q '" + repo.path() + "'").c_str()) == 0);
    IgnoreRules rules(repo.path(), true);
    CHECK(rules.has_repository());
    CHECK(rules.ignored(".git/index"));
    CHECK(rules.ignored("build/out.txt"));
    CHECK(rules.ignored("src/main.o"));
    CHECK_FALSE(rules.ignored("src/main.c"));
    CHECK_FALSE(rules.ignored(".gitignore"));
    IgnoreRules all(repo.path(), false);  // --history-keep-ignored
    CHECK(all.ignored(".git/HEAD"));
    CHECK_FALSE(all.ignored("build/out.txt"));
  }
  SECTION("not a repository: only .git/") {
    IgnoreRules rules(repo.path(), true);
    CHECK_FALSE(rules.has_repository());
    CHECK(rules.ignored(".git"));
    CHECK(rules.ignored("sub/.git/objects/ab/cdef"));  // a repository made inside the tree
    CHECK(rules.ignored("sub/.git"));
    CHECK_FALSE(rules.ignored("sub/.gitignore"));
    CHECK_FALSE(rules.ignored("build/out.txt"));
  }
}

TEST_CASE("large contents are kept as files and come back whole", "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  auto store = open_store({.dir = dir.path(), .max_file_bytes = 4 << 20});
  std::string big(3 << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 % 251);
  Source s(files, "big", big);
  REQUIRE(store->keep("big", 4, s.fd, kT).ok());
  auto v = store->versions("big");
  REQUIRE(v->size() == 1);
  CHECK(v->at(0).size == static_cast<std::int64_t>(big.size()));
  CHECK(store->content(v->at(0).blob) == big);
  CHECK(std::filesystem::exists(dir.path() + "/objects/" + v->at(0).blob.substr(0, 2) + "/" +
                                v->at(0).blob.substr(2)));
}

TEST_CASE("with its writer thread the store loses nothing: reads flush, closing drains",
          "[unit][history]") {
  TempDir dir("gate-history"), files("gate-files");
  {
    auto store = open_store({.dir = dir.path()});
    store->start();
    for (int i = 0; i < 200; ++i) {
      Source s(files, "f" + std::to_string(i), "content " + std::to_string(i));
      REQUIRE(store->keep("k", static_cast<std::uint64_t>(i), s.fd, kT + i).ok());
      REQUIRE(store->made("k", static_cast<std::uint64_t>(i + 1), kT + i, {"a", 1, "c"}, "write").ok());
    }
    auto v = store->versions("k");  // flushes first
    REQUIRE(v->size() == 201);
    CHECK(store->content(v->at(150).blob) == "content 150");
    for (int i = 200; i < 300; ++i)
      REQUIRE(store->made("k", static_cast<std::uint64_t>(i + 1), kT + i, {"b", 2, "c"}, "write").ok());
  }  // the destructor writes what is still queued
  auto again = open_store({.dir = dir.path()});
  auto v = again->versions("k");
  REQUIRE(v->size() == 301);
  CHECK(v->back().by.agent == "b");
}
