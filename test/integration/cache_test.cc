// The kernel's caches of a view (names, attributes, directory lists, file contents)
// kept across calls and opens, and what makes the view drop them: a change made
// beside the mount (in the source directly, or through another mount of it) shows
// through the view within a second (README: "What the kernel caches").
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "support/mount_fixture.h"

using namespace std::chrono_literals;
using namespace gate::test;

namespace {

// The documented bound for a change beside the mount to show through the view.
constexpr auto kSeenWithin = 1000ms;

std::set<std::string> names_in(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (dirent* e = ::readdir(d))
    if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") names.insert(e->d_name);
  ::closedir(d);
  return names;
}

struct StatOf {
  bool exists = false;
  struct stat st {};
};

StatOf stat_of(const std::string& path) {
  StatOf s;
  s.exists = ::lstat(path.c_str(), &s.st) == 0;
  return s;
}

// Batches of changes beside the mount the view's watch has handled (user.gate.watch).
std::uint64_t watch_batches(const Mount& m) {
  char buf[256];
  const ssize_t n = ::getxattr(m.mnt().c_str(), "user.gate.watch", buf, sizeof buf - 1);
  REQUIRE(n > 0);
  const std::string said(buf, static_cast<std::size_t>(n));
  REQUIRE(said.rfind("on dirs=", 0) == 0);
  const std::size_t at = said.find("batches=");
  REQUIRE(at != std::string::npos);
  return std::stoull(said.substr(at + 8));
}

}  // namespace

TEST_CASE("names and attributes changed beside the mount show through it within a second",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  write_file(m.at("f"), "12345");
  ::mkdir(m.at("d").c_str(), 0755);
  // The kernel now holds f's name and attributes, and d's list, for a day.
  REQUIRE(stat_of(m.at("f")).st.st_size == 5);
  REQUIRE(names_in(m.at("d")).empty());
  REQUIRE(stat_of(m.at("f")).st.st_size == 5);

  SECTION("a file's size and mode") {
    write_file(m.in_root("f"), "1234567890");
    REQUIRE(::chmod(m.in_root("f").c_str(), 0600) == 0);
    CHECK(eventually([&] { return stat_of(m.at("f")).st.st_size == 10; }, kSeenWithin));
    CHECK(eventually([&] { return (stat_of(m.at("f")).st.st_mode & 07777) == 0600; }, kSeenWithin));
  }
  SECTION("a new file in a listed directory") {
    write_file(m.in_root("d/new"), "x");
    CHECK(eventually([&] { return names_in(m.at("d")) == std::set<std::string>{"new"}; }, kSeenWithin));
    CHECK(slurp(m.at("d/new")) == "x");
  }
  SECTION("a removed file") {
    REQUIRE(::unlink(m.in_root("f").c_str()) == 0);
    CHECK(eventually([&] { return !stat_of(m.at("f")).exists; }, kSeenWithin));
    CHECK(names_in(m.mnt()).count("f") == 0);
  }
  SECTION("a file renamed over another one") {
    write_file(m.in_root("d/g"), "the other file");
    REQUIRE(eventually([&] { return stat_of(m.at("d/g")).exists; }, kSeenWithin));
    const ino_t before = stat_of(m.at("f")).st.st_ino;
    REQUIRE(::rename(m.in_root("d/g").c_str(), m.in_root("f").c_str()) == 0);
    CHECK(eventually([&] { return !stat_of(m.at("d/g")).exists; }, kSeenWithin));
    CHECK(eventually([&] { return stat_of(m.at("f")).st.st_ino != before; }, kSeenWithin));
    CHECK(slurp(m.at("f")) == "the other file");
  }
  SECTION("a new directory with files in it") {
    ::mkdir(m.in_root("d/sub").c_str(), 0755);
    write_file(m.in_root("d/sub/a"), "a");
    CHECK(eventually([&] { return names_in(m.at("d/sub")) == std::set<std::string>{"a"}; }, kSeenWithin));
    // A directory the view has seen is watched too.
    write_file(m.in_root("d/sub/b"), "b");
    CHECK(eventually([&] { return names_in(m.at("d/sub")) == std::set<std::string>{"a", "b"}; },
                     kSeenWithin));
  }
}

