// Paths longer than the broker takes as a key, through a real mount: every call the
// file system accepts works, and locks on them stay apart per path (wire_key.h).
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "support/mount_fixture.h"

using namespace gate::test;

namespace {

const std::string kName(255, 'd');  // the longest name Linux takes
constexpr int kDepth = 20;          // 20 × 256 bytes: keys of 5,100 bytes and more

// The directory kDepth levels of kName below `top`, opened by walking down (no
// call sees a path longer than one name); -1 when a step fails.
int deep_dir(const std::string& top) {
  int fd = ::open(top.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  for (int i = 0; i < kDepth && fd >= 0; ++i) {
    const int next = ::openat(fd, kName.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ::close(fd);
    fd = next;
  }
  return fd;
}

// Makes that directory (through a view or in its source), one level at a time.
void make_deep(const std::string& top) {
  int fd = ::open(top.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  for (int i = 0; i < kDepth; ++i) {
    INFO("level " << i);
    REQUIRE(::mkdirat(fd, kName.c_str(), 0755) == 0);
    const int next = ::openat(fd, kName.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ::close(fd);
    REQUIRE(next >= 0);
    fd = next;
  }
  ::close(fd);
}

std::string deep_key(const std::string& leaf) {
  std::string key;
  for (int i = 0; i < kDepth; ++i) key += kName + "/";
  return key + leaf;
}

std::string read_at(int dir, const std::string& name) {
  const int fd = ::openat(dir, name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "errno " + std::to_string(errno);
  std::string out(256, '\0');
  const ssize_t n = ::read(fd, out.data(), out.size());
  ::close(fd);
  out.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return out;
}

// A child that opens `leaf` in the deep directory with `flags`, says "open" (or the
// errno), and keeps it open until told to close.
std::unique_ptr<Forked> opener(const std::string& mnt, const std::string& leaf, int flags) {
  return std::make_unique<Forked>([mnt, leaf, flags](Forked& self) {
    const int dir = deep_dir(mnt);
    const int fd = dir < 0 ? -1 : ::openat(dir, leaf.c_str(), flags | O_CLOEXEC);
    self.report(fd < 0 ? "errno " + std::to_string(errno) : "open");
    if (fd < 0) return 1;
    self.command();
    ::close(fd);
    return 0;
  });
}

}  // namespace

TEST_CASE("long paths: every call works below a tree deeper than the broker's key limit",
          "[mount][long_paths]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  make_deep(m.mnt());
  REQUIRE(deep_key("f").size() > gate::defaults::kMaxKeyBytes);
  const int dir = deep_dir(m.mnt());
  REQUIRE(dir >= 0);
  INFO("mount log:\n" << m.log());
  // Create, write, read back, replace, chmod, link, symlink, rename, remove.
  int fd = ::openat(dir, "f", O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  CHECK(::write(fd, "one\n", 4) == 4);
  CHECK(::close(fd) == 0);
  CHECK(read_at(dir, "f") == "one\n");
  fd = ::openat(dir, "f", O_WRONLY | O_TRUNC | O_CLOEXEC);
  REQUIRE(fd >= 0);
  CHECK(::write(fd, "two\n", 4) == 4);
  CHECK(::close(fd) == 0);
  CHECK(::fchmodat(dir, "f", 0600, 0) == 0);
  CHECK(::linkat(dir, "f", dir, "hard", 0) == 0);
  CHECK(::symlinkat("f", dir, "soft") == 0);
  CHECK(read_at(dir, "soft") == "two\n");
  CHECK(::renameat(dir, "hard", dir, "moved") == 0);
  CHECK(::mkdirat(dir, "sub", 0755) == 0);
  CHECK(::unlinkat(dir, "sub", AT_REMOVEDIR) == 0);
  CHECK(::unlinkat(dir, "soft", 0) == 0);
  // What the source directory holds, read outside the view.
  const int src = deep_dir(m.root());
  REQUIRE(src >= 0);
  CHECK(read_at(src, "f") == "two\n");
  CHECK(read_at(src, "moved") == "two\n");
  struct stat st {};
  CHECK(::fstatat(src, "f", &st, 0) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  CHECK(st.st_nlink == 2);
  CHECK(::fstatat(src, "soft", &st, AT_SYMLINK_NOFOLLOW) == -1);
  CHECK(::unlinkat(dir, "moved", 0) == 0);
  CHECK(::unlinkat(dir, "f", 0) == 0);
  ::close(src);
  ::close(dir);
  CHECK(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
  CHECK(m.log().find("broker refused") == std::string::npos);
}

TEST_CASE("long paths: two files below the key limit's depth lock apart, one file in FIFO order",
          "[mount][long_paths]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  make_deep(m.root());
  {
    const int src = deep_dir(m.root());
    REQUIRE(src >= 0);
    for (const char* leaf : {"a", "b"}) {
      const int fd = ::openat(src, leaf, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
      REQUIRE(fd >= 0);
      ::close(fd);
    }
    ::close(src);
  }
  auto writer = opener(m.mnt(), "a", O_WRONLY | O_APPEND);
  REQUIRE(writer->line() == "open");
  CHECK(key_state(broker.endpoint(), deep_key("a")).holders == std::vector<std::string>{"write"});
  // Its sibling shares the key's head but not its lock.
  auto other = opener(m.mnt(), "b", O_WRONLY | O_APPEND);
  CHECK(other->line() == "open");
  // The same file waits for the writer, then gets it.
  auto reader = opener(m.mnt(), "a", O_RDONLY);
  REQUIRE(eventually([&] { return key_state(broker.endpoint(), deep_key("a")).queued == 1; }));
  writer->tell("close");
  CHECK(reader->line() == "open");
  CHECK(key_state(broker.endpoint(), deep_key("a")).holders == std::vector<std::string>{"read"});
  reader->tell("close");
  other->tell("close");
  CHECK(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
}

namespace {

// Runs `script` with bash as agent `agent` in the deep directory of `top` (reached by
// `cd -P`, one name at a time); $1 is `text`. Its exit status.
int as_deep(const std::string& agent, const std::string& top, const std::string& script,
            const std::string& text = "") {
  TempDir tmp("gate-agent");
  Child c = Child::spawn({"env", "GATE_AGENT=" + agent, "bash", "-c",
                          "cd -P \"$2\" && for i in $(seq " + std::to_string(kDepth) +
                              "); do cd -P \"$3\" || exit 1; done && " + script,
                          "bash", text, top, kName},
                         tmp.path() + "/out");
  const int status = c.wait(60s);
  INFO(read_file(tmp.path() + "/out"));
  CHECK(status == 0);
  return status;
}

}  // namespace

TEST_CASE("long paths: a stale save deep below the key limit is merged, in place and by a rename",
          "[mount][long_paths][merge]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  make_deep(m.root());
  const int src = deep_dir(m.root());
  REQUIRE(src >= 0);
  for (const char* save : {"printf %s \"$1\" > f", "printf %s \"$1\" > f.tmp && mv f.tmp f"}) {
    INFO("alpha saves with: " << save << "\nmount log:\n" << m.log());
    as_deep("seed", m.mnt(), "printf %s \"$1\" > f", "a\nb\n");
    as_deep("alpha", m.mnt(), "cat f > /dev/null");
    as_deep("beta", m.mnt(), "cat f > /dev/null && printf %s \"$1\" > f", "top\na\nb\n");
    struct stat before {}, after {};
    REQUIRE(::fstatat(src, "f", &before, 0) == 0);
    as_deep("alpha", m.mnt(), save, "a\nb\nalpha\n");  // built from its read
    REQUIRE(eventually([&] { return total_locks(broker.endpoint()) == 0; }));
    CHECK(read_at(src, "f") == "top\na\nb\nalpha\n");
    // Renamed over the name (not written in place), found by a walk of the long key.
    REQUIRE(::fstatat(src, "f", &after, 0) == 0);
    CHECK(after.st_ino != before.st_ino);
  }
  ::close(src);
  char stale[128] = {};
  CHECK(::getxattr(m.mnt().c_str(), "user.gate.stale", stale, sizeof stale) > 0);
  CHECK(std::string(stale) == "merge refused=0 merged=2 conflicts=0");
}
