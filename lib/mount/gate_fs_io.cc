// The calls that take no lock: lookups, attributes, reads and writes through an open
// handle (whose lock covers them), directories, statfs and reading xattrs.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/fs.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

void GateFs::Impl::lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_entry_param e;
  int err = entry_for(inode(parent), name, &e);
  if (err) {
    log_fd_exhaustion(err);
    fuse_reply_err(req, err);
    return;
  }
  reply_entry(req, e);
}

void GateFs::Impl::forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) {
  inodes->forget(inode(ino), n);
  fuse_reply_none(req);
}

void GateFs::Impl::forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) inodes->forget(inode(forgets[i].ino), forgets[i].nlookup);
  fuse_reply_none(req);
}

int GateFs::Impl::fd_of(FileHandle* h) {
  if (const int fd = h->fd.load(std::memory_order_acquire); fd >= 0) return fd;
  std::lock_guard guard(h->m);
  if (const int fd = h->fd.load(std::memory_order_acquire); fd >= 0) return fd;
  if (!h->ino) return errno = EBADF, -1;
  const int fd = ::open(proc_path(inode(h->ino).fd).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    log_fd_exhaustion(errno);
    return -1;
  }
  h->fd.store(fd, std::memory_order_release);
  return fd;
}

void GateFs::Impl::getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  UniqueFd hold;
  // A handle without a descriptor of its own is never redirected: its inode's file.
  if (fi) {
    const int own = file_of(fi)->fd;
    reply_attr(req, own >= 0 ? own : inode(ino).fd);
    return;
  }
  reply_attr(req, live_fd(inode(ino), hold));
}

void GateFs::Impl::readlink(fuse_req_t req, fuse_ino_t ino) {
  char buf[PATH_MAX + 1];
  ssize_t n = ::readlinkat(inode(ino).fd, "", buf, sizeof(buf));
  if (n < 0) {
    fuse_reply_err(req, errno);
    return;
  }
  if (n == static_cast<ssize_t>(sizeof(buf))) {
    fuse_reply_err(req, ENAMETOOLONG);
    return;
  }
  buf[n] = '\0';
  fuse_reply_readlink(req, buf);
}

