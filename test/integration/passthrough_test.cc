// Read-only opens read straight from the files below (FUSE passthrough): the bytes
// are the file's, no READ reaches the daemon, and a file open both ways at once (a
// reader and a writer, in either order) always reads what was last written.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <utility>

#include "support/mount_fixture.h"

using namespace gate::test;

namespace {

// What the view says of passthrough (user.gate.passthrough on its root).
struct Through {
  std::string state;  // "on" or "off"
  std::uint64_t opens = 0, files = 0, handles = 0, reads = 0, writes = 0;
  std::string why;
};

Through through(const Mount& m) {
  char buf[512];
  const ssize_t n = ::getxattr(m.mnt().c_str(), "user.gate.passthrough", buf, sizeof buf);
  Through t;
  if (n <= 0) return t;
  const std::string value(buf, static_cast<std::size_t>(n));
  std::istringstream in(value.substr(0, value.find(": ")));
  in >> t.state;
  std::string field;
  while (in >> field) {
    const auto eq = field.find('=');
    if (eq == std::string::npos) continue;
    const std::uint64_t n = std::stoull(field.substr(eq + 1));
    const std::string name = field.substr(0, eq);
    (name == "opens"     ? t.opens
     : name == "files"   ? t.files
     : name == "handles" ? t.handles
     : name == "reads"   ? t.reads
                         : t.writes) = n;
  }
  if (auto colon = value.find(": "); colon != std::string::npos) t.why = value.substr(colon + 2);
  return t;
}

// The kernel sends a release after the last close, on its own time: until the view
// has handled it, the file still counts as open there.
bool all_released(const Mount& m) {
  return eventually([&] { return through(m).handles == 0; }, 5s);
}

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(gen());
  return s;
}

std::string pread_all(int fd, std::size_t n, off_t at = 0) {
  std::string s(n, '\0');
  const ssize_t got = ::pread(fd, s.data(), n, at);
  s.resize(got < 0 ? 0 : static_cast<std::size_t>(got));
  return s;
}

bool pwrite_all(int fd, const std::string& data, off_t at = 0) {
  return ::pwrite(fd, data.data(), data.size(), at) == static_cast<ssize_t>(data.size());
}

}  // namespace

