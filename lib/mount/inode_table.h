#pragma once
// InodeTable: the inodes the kernel knows about, keyed by (st_ino, st_dev) of the
// file in the source directory. Each holds an O_PATH fd, so every operation works
// on the object itself ("*at" calls, never a path string through a symlink), and
// the name it was last seen under (parent inode + name), from which the lock key
// (path relative to the root, "." for the root) is built. An inode stays while the
// kernel remembers it (nlookup) or another inode names it as its parent. Every
// directory in the table may be watched (DirWatcher) while it is there.
#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312
#endif
#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace gate::mount {

struct Inode {
  Inode() = default;
  Inode(const Inode&) = delete;
  Inode& operator=(const Inode&) = delete;
  ~Inode();

  int fd = -1;  // O_PATH | O_NOFOLLOW, owned
  ino_t src_ino = 0;
  dev_t src_dev = 0;

  // Guarded by the table's mutex.
  std::uint64_t nlookup = 0;
  std::uint64_t children = 0;  // inodes whose `parent` is this one
  Inode* parent = nullptr;
  std::string name;

  int watch = -1;  // the DirWatcher's id for a directory, guarded by the table's mutex
  // Handles of the mount open for writing on this file: what changes it meanwhile is
  // (under the write lock) written through the kernel, whose cache is then right.
  std::atomic<int> writers{0};

  // A merge was renamed over this file (GateFs::Impl::install_merge): until the
  // kernel looks the name up again, calls on it act on the file now at its name.
  std::atomic<bool> superseded{false};

  // What the kernel's page cache of this file was filled from, so that an open may
  // keep it (GateFs::Impl::keep_cache_at_open). Guarded by cache_m.
  std::mutex cache_m;
  struct Stamp {
    bool valid = false;
    off_t size = 0;
    timespec mtime{}, ctime{};
    std::uint64_t version = 0;  // the key's version at the broker (0 without locking)
  } stamp;

  // How the kernel reads and writes the file's open handles (GateFs::Impl::choose_io):
  // `through` of them straight from the file below (FUSE passthrough, all with
  // `backing_id`), `cached` of them through the page cache. The kernel refuses both
  // at once. `backing_id`: the file is registered with the kernel for passthrough (0:
  // not), from its first open that went straight until the inode leaves the table.
  // Guarded by io_m.
  std::mutex io_m;
  int backing_id = 0;
  int through = 0;
  int cached = 0;
};

// Watches the directories of a table (SourceWatch): add() answers an id or -1, and the
// table calls remove() with it when the directory leaves. Both run under the table's
// mutex, so they must not call back into the table.
class DirWatcher {
 public:
  virtual ~DirWatcher() = default;
  virtual int add(int dir_fd, ino_t ino, dev_t dev) = 0;
  virtual void remove(int id) = 0;
};

// The table's view of one name in a directory, for telling the kernel about a change
// made beside the mount: `parent` the directory's id (0: the kernel does not know it),
// `named` the id of the object the table last saw under that name (0: none), and
// whether that object is still what the name leads to in the source.
struct NameSeen {
  fuse_ino_t parent = 0;
  fuse_ino_t named = 0;
  bool still_there = false;
  struct stat now {};    // still_there: the object now
  Inode::Stamp stamp;    // still_there: what the kernel's cache of it was filled from
  int writers = 0;       // still_there: Inode::writers
};

class InodeTable {
 public:
  // Takes ownership of root_fd (O_PATH on the source directory).
  InodeTable(int root_fd, const struct stat& root_st);
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;

  Inode& root() { return root_; }
  Inode& get(fuse_ino_t ino) {
    return ino == FUSE_ROOT_ID ? root_ : *reinterpret_cast<Inode*>(ino);
  }
  fuse_ino_t id(Inode& inode) {
    return &inode == &root_ ? FUSE_ROOT_ID : reinterpret_cast<fuse_ino_t>(&inode);
  }

  // Finds `name` in `parent` without following a symlink; fills *st and returns 0
  // with *out's lookup count raised by one, or an errno.
  int lookup(Inode& parent, const char* name, struct stat* st, Inode** out);
  void forget(Inode& inode, std::uint64_t n);

  // The lock key: "a/b/c", or "." for the root.
  std::string key_of(const Inode& inode) const;
  std::string child_key(const Inode& parent, std::string_view name) const;

  // After a rename: the object (ino, dev) is now `name` in `parent`.
  void moved(ino_t ino, dev_t dev, Inode& parent, const std::string& name);

  std::size_t size() const;
  // The id the kernel knows the object (ino, dev) by; 0 when it knows none. Only
  // for notifications: the inode may be forgotten right after.
  fuse_ino_t find(ino_t ino, dev_t dev) const;
  // `name` in the directory (dir_ino, dir_dev), as the table last saw it and as the
  // source has it now (ids only for notifications, as find()).
  NameSeen seen(ino_t dir_ino, dev_t dir_dev, const std::string& name) const;
  // Every name the table knows (parent id, name, object id), and every directory or
  // file id: after lost change events, all of it is told to the kernel again.
  void for_each(const std::function<void(fuse_ino_t parent, const std::string& name,
                                         fuse_ino_t id)>& fn) const;

  // Directories get watched from now on (the root at once); null: none. Call before
  // serving requests.
  void set_watcher(DirWatcher* watcher);
  // Called with an inode's Inode::backing_id when it leaves the table (under the
  // table's mutex: it must not call back into the table). Call before serving requests.
  void set_backing_closer(std::function<void(int backing_id)> closer) { close_backing_ = std::move(closer); }

 private:
  struct IdHash {
    std::size_t operator()(const std::pair<ino_t, dev_t>& id) const {
      return std::hash<ino_t>{}(id.first) * 31 + std::hash<dev_t>{}(id.second);
    }
  };
  struct NameHash {
    std::size_t operator()(const std::pair<const Inode*, std::string>& n) const {
      return std::hash<const void*>{}(n.first) * 31 + std::hash<std::string>{}(n.second);
    }
  };
  void set_name(Inode& inode, Inode* parent, const std::string& name);  // m_ held
  void erase_unused(Inode* inode);                                       // m_ held
  std::string key_locked(const Inode& inode) const;                      // m_ held
  fuse_ino_t id_locked(const Inode* inode) const {
    return inode == &root_ ? FUSE_ROOT_ID : reinterpret_cast<fuse_ino_t>(inode);
  }

  mutable std::mutex m_;
  Inode root_;
  std::unordered_map<std::pair<ino_t, dev_t>, std::unique_ptr<Inode>, IdHash> inodes_;
  // (parent, name) -> the inode last seen there: the names the kernel may hold.
  std::unordered_map<std::pair<const Inode*, std::string>, Inode*, NameHash> names_;
  DirWatcher* watcher_ = nullptr;
  std::function<void(int)> close_backing_;
};

}  // namespace gate::mount
