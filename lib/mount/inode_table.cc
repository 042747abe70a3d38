#include "mount/inode_table.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <tuple>
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
    if (watcher_ && S_ISDIR(st->st_mode)) slot->watch = watcher_->add(fd, st->st_ino, st->st_dev);
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
  if (old) {
    auto it = names_.find({old, inode.name});
    if (it != names_.end() && it->second == &inode) names_.erase(it);
  }
  if (old != parent) {
    if (parent) ++parent->children;
    inode.parent = parent;
  }
  inode.name = name;
  if (parent) names_[{parent, name}] = &inode;
  if (old && old != parent) {
    --old->children;
    erase_unused(old);
  }
}

void InodeTable::erase_unused(Inode* inode) {
  while (inode && inode != &root_ && inode->nlookup == 0 && inode->children == 0) {
    Inode* parent = inode->parent;
    if (parent) {
      auto it = names_.find({parent, inode->name});
      if (it != names_.end() && it->second == inode) names_.erase(it);
    }
    if (watcher_ && inode->watch >= 0) watcher_->remove(inode->watch);
    if (close_backing_) {
      // The kernel forgot it, so no handle of it is open, and no open comes.
      std::lock_guard io(inode->io_m);
      if (inode->backing_id > 0) close_backing_(inode->backing_id);
    }
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

NameSeen InodeTable::seen(ino_t dir_ino, dev_t dir_dev, const std::string& name) const {
  std::lock_guard lock(m_);
  const Inode* dir = nullptr;
  if (dir_ino == root_.src_ino && dir_dev == root_.src_dev) {
    dir = &root_;
  } else {
    auto it = inodes_.find({dir_ino, dir_dev});
    if (it == inodes_.end()) return {};
    dir = it->second.get();
  }
  NameSeen seen{.parent = id_locked(dir)};
  auto named = names_.find({dir, name});
  if (named != names_.end()) {
    Inode& inode = *named->second;
    seen.named = id_locked(&inode);
    struct stat& now = seen.now;
    seen.still_there = ::fstatat(dir->fd, name.c_str(), &now, AT_SYMLINK_NOFOLLOW) == 0 &&
                       now.st_ino == inode.src_ino && now.st_dev == inode.src_dev;
    if (seen.still_there) {
      seen.writers = inode.writers.load();
      std::lock_guard stamp_lock(inode.cache_m);
      seen.stamp = inode.stamp;
    }
  }
  return seen;
}

void InodeTable::for_each(
    const std::function<void(fuse_ino_t parent, const std::string& name, fuse_ino_t id)>& fn) const {
  std::vector<std::tuple<fuse_ino_t, std::string, fuse_ino_t>> all;
  {
    std::lock_guard lock(m_);
    all.emplace_back(0, std::string(), FUSE_ROOT_ID);
    for (const auto& [id, inode] : inodes_)
      all.emplace_back(inode->parent ? id_locked(inode->parent) : 0, inode->name, id_locked(inode.get()));
  }
  for (const auto& [parent, name, id] : all) fn(parent, name, id);
}

void InodeTable::set_watcher(DirWatcher* watcher) {
  std::lock_guard lock(m_);
  watcher_ = watcher;
  if (watcher_) root_.watch = watcher_->add(root_.fd, root_.src_ino, root_.src_dev);
}

void InodeTable::moved(ino_t ino, dev_t dev, Inode& parent, const std::string& name) {
  std::lock_guard lock(m_);
  auto it = inodes_.find({ino, dev});
  if (it == inodes_.end()) return;
  set_name(*it->second, &parent, name);
}

}  // namespace gate::mount