TEST_CASE("a mode changed beside a file the mount just wrote shows within a second",
          "[mount][cache]") {
  // The file is as the mount's own write and close left it but for its ctime: the
  // watch must not take the change for the mount's own.
  BrokerProcess broker;
  std::vector<std::string> args;
  SECTION("locked") {}
  SECTION("without locks") { args = {"--no-locking"}; }
  Mount m(broker.endpoint(), args);
  write_file(m.at("f"), "12345");
  REQUIRE((stat_of(m.at("f")).st.st_mode & 07777) == 0644);
  // The watch has told the kernel of the write (a batch of its, taken in order) once
  // it has handled a batch begun after it: one with a file made beside the mount.
  const std::uint64_t before = watch_batches(m);
  write_file(m.in_root("marker"), "");
  REQUIRE(eventually([&] { return watch_batches(m) > before; }, kSeenWithin));
  REQUIRE((stat_of(m.at("f")).st.st_mode & 07777) == 0644);
  REQUIRE(::chmod(m.in_root("f").c_str(), 0600) == 0);
  CHECK(eventually([&] { return (stat_of(m.at("f")).st.st_mode & 07777) == 0600; }, kSeenWithin));
  CHECK(stat_of(m.at("f")).st.st_size == 5);
}

TEST_CASE("with --no-watch, a change beside the mount shows after --attr-timeout-ms",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--no-watch", "--attr-timeout-ms", "200"});
  write_file(m.at("f"), "12345");
  REQUIRE(stat_of(m.at("f")).st.st_size == 5);
  write_file(m.in_root("f"), "1234567890");
  CHECK(eventually([&] { return stat_of(m.at("f")).st.st_size == 10; }, kSeenWithin));
  CHECK(m.log().find("--attr-timeout-ms") == std::string::npos);  // not watched: by choice
}

TEST_CASE("contents cached across opens are dropped when the file changed since",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount a(broker.endpoint());
  Mount b(broker.endpoint(), {}, a.root());  // a second view of the same directory
  const std::string mnt_b = b.mnt();

  // Same-size contents, one after the other as fast as they come: neither the size
  // nor a coarse timestamp tells them apart, the version (and ctime) must.
  for (int i = 0; i < 50; ++i) {
    char content[16];
    std::snprintf(content, sizeof content, "version %04d", i);
    const std::string written = content;
    if (i % 3 == 2) {
      write_file(a.in_root("f"), written);  // beside both mounts
    } else {
      write_file(a.at("f"), written);  // through mount a
    }
    INFO("round " << i);
    REQUIRE(slurp(mnt_b + "/f") == written);  // b read it before: its cache must go
    REQUIRE(slurp(a.at("f")) == written);
    // And through b, seen by a.
    std::snprintf(content, sizeof content, "b-vers %04d", i);
    write_file(mnt_b + "/f", content);
    REQUIRE(slurp(a.at("f")) == content);
  }
}

