#include "mount/inode_table.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

namespace gate::mount {

Inode::~Inode() {
  if (fd >= 0) ::close(fd);
}

InodeTable::InodeTable(int root_fd, const struct stat& root_st) {
  root_.fd = root_fd;
  root_.src_ino = root_st.st_ino;
  root_.src_dev = root_st.st_dev;
  root_.nlookup = 1;
}

std::size_t InodeTable::size() const {
  std::lock_guard lock(m_);
  return inodes_.size();
}

int InodeTable::lookup(Inode& parent, const char* name, struct stat* st, Inode** out) {
  int fd = ::openat(parent.fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno;
  if (::fstatat(fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
    int err = errno;
    ::close(fd);
    return err;
  }
  if (st->st_ino == root_.src_ino && st->st_dev == root_.src_dev) {
    // The root seen again (a bind mount inside itself): never give it a parent.
    ::close(fd);
    std::lock_guard lock(m_);
    ++root_.nlookup;
    *out = &root_;
    return 0;
  }
  std::unique_lock lock(m_);
  auto& slot = inodes_[{st->st_ino, st->st_dev}];
  if (!slot) {
    slot = std::make_unique<Inode>();
    slot->fd = fd;
    slot->src_ino = st->st_ino;
    slot->src_dev = st->st_dev;
    fd = -1;
  }
  Inode& inode = *slot;
  ++inode.nlookup;
  set_name(inode, &parent, name);
  lock.unlock();
  if (fd >= 0) ::close(fd);
  *out = &inode;
  return 0;
}

void InodeTable::forget(Inode& inode, std::uint64_t n) {
  std::lock_guard lock(m_);
  inode.nlookup -= std::min(n, inode.nlookup);
  erase_unused(&inode);
}

void InodeTable::set_name(Inode& inode, Inode* parent, const std::string& name) {
  if (&inode == &root_) return;
  // A directory renamed under its own descendant would make a loop; keep the old
  // name then (the rename itself fails with EINVAL anyway).
  for (Inode* p = parent; p; p = p->parent)
    if (p == &inode) return;
  Inode* old = inode.parent;
  if (old != parent) {
    if (parent) ++parent->children;
    inode.parent = parent;
  }
  inode.name = name;
  if (old && old != parent) {
    --old->children;
    erase_unused(old);
  }
}

void InodeTable::erase_unused(Inode* inode) {
  while (inode && inode != &root_ && inode->nlookup == 0 && inode->children == 0) {
    Inode* parent = inode->parent;
    inodes_.erase({inode->src_ino, inode->src_dev});
    if (parent) --parent->children;
    inode = parent;
  }
}

std::string InodeTable::key_locked(const Inode& inode) const {
  if (&inode == &root_) return ".";
  std::vector<const std::string*> names;
  for (const Inode* p = &inode; p && p != &root_; p = p->parent) names.push_back(&p->name);
  std::string key;
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    if (!key.empty()) key += '/';
    key += **it;
  }
  return key;
}

std::string InodeTable::key_of(const Inode& inode) const {
  std::lock_guard lock(m_);
  return key_locked(inode);
}

std::string InodeTable::child_key(const Inode& parent, std::string_view name) const {
  std::lock_guard lock(m_);
  if (&parent == &root_) return std::string(name);
  std::string key = key_locked(parent);
  key += '/';
  key += name;
  return key;
}

fuse_ino_t InodeTable::find(ino_t ino, dev_t dev) const {
  std::lock_guard lock(m_);
  auto it = inodes_.find({ino, dev});
  return it == inodes_.end() ? 0 : reinterpret_cast<fuse_ino_t>(it->second.get());
}

void InodeTable::moved(ino_t ino, dev_t dev, Inode& parent, const std::string& name) {
  std::lock_guard lock(m_);
  auto it = inodes_.find({ino, dev});
  if (it == inodes_.end()) return;
  set_name(*it->second, &parent, name);
}

}  // namespace gate::mount
