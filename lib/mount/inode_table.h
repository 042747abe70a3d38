#pragma once
// InodeTable: the inodes the kernel knows about, keyed by (st_ino, st_dev) of the
// file in the source directory. Each holds an O_PATH fd, so every operation works
// on the object itself ("*at" calls, never a path string through a symlink), and
// the name it was last seen under (parent inode + name), from which the lock key
// (path relative to the root, "." for the root) is built. An inode stays while the
// kernel remembers it (nlookup) or another inode names it as its parent.
#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 312
#endif
#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdint>
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

  // A merge was renamed over this file (GateFs::Impl::install_merge): until the
  // kernel looks the name up again, calls on it act on the file now at its name.
  std::atomic<bool> superseded{false};
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

 private:
  struct IdHash {
    std::size_t operator()(const std::pair<ino_t, dev_t>& id) const {
      return std::hash<ino_t>{}(id.first) * 31 + std::hash<dev_t>{}(id.second);
    }
  };
  void set_name(Inode& inode, Inode* parent, const std::string& name);  // m_ held
  void erase_unused(Inode* inode);                                       // m_ held
  std::string key_locked(const Inode& inode) const;                      // m_ held

  mutable std::mutex m_;
  Inode root_;
  std::unordered_map<std::pair<ino_t, dev_t>, std::unique_ptr<Inode>, IdHash> inodes_;
};

}  // namespace gate::mount