void GateFs::Impl::read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi) {
  reads_served.fetch_add(1, std::memory_order_relaxed);
  const int fd = fd_of(file_of(fi));
  if (fd < 0) {
    fuse_reply_err(req, errno);
    return;
  }
  fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
  buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  buf.buf[0].fd = fd;
  buf.buf[0].pos = off;
  fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

void GateFs::Impl::write_buf(fuse_req_t req, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
  FileHandle* h = file_of(fi);
  writes_served.fetch_add(1, std::memory_order_relaxed);
  if (write_refused(h)) {
    fuse_reply_err(req, EIO);
    return;
  }
  keep_first_change(h);
  fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
  out.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
  out.buf[0].fd = h->fd;
  out.buf[0].pos = off;
  ssize_t n = fuse_buf_copy(&out, in, static_cast<fuse_buf_copy_flags>(0));
  if (n > 0) h->changed = true;
  if (n < 0) fuse_reply_err(req, static_cast<int>(-n));
  else fuse_reply_write(req, static_cast<size_t>(n));
}

void GateFs::Impl::flush(fuse_req_t req, fuse_file_info* fi) {
  FileHandle* h = file_of(fi);
  // A straight reader without a descriptor of its own has nothing to flush.
  int err = 0;
  if (const int fd = h->fd; fd >= 0 && ::close(::dup(fd)) < 0) err = errno;
  if (opts.release_on_flush && agent) {
    if (!h->changed && changed_below(h)) h->changed = true;
    std::shared_ptr<TrackedLock> lock;
    {
      std::lock_guard guard(h->m);
      lock = std::move(h->lock);
    }
    if (lock) release_handle_lock(h, lock, settle_handle(h, lock));
  }
  fuse_reply_err(req, err);
}

void GateFs::Impl::release(fuse_req_t req, fuse_file_info* fi) {
  close_handle(file_of(fi));
  fuse_reply_err(req, 0);
}

void GateFs::Impl::fsync(fuse_req_t req, int datasync, fuse_file_info* fi) {
  const int fd = fd_of(file_of(fi));
  const int r = fd < 0 ? -1 : datasync ? ::fdatasync(fd) : ::fsync(fd);
  fuse_reply_err(req, r < 0 ? errno : 0);
}

void GateFs::Impl::fallocate(fuse_req_t req, int mode, off_t off, off_t len, fuse_file_info* fi) {
  FileHandle* h = file_of(fi);
  if (write_refused(h)) {
    fuse_reply_err(req, EIO);
    return;
  }
  keep_first_change(h);
  const int r = ::fallocate(h->fd, mode, off, len);
  if (r == 0) h->changed = true;
  fuse_reply_err(req, r < 0 ? errno : 0);
}

void GateFs::Impl::lseek(fuse_req_t req, off_t off, int whence, fuse_file_info* fi) {
  const int fd = fd_of(file_of(fi));
  const off_t r = fd < 0 ? -1 : ::lseek(fd, off, whence);
  if (r < 0) fuse_reply_err(req, errno);
  else fuse_reply_lseek(req, r);
}

void GateFs::Impl::copy_file_range(fuse_req_t req, off_t off_in, fuse_file_info* fi_in, off_t off_out,
                     fuse_file_info* fi_out, size_t len, int flags) {
  FileHandle* out = file_of(fi_out);
  if (write_refused(out)) {
    fuse_reply_err(req, EIO);
    return;
  }
  keep_first_change(out);
  loff_t in_pos = off_in, out_pos = off_out;
  const int in = fd_of(file_of(fi_in));
  ssize_t n = in < 0 ? -1
                     : ::copy_file_range(in, &in_pos, out->fd, &out_pos, len, static_cast<unsigned>(flags));
  if (n > 0) out->changed = true;
  if (n < 0) fuse_reply_err(req, errno);
  else fuse_reply_write(req, static_cast<size_t>(n));
}

void GateFs::Impl::opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  int fd = ::openat(inode(ino).fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    log_fd_exhaustion(err);
    fuse_reply_err(req, err);
    return;
  }
  auto* d = new DirHandle;
  d->dp = ::fdopendir(fd);
  if (!d->dp) {
    int err = errno;
    ::close(fd);
    delete d;
    fuse_reply_err(req, err);
    return;
  }
  fi->fh = reinterpret_cast<uint64_t>(d);
  // The kernel may keep a directory's list while the source is watched: a change
  // beside the mount drops the directory's attributes, and a new mtime the list.
  if (watch && watch->complete()) {
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
  }
  if (fuse_reply_open(req, fi) != 0) delete d;
}

