// The calls that take broker locks: open, create, and every change of names or
// attributes. Each asks lock_policy for its plan and runs one step under it.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/fs.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "core/files.h"
#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

int GateFs::Impl::apply_setattr(int at, const struct stat& a, int valid, int fd) {
  const std::string proc = proc_path(at);
  if (valid & FUSE_SET_ATTR_MODE) {
    int r = fd >= 0 ? ::fchmod(fd, a.st_mode) : ::chmod(proc.c_str(), a.st_mode);
    if (r < 0) return errno;
  }
  if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    uid_t uid = (valid & FUSE_SET_ATTR_UID) ? a.st_uid : static_cast<uid_t>(-1);
    gid_t gid = (valid & FUSE_SET_ATTR_GID) ? a.st_gid : static_cast<gid_t>(-1);
    if (::fchownat(at, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) return errno;
  }
  if (valid & FUSE_SET_ATTR_SIZE) {
    int r = fd >= 0 ? ::ftruncate(fd, a.st_size) : ::truncate(proc.c_str(), a.st_size);
    if (r < 0) return errno;
  }
  if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
    struct timespec tv[2];
    tv[0].tv_sec = tv[1].tv_sec = 0;
    tv[0].tv_nsec = tv[1].tv_nsec = UTIME_OMIT;
    if (valid & FUSE_SET_ATTR_ATIME_NOW) tv[0].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_ATIME) tv[0] = a.st_atim;
    if (valid & FUSE_SET_ATTR_MTIME_NOW) tv[1].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_MTIME) tv[1] = a.st_mtim;
    int r = fd >= 0 ? ::futimens(fd, tv) : ::utimensat(AT_FDCWD, proc.c_str(), tv, 0);
    if (r < 0) return errno;
  }
  return 0;
}

AttrChange GateFs::Impl::attr_change(int valid) {
  if (valid & FUSE_SET_ATTR_SIZE) return AttrChange::Size;
  if (valid & FUSE_SET_ATTR_MODE) return AttrChange::Mode;
  if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) return AttrChange::Owner;
  return AttrChange::Times;
}

void GateFs::Impl::setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi) {
  Inode& in = inode(ino);
  // A handle stays until its release, which the kernel sends only after this call.
  FileHandle* h = fi ? file_of(fi) : nullptr;
  const int fd = h ? h->fd.load() : -1;
  const struct stat a = *attr;
  const LockPlan plan =
      plan_locks({.op = FsOp::Setattr, .key = h ? h->key : inodes->key_of(in), .attr = attr_change(valid)});
  run_locked(req, plan, h,
             {[this, &in, a, valid, fd, key = plan.locks.front().key](std::vector<HeldLock>& held) {
                UniqueFd hold;
                const int at = live_fd(in, hold);
                if (valid & FUSE_SET_ATTR_SIZE)
                  keep_before_change(key, version_in(held, key), fd >= 0 ? fd : at);
                return apply_setattr(at, a, valid, fd);
              },
              [this, req, &in, fd](int err) {
                UniqueFd hold;
                if (err) fuse_reply_err(req, err);
                else reply_attr(req, fd >= 0 ? fd : live_fd(in, hold));
              }});
}

void GateFs::Impl::make_node(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev,
               const char* link) {
  Inode& p = inode(parent);
  const std::string nm = name, target = link ? link : "";
  const fuse_ctx* ctx = fuse_req_ctx(req);
  const uid_t uid = ctx->uid;
  const gid_t gid = ctx->gid;
  const FsOp op = link ? FsOp::Symlink : S_ISDIR(mode) ? FsOp::Mkdir : FsOp::Mknod;
  const LockPlan plan =
      plan_locks({.op = op, .key = inodes->child_key(p, nm), .symlink_target = target});
  run_locked(req, plan, nullptr,
             new_entry(req, p, nm, [this, &p, nm, op, mode, rdev, target, uid, gid] {
               int r = op == FsOp::Symlink ? ::symlinkat(target.c_str(), p.fd, nm.c_str())
                       : op == FsOp::Mkdir ? ::mkdirat(p.fd, nm.c_str(), mode & 07777)
                                           : ::mknodat(p.fd, nm.c_str(), mode, rdev);
               if (r < 0) return errno;
               give_to_caller(p.fd, nm, -1, uid, gid);
               return 0;
             }));
}

void GateFs::Impl::remove(fuse_req_t req, fuse_ino_t parent, const char* name, int flags) {
  Inode& p = inode(parent);
  const std::string nm = name;
  const FsOp op = (flags & AT_REMOVEDIR) ? FsOp::Rmdir : FsOp::Unlink;
  const std::string key = inodes->child_key(p, nm);
  run_locked(req, plan_locks({.op = op, .key = key}), nullptr,
             {[this, &p, nm, flags, key](std::vector<HeldLock>& held) {
                if (!(flags & AT_REMOVEDIR)) keep_named(key, version_in(held, key), p.fd, nm);
                return ::unlinkat(p.fd, nm.c_str(), flags) < 0 ? errno : 0;
              },
              [req](int err) { fuse_reply_err(req, err); }});
}

