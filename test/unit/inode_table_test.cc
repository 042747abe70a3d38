// InodeTable on a real directory: lookups, keys, renames and forgetting.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cstdio>
#include <string>
#include <vector>

#include "mount/inode_table.h"
#include "support/test_support.h"

using namespace gate::mount;
using gate::test::TempDir;

namespace {

struct Table {
  TempDir dir{"gate-inodes"};
  std::unique_ptr<InodeTable> table;
  Table() {
    int fd = ::open(dir.path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    struct stat st {};
    REQUIRE(::fstat(fd, &st) == 0);
    table = std::make_unique<InodeTable>(fd, st);
  }
  std::string path(const std::string& rel) const { return dir.path() + "/" + rel; }
  Inode& look(Inode& parent, const char* name) {
    struct stat st {};
    Inode* out = nullptr;
    REQUIRE(table->lookup(parent, name, &st, &out) == 0);
    return *out;
  }
};

void touch(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  REQUIRE(f);
  std::fclose(f);
}

}  // namespace

TEST_CASE("inode table: keys are paths from the root, the root is '.'", "[unit][inodes]") {
  Table t;
  REQUIRE(::mkdir(t.path("a").c_str(), 0755) == 0);
  REQUIRE(::mkdir(t.path("a/b").c_str(), 0755) == 0);
  touch(t.path("a/b/c.txt"));
  Inode& a = t.look(t.table->root(), "a");
  Inode& b = t.look(a, "b");
  Inode& c = t.look(b, "c.txt");
  CHECK(t.table->key_of(t.table->root()) == ".");
  CHECK(t.table->key_of(c) == "a/b/c.txt");
  CHECK(t.table->child_key(b, "new") == "a/b/new");
  CHECK(t.table->child_key(t.table->root(), "top") == "top");
  // One object, one inode: a second lookup finds the same one.
  CHECK(&t.look(b, "c.txt") == &c);
  CHECK(t.table->size() == 3);
}

TEST_CASE("inode table: a lookup of a missing name, or through a symlink, fails cleanly",
          "[unit][inodes]") {
  Table t;
  struct stat st {};
  Inode* out = nullptr;
  CHECK(t.table->lookup(t.table->root(), "missing", &st, &out) == ENOENT);
  REQUIRE(::symlink("/etc", t.path("out").c_str()) == 0);
  Inode& link = t.look(t.table->root(), "out");
  CHECK(t.table->key_of(link) == "out");
  struct stat through {};
  CHECK(t.table->lookup(link, "passwd", &through, &out) != 0);  // never follows the link
}

TEST_CASE("inode table: a rename moves the key of the object and of what is under it",
          "[unit][inodes]") {
  Table t;
  REQUIRE(::mkdir(t.path("d").c_str(), 0755) == 0);
  REQUIRE(::mkdir(t.path("e").c_str(), 0755) == 0);
  touch(t.path("d/f"));
  Inode& d = t.look(t.table->root(), "d");
  Inode& e = t.look(t.table->root(), "e");
  Inode& f = t.look(d, "f");
  struct stat st {};
  REQUIRE(::stat(t.path("d").c_str(), &st) == 0);
  REQUIRE(::rename(t.path("d").c_str(), t.path("e/moved").c_str()) == 0);
  t.table->moved(st.st_ino, st.st_dev, e, "moved");
  CHECK(t.table->key_of(d) == "e/moved");
  CHECK(t.table->key_of(f) == "e/moved/f");
}

TEST_CASE("inode table: forgotten inodes go, parents stay while children need them",
          "[unit][inodes]") {
  Table t;
  REQUIRE(::mkdir(t.path("d").c_str(), 0755) == 0);
  touch(t.path("d/f"));
  Inode& d = t.look(t.table->root(), "d");
  Inode& f = t.look(d, "f");
  CHECK(t.table->size() == 2);
  t.table->forget(d, 1);  // the kernel forgot d, but f still names it as parent
  CHECK(t.table->size() == 2);
  CHECK(t.table->key_of(f) == "d/f");
  t.table->forget(f, 1);  // now both go
  CHECK(t.table->size() == 0);
  // Forgetting the root never drops it.
  t.table->forget(t.table->root(), 5);
  CHECK(t.table->key_of(t.table->root()) == ".");
}

TEST_CASE("inode table: what a name leads to, as last seen and as the source has it now",
          "[unit][inodes]") {
  Table t;
  REQUIRE(::mkdir(t.path("d").c_str(), 0755) == 0);
  touch(t.path("d/f"));
  struct stat root_st {}, d_st {};
  REQUIRE(::stat(t.dir.path().c_str(), &root_st) == 0);
  REQUIRE(::stat(t.path("d").c_str(), &d_st) == 0);
  Inode& d = t.look(t.table->root(), "d");
  Inode& f = t.look(d, "f");

  NameSeen seen = t.table->seen(d_st.st_ino, d_st.st_dev, "f");
  CHECK(seen.parent == t.table->id(d));
  CHECK(seen.named == t.table->id(f));
  CHECK(seen.still_there);
  CHECK(t.table->seen(root_st.st_ino, root_st.st_dev, "d").parent == FUSE_ROOT_ID);
  CHECK(t.table->seen(d_st.st_ino, d_st.st_dev, "never-seen").named == 0);

  // Replaced beside the table: the name now leads to another object.
  touch(t.path("d/g"));
  REQUIRE(::rename(t.path("d/g").c_str(), t.path("d/f").c_str()) == 0);
  seen = t.table->seen(d_st.st_ino, d_st.st_dev, "f");
  CHECK(seen.named == t.table->id(f));
  CHECK_FALSE(seen.still_there);

  // Looked up again: the name is the new object's, the old one keeps no name there.
  Inode& g = t.look(d, "f");
  CHECK(&g != &f);
  seen = t.table->seen(d_st.st_ino, d_st.st_dev, "f");
  CHECK(seen.named == t.table->id(g));
  CHECK(seen.still_there);
}

TEST_CASE("inode table: directories are watched while the table holds them", "[unit][inodes]") {
  struct Recorder : DirWatcher {
    int next = 1;
    std::vector<int> added, removed;
    int add(int, ino_t, dev_t) override {
      added.push_back(next);
      return next++;
    }
    void remove(int id) override { removed.push_back(id); }
  } watcher;
  Table t;
  REQUIRE(::mkdir(t.path("d").c_str(), 0755) == 0);
  touch(t.path("file"));
  t.table->set_watcher(&watcher);
  CHECK(watcher.added == std::vector<int>{1});  // the root
  Inode& d = t.look(t.table->root(), "d");
  t.look(t.table->root(), "file");  // a file is not watched
  CHECK(watcher.added == std::vector<int>{1, 2});
  CHECK(d.watch == 2);
  t.table->forget(d, 1);
  CHECK(watcher.removed == std::vector<int>{2});
  t.table->set_watcher(nullptr);
}