bool GateFs::Impl::dot_or_dotdot(const char* name) {
  return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

void GateFs::Impl::readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi,
             bool plus) {
  DirHandle* d = dir_of(fi);
  std::vector<char> buf(size);
  size_t used = 0;
  int err = 0;
  std::unique_lock lock(d->m);
  if (offset != d->offset) {
    ::seekdir(d->dp, offset);
    d->offset = offset;
  }
  for (;;) {
    errno = 0;
    dirent* ent = ::readdir(d->dp);
    if (!ent) {
      err = errno;
      break;
    }
    fuse_entry_param e{};
    bool looked_up = false;
    size_t n;
    if (plus && !dot_or_dotdot(ent->d_name)) {
      err = entry_for(inode(ino), ent->d_name, &e);
      if (err) break;
      looked_up = true;
      n = fuse_add_direntry_plus(req, buf.data() + used, size - used, ent->d_name, &e,
                                 ent->d_off);
    } else {
      e.attr.st_ino = ent->d_ino;
      e.attr.st_mode = static_cast<mode_t>(ent->d_type) << 12;
      n = plus ? fuse_add_direntry_plus(req, buf.data() + used, size - used, ent->d_name, &e,
                                        ent->d_off)
               : fuse_add_direntry(req, buf.data() + used, size - used, ent->d_name, &e.attr,
                                   ent->d_off);
    }
    if (n > size - used) {
      // Does not fit: this entry comes first next time.
      if (looked_up) inodes->forget(inode(e.ino), 1);
      ::seekdir(d->dp, d->offset);
      break;
    }
    used += n;
    d->offset = ent->d_off;
  }
  lock.unlock();
  // An error after some entries cannot be reported without confusing lookup
  // counts; those entries go out and the error comes next time.
  if (err && used == 0) {
    log_fd_exhaustion(err);
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void GateFs::Impl::releasedir(fuse_req_t req, fuse_file_info* fi) {
  delete dir_of(fi);
  fuse_reply_err(req, 0);
}

void GateFs::Impl::fsyncdir(fuse_req_t req, int datasync, fuse_file_info* fi) {
  int fd = ::dirfd(dir_of(fi)->dp);
  int r = datasync ? ::fdatasync(fd) : ::fsync(fd);
  fuse_reply_err(req, r < 0 ? errno : 0);
}

void GateFs::Impl::statfs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs st;
  if (::fstatvfs(inode(ino).fd, &st) < 0) fuse_reply_err(req, errno);
  else fuse_reply_statfs(req, &st);
}

template <typename Call>
void GateFs::Impl::reply_xattr(fuse_req_t req, size_t size, Call call) {
  if (size == 0) {
    ssize_t n = call(nullptr, 0);
    if (n < 0) fuse_reply_err(req, errno);
    else fuse_reply_xattr(req, static_cast<size_t>(n));
    return;
  }
  std::vector<char> value(size);
  ssize_t n = call(value.data(), size);
  if (n < 0) fuse_reply_err(req, errno);
  else fuse_reply_buf(req, value.data(), static_cast<size_t>(n));
}

void GateFs::Impl::getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  if (ino == FUSE_ROOT_ID && std::strncmp(name, "user.gate.", 10) == 0) {
    std::optional<std::string> answer;
    if (std::strcmp(name, kStaleXattr) == 0 && agent) {
      answer = stale_summary();
    } else if (std::strcmp(name, kHistoryXattr) == 0 && history) {
      // `gate history` asks the view for its history: written out, then where it is.
      history->flush();
      answer = history->options().dir;
    } else if (std::strcmp(name, kPassthroughXattr) == 0) {
      std::size_t handles;
      {
        std::lock_guard guard(open_files_mu);
        handles = open_files.size();
      }
      answer = std::string(passthrough.on() ? "on" : "off") + " opens=" +
               std::to_string(passthrough.opens()) + " files=" + std::to_string(passthrough.registered()) +
               " handles=" + std::to_string(handles) + " reads=" +
               std::to_string(reads_served.load(std::memory_order_relaxed)) + " writes=" +
               std::to_string(writes_served.load(std::memory_order_relaxed));
      if (!passthrough.on()) *answer += ": " + passthrough.why_off();
    } else if (std::strcmp(name, kWatchXattr) == 0) {
      answer = !watch ? std::string("off")
                      : std::string(watch->complete() ? "on" : "partial") + " dirs=" +
                            std::to_string(watch->dirs()) + " batches=" + std::to_string(watch->batches());
    } else if (std::strcmp(name, kHistoryProblemXattr) == 0 && history) {
      std::lock_guard guard(history_problem_m);
      if (!history_problem.empty()) answer = history_problem;
    }
    if (answer) {
      reply_xattr(req, size, [&](char* buf, size_t len) -> ssize_t {
        if (len == 0) return static_cast<ssize_t>(answer->size());
        if (len < answer->size()) return errno = ERANGE, -1;
        std::memcpy(buf, answer->data(), answer->size());
        return static_cast<ssize_t>(answer->size());
      });
      return;
    }
  }
  UniqueFd hold;
  std::string proc = proc_path(live_fd(inode(ino), hold));
  // No LSM answered for an SELinux label (the kernel asks the file system only then),
  // and the file has none: say the view keeps no labels, as a file system without
  // them does. `ls -l` then stops asking for the rest of the view instead of making
  // this round trip for every file it lists. A label the file below has is answered.
  const bool label = std::strcmp(name, "security.selinux") == 0;
  // The kernel checks POSIX ACLs itself (init) and takes any answer but "none" for a
  // failure of the check: a directory below that keeps no ACLs (vfat, NFS...) has none.
  const bool acl = std::strncmp(name, "system.posix_acl_", 17) == 0;
  reply_xattr(req, size, [&](char* buf, size_t len) {
    ssize_t n = ::getxattr(proc.c_str(), name, buf, len);
    if (n < 0 && label && errno == ENODATA) errno = EOPNOTSUPP;
    if (n < 0 && acl && errno == EOPNOTSUPP) errno = ENODATA;
    return n;
  });
}

void GateFs::Impl::listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  UniqueFd hold;
  std::string proc = proc_path(live_fd(inode(ino), hold));
  reply_xattr(req, size,
              [&](char* buf, size_t len) { return ::listxattr(proc.c_str(), buf, len); });
}

}  // namespace gate::mount