int GateFs::Impl::rename_at(Inode& p, const std::string& nm, Inode& np, const std::string& nn, unsigned flags) {
  struct stat src {}, dst {};
  bool have_src = ::fstatat(p.fd, nm.c_str(), &src, AT_SYMLINK_NOFOLLOW) == 0;
  bool have_dst = (flags & RENAME_EXCHANGE) &&
                  ::fstatat(np.fd, nn.c_str(), &dst, AT_SYMLINK_NOFOLLOW) == 0;
  if (::renameat2(p.fd, nm.c_str(), np.fd, nn.c_str(), flags) < 0) return errno;
  if (have_src) inodes->moved(src.st_ino, src.st_dev, np, nn);
  if (have_dst) inodes->moved(dst.st_ino, dst.st_dev, p, nm);
  return 0;
}

void GateFs::Impl::rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
            const char* newname, unsigned int flags) {
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) {
    fuse_reply_err(req, EINVAL);
    return;
  }
  Inode& p = inode(parent);
  Inode& np = inode(newparent);
  const std::string nm = name, nn = newname, target = inodes->child_key(np, nn);
  const LockPlan plan =
      plan_locks({.op = FsOp::Rename, .key = inodes->child_key(p, nm), .second = target});
  const Caller who = callers.resolve(fuse_req_ctx(req)->pid);
  // A stale replacement's merge renamed over the target in the rename's stead.
  auto merged = std::make_shared<Installed>();
  run_locked(req, plan, nullptr,
             {[this, &p, &np, nm, nn, flags, target, who, merged](std::vector<HeldLock>& held) {
                const std::uint64_t version = version_in(held, target);
                if (!(flags & RENAME_EXCHANGE) && held.size() > 1) {
                  // A rename onto an existing file replaces it (temp file + rename saves).
                  if (int err = settle_stale_rename(who, p, nm, np, nn, target, held, merged.get()))
                    return err;
                  if (merged->file) return 0;
                } else {
                  keep_named(target, version, np.fd, nn);
                }
                return rename_at(p, nm, np, nn, flags);
              },
              [this, req, merged](int err) {
                fuse_reply_err(req, err);
                // The kernel moves its entry to the name when this rename returns (it
                // holds the directory's lock until then; this waits for it).
                if (merged->file) forget_name(*merged);
              }},
             &who);
}

void GateFs::Impl::link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
  Inode& in = inode(ino);
  Inode& np = inode(newparent);
  const std::string nn = newname;
  const LockPlan plan = plan_locks(
      {.op = FsOp::Link, .key = inodes->key_of(in), .second = inodes->child_key(np, nn)});
  run_locked(req, plan, nullptr, new_entry(req, np, nn, [&in, &np, nn] {
               return ::linkat(AT_FDCWD, proc_path(in.fd).c_str(), np.fd, nn.c_str(),
                               AT_SYMLINK_FOLLOW) < 0
                          ? errno
                          : 0;
             }));
}

int GateFs::Impl::adopt(Opening& o, int fd, std::vector<HeldLock>& held, bool deferred) {
  if (fd < 0 && !deferred) {
    int err = errno;
    log_fd_exhaustion(err);
    return err;
  }
  auto* h = new FileHandle;
  h->fd = deferred ? -1 : fd;
  h->key = o.key;
  // Created, or truncated on open (O_TRUNC): changed before any write.
  h->changed = o.created || (o.f.flags & O_TRUNC) != 0;
  {
    std::lock_guard guard(open_files_mu);
    open_files.insert(h);
  }
  h->who = o.who;
  h->created = o.created;
  h->ino = o.created ? o.entry.ino : o.ino;
  h->redirected = o.redirected;
  if ((o.f.flags & O_ACCMODE) != O_RDONLY && !o.redirected && h->ino) {
    h->writer = true;
    ++inode(h->ino).writers;
  }
  h->stale_reads = std::move(o.stale_reads);
  h->theirs = std::move(o.theirs);
  if (!held.empty()) h->version = held.front().version;
  const int access = o.f.flags & O_ACCMODE;
  if (!held.empty() && !o.created && !(o.f.flags & O_TRUNC) && (access == O_RDONLY || access == O_RDWR))
    note_read(o.who, o.key, h->version);
  // Truncated on open: what it held was kept before (see open()).
  if (o.f.flags & O_TRUNC) std::call_once(h->kept, [] {});
  if (agent && !held.empty()) h->lock = agent->track(held.front(), o.who.tid);
  held.clear();
  o.h = h;
  return 0;
}