TEST_CASE("a file opened read-only is read straight from the file below", "[mount][passthrough]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  const std::string data = random_bytes(3 * 1024 * 1024 + 17, 1);
  write_file(m.at("f"), data);  // through the view: a writer, through the daemon
  const Through before = through(m);
  if (!kernel_passthrough_expected()) {
    CHECK(before.state == "off");
    CHECK_FALSE(before.why.empty());
    CHECK(slurp(m.at("f")) == data);
    return;
  }
  REQUIRE(before.state == "on");

  SECTION("the same bytes, read, read at offsets and mapped, with no READ at the daemon") {
    Fd fd(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(fd.fd >= 0);
    CHECK(pread_all(fd.fd, data.size() + 100) == data);
    CHECK(pread_all(fd.fd, 4096, 1'000'001) == data.substr(1'000'001, 4096));
    void* map = ::mmap(nullptr, data.size(), PROT_READ, MAP_SHARED, fd.fd, 0);
    REQUIRE(map != MAP_FAILED);
    CHECK(std::memcmp(map, data.data(), data.size()) == 0);
    ::munmap(map, data.size());
    fd.close();
    const Through after = through(m);
    CHECK(after.opens == before.opens + 1);
    CHECK(after.reads == before.reads);
  }
  SECTION("calls that reach the daemon on a straight reader's handle work") {
    // The daemon opens no descriptor of its own for such a handle until one of these
    // needs it.
    Fd fd(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(fd.fd >= 0);
    struct stat st {};
    REQUIRE(::fstat(fd.fd, &st) == 0);
    CHECK(st.st_size == static_cast<off_t>(data.size()));
    CHECK(::fsync(fd.fd) == 0);
    CHECK(::fdatasync(fd.fd) == 0);
    CHECK(::lseek(fd.fd, 10, SEEK_DATA) == 10);
    CHECK(::lseek(fd.fd, 0, SEEK_HOLE) == static_cast<off_t>(data.size()));
    Fd out(::open(m.at("copy").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644));
    REQUIRE(out.fd >= 0);
    loff_t in_at = 4096;
    std::size_t copied = 0;
    while (copied < 65536) {
      const ssize_t n = ::copy_file_range(fd.fd, &in_at, out.fd, nullptr, 65536 - copied, 0);
      REQUIRE(n > 0);
      copied += static_cast<std::size_t>(n);
    }
    out.close();
    CHECK(::close(std::exchange(fd.fd, -1)) == 0);
    CHECK(slurp(m.at("copy")) == data.substr(4096, 65536));
    CHECK(through(m).reads == before.reads);
  }
  SECTION("two readers at once share the file below") {
    Fd a(::open(m.at("f").c_str(), O_RDONLY));
    Fd b(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(a.fd >= 0);
    REQUIRE(b.fd >= 0);
    CHECK(pread_all(a.fd, 100, 5) == data.substr(5, 100));
    CHECK(pread_all(b.fd, 100, 7) == data.substr(7, 100));
    a.close();
    // The file below stays registered while one of them is open.
    CHECK(pread_all(b.fd, data.size()) == data);
    b.close();
    CHECK(through(m).opens == before.opens + 2);
    CHECK(through(m).reads == before.reads);
    CHECK(slurp(m.at("f")) == data);
  }
  SECTION("a file stays registered for the next open until the kernel forgets it") {
    for (int i = 0; i < 3; ++i) CHECK(slurp(m.at("f")) == data);
    CHECK(through(m).files == before.files + 1);
    CHECK(through(m).opens == before.opens + 3);
    REQUIRE(::unlink(m.at("f").c_str()) == 0);
    CHECK(eventually([&] { return through(m).files == before.files; }));
  }
  SECTION("a save through the view, then a read, shows the save") {
    CHECK(slurp(m.at("f")) == data);
    const std::string next = random_bytes(data.size(), 2);  // same size
    write_file(m.at("f"), next);
    CHECK(slurp(m.at("f")) == next);
    CHECK(slurp(m.in_root("f")) == next);
  }
  SECTION("a change beside the mount shows in a handle open for reading at once") {
    Fd fd(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(fd.fd >= 0);
    REQUIRE(pread_all(fd.fd, 10) == data.substr(0, 10));
    Fd below(::open(m.in_root("f").c_str(), O_WRONLY));
    REQUIRE(pwrite_all(below.fd, "changed!"));
    CHECK(pread_all(fd.fd, 10) == "changed!" + data.substr(8, 2));
  }
}

TEST_CASE("opens for reading and for writing leave no descriptor of the daemon's behind", "[mount][passthrough]") {
  BrokerProcess broker;
  Mount m(broker.endpoint());
  write_file(m.at("f"), "content");
  REQUIRE(all_released(m));
  const std::string fds = "/proc/" + std::to_string(m.pid()) + "/fd";
  auto open_fds = [&] {
    std::size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator(fds)) n += e.exists() ? 1 : 0;
    return n;
  };
  const std::size_t before = open_fds();
  for (int i = 0; i < 50; ++i) {
    Fd w(::open(m.at("f").c_str(), O_WRONLY | O_APPEND));
    REQUIRE(w.fd >= 0);
    REQUIRE(::write(w.fd, "x", 1) == 1);
    w.close();
    CHECK(slurp(m.at("f")).size() == 8 + static_cast<std::size_t>(i));
  }
  REQUIRE(all_released(m));
  // A few for the broker's connection and the like may come and go; 100 handles
  // that each kept one would not.
  CHECK(open_fds() < before + 10);
}

TEST_CASE("a file open for reading and for writing at once reads what was written whichever came first",
          "[mount][passthrough]") {
  // Without locks, as a reader and a writer of one agent (or a lease that ran out)
  // can be: the kernel refuses a file open straight and through its cache at once.
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--no-locking"});
  const std::string v1 = random_bytes(256 * 1024, 3), v2 = random_bytes(256 * 1024, 4);
  write_file(m.in_root("f"), v1);
  const Through before = through(m);
  const bool on = before.state == "on";
  const std::uint64_t one = on ? 1 : 0;
  CHECK(on == kernel_passthrough_expected());

  SECTION("the writer first: the reader goes through the daemon and its cache") {
    Fd w(::open(m.at("f").c_str(), O_WRONLY));
    REQUIRE(w.fd >= 0);
    Fd r(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(r.fd >= 0);
    CHECK(pread_all(r.fd, v1.size()) == v1);
    REQUIRE(pwrite_all(w.fd, v2));
    CHECK(pread_all(r.fd, v2.size()) == v2);
    const Through after = through(m);
    CHECK(after.opens == before.opens);
    CHECK(after.reads > before.reads);
  }
  SECTION("the reader first: the writer goes direct, and both see the file below") {
    Fd r(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(r.fd >= 0);
    CHECK(pread_all(r.fd, v1.size()) == v1);
    Fd w(::open(m.at("f").c_str(), O_RDWR));
    REQUIRE(w.fd >= 0);
    REQUIRE(pwrite_all(w.fd, v2));
    CHECK(pread_all(r.fd, v2.size()) == v2);
    CHECK(pread_all(w.fd, v2.size()) == v2);
    // Another reader, while the writer is open, joins the first.
    Fd r2(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(r2.fd >= 0);
    CHECK(pread_all(r2.fd, v2.size()) == v2);
    CHECK(through(m).opens == before.opens + 2 * one);
  }
  SECTION("what the kernel cached before a direct write is not served after it") {
    {
      // The kernel's cache of f holds v1 (read through it while a writer is open).
      Fd w(::open(m.at("f").c_str(), O_WRONLY));
      Fd r(::open(m.at("f").c_str(), O_RDONLY));
      REQUIRE(r.fd >= 0);
      REQUIRE(pread_all(r.fd, v1.size()) == v1);
    }
    REQUIRE(all_released(m));
    CHECK(through(m).opens == before.opens);
    {
      // Same size, written past that cache.
      Fd r(::open(m.at("f").c_str(), O_RDONLY));
      Fd w(::open(m.at("f").c_str(), O_WRONLY));
      REQUIRE(w.fd >= 0);
      REQUIRE(pwrite_all(w.fd, v2));
    }
    REQUIRE(all_released(m));
    CHECK(through(m).opens == before.opens + one);
    // Through the cache again: v2, not the cached v1.
    Fd w(::open(m.at("f").c_str(), O_WRONLY));
    Fd r(::open(m.at("f").c_str(), O_RDONLY));
    REQUIRE(r.fd >= 0);
    CHECK(pread_all(r.fd, v2.size()) == v2);
    CHECK(through(m).opens == before.opens + one);
  }
}

TEST_CASE("a mount with --no-passthrough reads every file through the daemon", "[mount][passthrough]") {
  BrokerProcess broker;
  Mount m(broker.endpoint(), {"--no-passthrough"});
  write_file(m.in_root("f"), "hello\n");
  const Through before = through(m);
  CHECK(before.state == "off");
  CHECK(before.why == "turned off (--no-passthrough)");
  CHECK(slurp(m.at("f")) == "hello\n");
  const Through after = through(m);
  CHECK(after.opens == 0);
  CHECK(after.reads > before.reads);
}

TEST_CASE("writers stay with the daemon unless --passthrough-writes lets new and emptied files go straight",
          "[mount][passthrough]") {
  BrokerProcess broker;
  const std::string data = random_bytes(2 * 1024 * 1024 + 5, 5);
  SECTION("by default a writer's writes reach the daemon") {
    Mount m(broker.endpoint());
    const Through before = through(m);
    write_file(m.at("f"), data);
    const Through after = through(m);
    CHECK(after.opens == before.opens);
    CHECK(after.writes > before.writes);
    CHECK(slurp(m.in_root("f")) == data);
  }
  SECTION("with --passthrough-writes") {
    Mount m(broker.endpoint(), {"--passthrough-writes"});
    if (!kernel_passthrough_expected()) {
      CHECK(through(m).state == "off");
      return;
    }
    const Through before = through(m);
    write_file(m.at("old"), "the old content\n");  // straight too
    REQUIRE(eventually([&] { return key_version(broker.endpoint(), "old") > 0; }));
    const std::uint64_t old_version = key_version(broker.endpoint(), "old");

    // A new file: straight, and a reader that joins it reads what was written.
    Fd w(::open(m.at("f").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644));
    REQUIRE(w.fd >= 0);
    REQUIRE(pwrite_all(w.fd, data));
    CHECK(slurp(m.in_root("f")) == data);
    REQUIRE(::fsync(w.fd) == 0);
    w.close();
    CHECK(slurp(m.at("f")) == data);
    struct stat st {};
    REQUIRE(::stat(m.at("f").c_str(), &st) == 0);
    CHECK(st.st_size == static_cast<off_t>(data.size()));

    // An existing file emptied by its open: straight, a new version, and what it
    // replaced kept in the history.
    Fd t(::open(m.at("old").c_str(), O_WRONLY | O_TRUNC));
    REQUIRE(t.fd >= 0);
    REQUIRE(pwrite_all(t.fd, "the new content\n"));
    t.close();
    CHECK(slurp(m.at("old")) == "the new content\n");
    CHECK(eventually([&] { return key_version(broker.endpoint(), "old") > old_version; }));
    std::string kept;
    CHECK(sh(gate_binary() + " show --history-dir '" + m.history_dir() + "' '" + m.at("old") + "@" +
                 std::to_string(old_version) + "'",
             &kept, 20s) == 0);
    CHECK(kept == "the old content\n");

    const Through after = through(m);
    CHECK(after.opens == before.opens + 5);  // three writers, two readers
    CHECK(after.files == 2);  // registered for the next open
    CHECK(after.writes == before.writes);

    // Nothing keeps a file written straight open for writing once its handle is
    // released: it runs, in the directory too (no ETXTBSY).
    write_file(m.at("run.sh"), "#!/bin/sh\necho ran\n");
    REQUIRE(::chmod(m.at("run.sh").c_str(), 0755) == 0);
    std::string out;
    CHECK(eventually([&] { return sh(m.in_root("run.sh"), &out, 20s) == 0; }, 5s));
    CHECK(out == "ran\n");
    CHECK(sh(m.at("run.sh"), &out, 20s) == 0);
    CHECK(out == "ran\n");

    // A writer that only changes part of a file keeps going through the daemon (its
    // first write keeps the content it replaces).
    Fd p(::open(m.at("old").c_str(), O_WRONLY));
    REQUIRE(p.fd >= 0);
    REQUIRE(pwrite_all(p.fd, "THE"));
    p.close();
    CHECK(slurp(m.in_root("old")) == "THE new content\n");
    CHECK(through(m).writes > after.writes);
  }
}

TEST_CASE("a writer let in beside a reader that reads straight is seen through its mapping too",
          "[mount][passthrough]") {
  // With GATE_RELEASE_ON_FLUSH=1 a reader's lock goes at its first close while a
  // duplicate keeps the file open: the writer let in then shares the file with a
  // handle that reads straight. Its writes go through the daemon, but a shared
  // mapping writes to the file below: the release still sees the change.
  BrokerProcess broker;
  ScopedEnv flush("GATE_RELEASE_ON_FLUSH", "1");
  Mount m(broker.endpoint());
  if (!kernel_passthrough_expected()) {
    CHECK(through(m).state == "off");
    return;
  }
  const std::string v1 = random_bytes(64 * 1024, 6);
  write_file(m.at("f"), v1);
  REQUIRE(eventually([&] { return key_version(broker.endpoint(), "f") > 0; }));
  const std::uint64_t version = key_version(broker.endpoint(), "f");
  REQUIRE(all_released(m));  // else the reader below would go through the cache
  const Through before = through(m);

  Fd r(::open(m.at("f").c_str(), O_RDONLY));
  REQUIRE(r.fd >= 0);
  Fd keep(::dup(r.fd));
  // The flush gives the read lock back (and has nothing to write out); `keep` holds
  // the file open.
  REQUIRE(::close(std::exchange(r.fd, -1)) == 0);
  REQUIRE(eventually([&] { return key_state(broker.endpoint(), "f").holders.empty(); }));

  Fd w(::open(m.at("f").c_str(), O_RDWR));
  REQUIRE(w.fd >= 0);
  void* map = ::mmap(nullptr, v1.size(), PROT_READ | PROT_WRITE, MAP_SHARED, w.fd, 0);
  REQUIRE(map != MAP_FAILED);
  CHECK(std::memcmp(map, v1.data(), v1.size()) == 0);
  std::memcpy(map, "mapped!", 7);
  REQUIRE(::msync(map, v1.size(), MS_SYNC) == 0);
  ::munmap(map, v1.size());
  CHECK(pread_all(keep.fd, 7) == "mapped!");
  w.close();
  keep.close();

  const std::string v2 = "mapped!" + v1.substr(7);
  CHECK(slurp(m.in_root("f")) == v2);
  CHECK(eventually([&] { return key_version(broker.endpoint(), "f") > version; }));
  const Through after = through(m);
  CHECK(after.opens == before.opens + 1);  // the reader; the writer went direct
  // What the mapping replaced is in the history.
  std::string kept;
  CHECK(sh(gate_binary() + " show --history-dir '" + m.history_dir() + "' '" + m.at("f") + "@" +
               std::to_string(version) + "'",
           &kept, 20s) == 0);
  CHECK(kept == v1);
}