TEST_CASE("a file open for reading shows a change made beside the mount within a second",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  write_file(m.at("f"), "aaaa");
  const int fd = ::open(m.at("f").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  auto content = [fd] {
    char buf[16] = {};
    const ssize_t n = ::pread(fd, buf, sizeof buf, 0);
    return n < 0 ? std::string("(error)") : std::string(buf, static_cast<std::size_t>(n));
  };
  CHECK(content() == "aaaa");  // cached now
  write_file(m.in_root("f"), "bbbb");
  CHECK(eventually([&] { return content() == "bbbb"; }, kSeenWithin));
  ::close(fd);
  // And the content the mount wrote itself is read back from the cache, right.
  write_file(m.at("f"), "cccc");
  CHECK(slurp(m.at("f")) == "cccc");
}

namespace {

// A POSIX access ACL in the kernel's xattr form (system.posix_acl_access): the owner
// rw-, `user` r--, the owning group and others nothing, the mask r--.
std::string acl_granting_read_to(uid_t user) {
  std::string blob;
  auto put32 = [&](std::uint32_t v) {
    for (int i = 0; i < 4; ++i) blob.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  auto entry = [&](std::uint16_t tag, std::uint16_t perm, std::uint32_t id) {
    for (std::uint16_t v : {tag, perm}) {
      blob.push_back(static_cast<char>(v & 0xff));
      blob.push_back(static_cast<char>(v >> 8));
    }
    put32(id);
  };
  constexpr std::uint32_t kAny = 0xffffffff;
  put32(2);                 // the format's version
  entry(0x01, 6, kAny);     // owner
  entry(0x02, 4, user);     // the named user
  entry(0x04, 0, kAny);     // owning group
  entry(0x10, 4, kAny);     // mask
  entry(0x20, 0, kAny);     // others
  return blob;
}

// The errno of opening `path` for reading as `user` (0: it opened).
int open_errno_as(uid_t user, const std::string& path) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setresgid(user, user, user) != 0 || ::setresuid(user, user, user) != 0)
      ::_exit(250);
    const int fd = ::open(path.c_str(), O_RDONLY);
    ::_exit(fd >= 0 ? 0 : errno);
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

}  // namespace

TEST_CASE("POSIX ACLs hold through the view, and one set or removed beside it shows within a second",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--allow-other"});
  // Another user may walk to the file.
  REQUIRE(::chmod(m.scratch().c_str(), 0755) == 0);
  REQUIRE(::chmod(m.root().c_str(), 0755) == 0);
  constexpr uid_t kNobody = 65534;
  write_file(m.at("f"), "secret");
  REQUIRE(::chmod(m.at("f").c_str(), 0600) == 0);
  const std::string acl = acl_granting_read_to(kNobody);
  const char* name = "system.posix_acl_access";

  REQUIRE(open_errno_as(kNobody, m.at("f")) == EACCES);
  SECTION("set through the view: kept below, and obeyed") {
    REQUIRE(::setxattr(m.at("f").c_str(), name, acl.data(), acl.size(), 0) == 0);
    CHECK(open_errno_as(kNobody, m.at("f")) == 0);
    char back[64];
    CHECK(::getxattr(m.in_root("f").c_str(), name, back, sizeof back) == static_cast<ssize_t>(acl.size()));
    REQUIRE(::removexattr(m.at("f").c_str(), name) == 0);
    CHECK(open_errno_as(kNobody, m.at("f")) == EACCES);
  }
  SECTION("set and removed beside the view") {
    REQUIRE(::setxattr(m.in_root("f").c_str(), name, acl.data(), acl.size(), 0) == 0);
    CHECK(eventually([&] { return open_errno_as(kNobody, m.at("f")) == 0; }, kSeenWithin));
    REQUIRE(::removexattr(m.in_root("f").c_str(), name) == 0);
    CHECK(eventually([&] { return open_errno_as(kNobody, m.at("f")) == EACCES; }, kSeenWithin));
  }
}

TEST_CASE("a file without an SELinux label says the view keeps none so that ls -l stops asking",
          "[mount][cache]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  write_file(m.at("plain"), "a");
  write_file(m.at("labelled"), "b");
  const char* name = "security.selinux";
  char buf[256];
  // Beside the mount the file has no label; through it the answer is "not kept".
  errno = 0;
  REQUIRE(::getxattr(m.in_root("plain").c_str(), name, buf, sizeof buf) < 0);
  REQUIRE(errno == ENODATA);
  errno = 0;
  CHECK(::getxattr(m.at("plain").c_str(), name, buf, sizeof buf) < 0);
  CHECK(errno == EOPNOTSUPP);
  // Any other missing attribute is still "none".
  errno = 0;
  CHECK(::getxattr(m.at("plain").c_str(), "user.none", buf, sizeof buf) < 0);
  CHECK(errno == ENODATA);
  // A label the file below has is read through the view.
  const std::string label = "system_u:object_r:gate_test_t:s0";
  if (::setxattr(m.in_root("labelled").c_str(), name, label.c_str(), label.size() + 1, 0) != 0) {
    WARN("the directory below keeps no security.* attributes here (" << std::strerror(errno) << ")");
    return;
  }
  const ssize_t n = ::getxattr(m.at("labelled").c_str(), name, buf, sizeof buf);
  REQUIRE(n == static_cast<ssize_t>(label.size() + 1));
  CHECK(std::string(buf) == label);
}