int GateFs::Impl::live_fd(Inode& in, UniqueFd& hold) {
  if (!in.superseded.load(std::memory_order_relaxed)) return in.fd;
  struct stat now {};
  const int fd = file_now_named(in, inodes->key_of(in), &now);
  if (fd < 0) return in.fd;
  hold.reset(fd);
  return fd;
}

int GateFs::Impl::open_beneath_root(const std::string& key, int flags) {
  // Still under the root, through no symlink: what the daemon opens never leaves it.
  auto open_beneath = [](int dir, const std::string& path, int how_flags) {
    struct open_how how {};
    how.flags = static_cast<std::uint64_t>(how_flags);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    return static_cast<int>(::syscall(SYS_openat2, dir, path.c_str(), &how, sizeof how));
  };
  // A key longer than one call takes (PATH_MAX) is walked in pieces, each beneath
  // the directory the last one opened.
  UniqueFd dir;
  std::size_t at = 0;
  while (key.size() - at >= PATH_MAX) {
    const std::size_t cut = key.rfind('/', at + PATH_MAX - 1);
    if (cut == std::string::npos || cut <= at) return errno = ENAMETOOLONG, -1;
    dir.reset(open_beneath(dir ? dir.get() : inodes->root().fd, key.substr(at, cut - at),
                           O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!dir) return -1;
    at = cut + 1;
  }
  return open_beneath(dir ? dir.get() : inodes->root().fd, key.substr(at), flags);
}

int GateFs::Impl::file_now_named(Inode& in, const std::string& key, struct stat* now) {
  struct stat& st = *now;
  if (::fstat(in.fd, &st) != 0 || st.st_nlink != 0 || !S_ISREG(st.st_mode)) return -1;
  const int fd = open_beneath_root(key, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -2;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return -2;
  }
  return fd;
}

// O_DIRECT is the caller's and is kept by the kernel (direct_io, below): its data never
// sits in the mount's page cache. The file below is opened without it, since FUSE hands
// the data over in buffers that O_DIRECT's alignment rules would refuse (EINVAL).
constexpr int kCallerOnlyFlags = O_DIRECT;

void GateFs::Impl::reply_open(fuse_req_t req, Opening& o, int err, bool created) {
  if (err) {
    fuse_reply_err(req, err);
    return;
  }
  o.f.fh = reinterpret_cast<uint64_t>(o.h);
  o.f.keep_cache = o.keep_cache;
  if (o.f.flags & O_DIRECT) o.f.direct_io = 1;
  // A flush has nothing to do (the data is in the source already), unless it gives
  // the lock back.
  o.f.noflush = !opts.release_on_flush;
  int r;
  if (o.h->io == FileHandle::Io::Through) {
    Passthrough::ReplyThrough through(o.backing_id);
    r = created ? fuse_reply_create(req, &o.entry, &o.f) : fuse_reply_open(req, &o.f);
  } else {
    r = created ? fuse_reply_create(req, &o.entry, &o.f) : fuse_reply_open(req, &o.f);
  }
  if (r != 0) {
    log(LogLevel::Debug, "mount", "open of ", o.key, " was abandoned by pid ", o.who.tid);
    close_handle(o.h);
    if (created) inodes->forget(inode(o.entry.ino), 1);
  }
}

void GateFs::Impl::open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& in = inode(ino);
  auto o = std::make_shared<Opening>(
      Opening{*fi, inodes->key_of(in), callers.resolve(fuse_req_ctx(req)->pid)});
  o->ino = ino;
  run_locked(req, plan_locks({.op = FsOp::Open, .key = o->key, .open_flags = fi->flags}), nullptr,
             {[this, &in, o](std::vector<HeldLock>& held) {
                int flags = o->f.flags & ~(O_NOFOLLOW | O_CREAT | O_EXCL | O_NOCTTY | kCallerOnlyFlags);
                struct stat now {};
                const int replacement = held.empty() ? -1 : file_now_named(in, o->key, &now);
                if (replacement == -2) return ESTALE;
                // file_now_named() stat'ed the file (its inode's) when it answered -1
                // for a regular file still named: that stat serves here too, unless
                // the open truncates it.
                const bool stated =
                    !held.empty() && !(flags & O_TRUNC) && S_ISREG(now.st_mode) && now.st_nlink != 0;
                const int at = replacement >= 0 ? replacement : in.fd;
                if (replacement >= 0) {
                  // The kernel's inode (its size, its pages) is the old file's: I/O
                  // goes straight to this handle, and the release drops what the
                  // kernel caches of the file now there.
                  o->f.direct_io = 1;
                  o->ino = inodes->find(now.st_ino, now.st_dev);
                  o->redirected = true;
                }
                int err = 0;
                if ((flags & O_TRUNC) && !held.empty()) {
                  const std::uint64_t version = held.front().version;
                  auto stale = stale_reads(o->who, o->key, version, at, true);
                  if (stale && opts.stale_writes == StaleWrites::Refuse) {
                    refuse_stale(o->who, o->key, version, *stale);
                    held.front().stale = "refused";
                    err = EBUSY;
                  } else {
                    // A stale one is merged at release, with what it replaces from here.
                    if (stale) {
                      o->stale_reads = std::move(*stale);
                      if (history && opts.stale_writes == StaleWrites::Merge)
                        o->theirs = read_file(proc_path(at), history->options().max_file_bytes + 1);
                    }
                    keep_before_change(o->key, version, at, stale.has_value());
                  }
                }
                // A reader that may go straight opens no descriptor of its own: the
                // kernel opens the file below for it. One that does not go straight
                // (choose_io) opens it next.
                const bool may_go_straight = replacement < 0 && passthrough.on() && (flags & O_ACCMODE) == O_RDONLY &&
                                             !(flags & O_TRUNC) && !(o->f.flags & O_DIRECT);
                auto open_own = [&] { return ::open(proc_path(at).c_str(), flags | O_CLOEXEC); };
                if (!err) err = adopt(*o, may_go_straight ? -1 : open_own(), held, may_go_straight);
                if (!err) choose_io(*o, in);
                if (!err && o->h->fd < 0 && o->h->io != FileHandle::Io::Through) {
                  // With the open's own flags (O_NOATIME...), as any other handle.
                  const int fd = open_own();
                  if (fd < 0) {
                    err = errno;
                    log_fd_exhaustion(err);
                    close_handle(std::exchange(o->h, nullptr));
                  } else {
                    o->h->fd = fd;
                  }
                }
                // A handle read straight from below never keeps the kernel's cache (its
                // open drops it); the check still records the file and drops stale
                // attributes.
                if (!err && replacement < 0) {
                  const int fd = o->h->fd >= 0 ? o->h->fd.load() : in.fd;
                  const bool keep = keep_cache_at_open(in, fd, o->h->version, stated ? &now : nullptr);
                  o->keep_cache = keep && o->h->io != FileHandle::Io::Through;
                }
                if (replacement >= 0) ::close(replacement);
                return err;
              },
              [this, req, o](int err) { reply_open(req, *o, err, false); }},
             &o->who);
}

void GateFs::Impl::create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
            fuse_file_info* fi) {
  Inode& p = inode(parent);
  const std::string nm = name;
  const fuse_ctx* ctx = fuse_req_ctx(req);
  const uid_t uid = ctx->uid;
  const gid_t gid = ctx->gid;
  auto o = std::make_shared<Opening>(Opening{*fi, inodes->child_key(p, nm), callers.resolve(ctx->pid)});
  o->created = true;
  run_locked(req, plan_locks({.op = FsOp::Create, .key = o->key, .open_flags = fi->flags}), nullptr,
             {[this, &p, nm, mode, uid, gid, o](std::vector<HeldLock>& held) {
                int flags = (o->f.flags | O_CREAT | O_NOFOLLOW | O_CLOEXEC) & ~(O_NOCTTY | kCallerOnlyFlags);
                int fd = ::openat(p.fd, nm.c_str(), flags, mode);
                if (fd >= 0) {
                  give_to_caller(p.fd, nm, fd, uid, gid);
                  if (int err = entry_for(p, nm, &o->entry)) {
                    ::close(fd);
                    return err;
                  }
                }
                const int err = adopt(*o, fd, held);
                if (!err) {
                  choose_io(*o, inode(o->entry.ino));
                  keep_cache_at_open(inode(o->entry.ino), fd, o->h->version);
                }
                return err;
              },
              [this, req, o](int err) { reply_open(req, *o, err, true); }},
             &o->who);
}

void GateFs::Impl::setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
              int flags) {
  Inode& in = inode(ino);
  const std::string nm = name, val(value, size);
  run_locked(req, plan_locks({.op = FsOp::Setxattr, .key = inodes->key_of(in)}), nullptr,
             just(req, [this, &in, nm, val, flags] {
               UniqueFd hold;
               return ::setxattr(proc_path(live_fd(in, hold)).c_str(), nm.c_str(), val.data(), val.size(),
                                 flags) < 0
                          ? errno
                          : 0;
             }));
}

void GateFs::Impl::removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  Inode& in = inode(ino);
  const std::string nm = name;
  run_locked(req, plan_locks({.op = FsOp::Removexattr, .key = inodes->key_of(in)}), nullptr,
             just(req, [this, &in, nm] {
               UniqueFd hold;
               return ::removexattr(proc_path(live_fd(in, hold)).c_str(), nm.c_str()) < 0 ? errno : 0;
             }));
}

}  // namespace gate::mount
