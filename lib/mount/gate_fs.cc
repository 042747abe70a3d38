#include "mount/gate_fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/fs.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "core/log.h"
#include "mount/inode_table.h"
#include "mount/lock_policy.h"

namespace gate::mount {

namespace {

// One open file. fi->fh points at it from open/create until release.
struct FileHandle {
  ~FileHandle() {
    if (fd >= 0) ::close(fd);
  }
  int fd = -1;
  std::string key;
  std::mutex m;
  std::shared_ptr<TrackedLock> lock;  // guarded by m; null when not locked (any more)
  std::atomic<bool> lost_logged{false};
};

struct DirHandle {
  ~DirHandle() {
    if (dp) ::closedir(dp);
  }
  DIR* dp = nullptr;
  off_t offset = 0;
  std::mutex m;  // one readdir at a time; dropped before replying
};

FileHandle* file_of(const fuse_file_info* fi) { return reinterpret_cast<FileHandle*>(fi->fh); }
DirHandle* dir_of(const fuse_file_info* fi) { return reinterpret_cast<DirHandle*>(fi->fh); }

std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

void log_fd_exhaustion(int err) {
  if (err == EMFILE || err == ENFILE)
    log(LogLevel::Error, "mount", "out of file descriptors (", std::strerror(err),
        "); raise the limit (ulimit -n) or close files");
}

}  // namespace

struct GateFs::Impl {
  MountOptions opts;
  std::unique_ptr<InodeTable> inodes;
  std::unique_ptr<LockAgent> agent;  // null with locking off
  fuse_session* se = nullptr;
  bool mounted = false;
  bool running_as_root = ::geteuid() == 0;

  explicit Impl(MountOptions o) : opts(std::move(o)) {}

  // Handlers may keep this reference until they reply (also on a waiter thread):
  // the kernel keeps an inode's lookup count up while a request on it is in flight,
  // so no FORGET can free it before the reply.
  Inode& inode(fuse_ino_t ino) { return inodes->get(ino); }

  // ---- locks ------------------------------------------------------------------

  static void on_interrupt(fuse_req_t, void* data) { static_cast<LockJob*>(data)->interrupt(); }

  // What a call does once it holds its locks, and how it answers.
  struct Step {
    // The system call, under the locks; an errno or 0. Not run when taking the
    // locks failed. May adopt `held` for an open handle (it then clears it).
    std::function<int(std::vector<HeldLock>& held)> act;
    // The reply, after the locks the call did not adopt are back at the broker
    // (so the caller's next call never finds them still held).
    std::function<void(int err)> reply;
  };

  // Takes the plan's locks for req, runs step.act, gives back the rest, then
  // step.reply: exactly once, on this thread or on a waiter thread. `h`: the open
  // handle the call came through, whose lock a call on its key re-enters.
  void run_locked(fuse_req_t req, const LockPlan& plan, FileHandle* h, Step step) {
    auto finish = [this, step = std::move(step)](int err, std::vector<HeldLock>& held) {
      if (!err) err = step.act(held);
      give_back(held);
      held.clear();
      step.reply(err);
    };
    if (!agent || plan.locks.empty()) {
      std::vector<HeldLock> none;
      finish(0, none);
      return;
    }
    const pid_t pid = fuse_req_ctx(req)->pid;
    auto job = std::make_shared<LockJob>();
    for (const KeyLock& l : plan.locks)
      job->needs.push_back({l.key, l.mode, owner_for(plan, l.key, h, pid)});
    job->pid = pid;
    job->nonblocking = plan.wait == Wait::NoWait;
    job->under_kernel_locks = plan.wait == Wait::Bounded;
    job->op = plan.name;
    job->done = [req, finish = std::move(finish)](LockJob& j, int err) {
      // After this no interrupt callback can run for req, so the job may go.
      fuse_req_interrupt_func(req, nullptr, nullptr);
      finish(err, j.held);
    };
    fuse_req_interrupt_func(req, &Impl::on_interrupt, job.get());
    agent->run(job);
  }

  // An open gets a fresh owner; a call for the call's length re-enters the lock of an
  // open handle on the same key (the caller's own first), so `touch` on an open
  // file does not wait for itself.
  std::string owner_for(const LockPlan& plan, const std::string& key, FileHandle* h, pid_t pid) {
    if (plan.span == Span::Handle) return agent->new_owner();
    if (h && h->key == key) {
      std::lock_guard lock(h->m);
      if (h->lock && !h->lock->lost) return h->lock->lock.owner;
    }
    if (auto owner = agent->owner_holding(key, pid)) return *owner;
    return agent->new_owner();
  }

  void give_back(const std::vector<HeldLock>& held) {
    if (agent && !held.empty()) agent->release(held);
  }

  // ---- helpers ----------------------------------------------------------------

  int entry_for(Inode& parent, const std::string& name, fuse_entry_param* e) {
    std::memset(e, 0, sizeof(*e));
    Inode* found = nullptr;
    int err = inodes->lookup(parent, name.c_str(), &e->attr, &found);
    if (err) return err;
    e->ino = inodes->id(*found);
    e->attr_timeout = opts.cache_timeout_s;
    e->entry_timeout = opts.cache_timeout_s;
    return 0;
  }

  // A step whose answer is a plain errno.
  static Step just(fuse_req_t req, std::function<int()> act) {
    return {[act = std::move(act)](std::vector<HeldLock>&) { return act(); },
            [req](int err) { fuse_reply_err(req, err); }};
  }

  // A step that makes `name` in `parent` with `make` and answers its entry.
  Step new_entry(fuse_req_t req, Inode& parent, std::string name, std::function<int()> make) {
    auto e = std::make_shared<fuse_entry_param>();
    return {[this, &parent, name, e, make = std::move(make)](std::vector<HeldLock>&) {
              int err = make();
              return err ? err : entry_for(parent, name, e.get());
            },
            [this, req, e](int err) {
              if (err) fuse_reply_err(req, err);
              else reply_entry(req, *e);
            }};
  }

  void reply_entry(fuse_req_t req, fuse_entry_param& e) {
    if (fuse_reply_entry(req, &e) != 0) inodes->forget(inode(e.ino), 1);
  }

  void reply_attr(fuse_req_t req, int fd) {
    struct stat st;
    if (::fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
      fuse_reply_err(req, errno);
      return;
    }
    fuse_reply_attr(req, &st, opts.cache_timeout_s);
  }

  // New objects belong to the caller, not to the daemon (when the daemon is root).
  void give_to_caller(int dirfd, const std::string& name, int fd, uid_t uid, gid_t gid) {
    if (!running_as_root || (uid == 0 && gid == 0)) return;
    struct stat dir;
    if (::fstat(dirfd, &dir) == 0 && (dir.st_mode & S_ISGID)) gid = static_cast<gid_t>(-1);
    int r = fd >= 0 ? ::fchown(fd, uid, gid)
                    : ::fchownat(dirfd, name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW);
    if (r < 0)
      log(LogLevel::Debug, "mount", "could not give ", name, " to uid ", uid, ": ",
          std::strerror(errno));
  }

  // Handles the kernel has not released yet: closed by serve() at the end, since an
  // unmount with files still open never sends their release.
  std::mutex open_files_mu;
  std::unordered_set<FileHandle*> open_files;

  void close_remaining_handles() {
    std::vector<FileHandle*> left;
    {
      std::lock_guard guard(open_files_mu);
      left.assign(open_files.begin(), open_files.end());
    }
    for (FileHandle* h : left) close_handle(h);
  }

  void close_handle(FileHandle* h) {
    {
      std::lock_guard guard(open_files_mu);
      open_files.erase(h);
    }
    std::shared_ptr<TrackedLock> lock;
    {
      std::lock_guard guard(h->m);
      lock = std::move(h->lock);
    }
    // Data reaches the source before the next holder can get in.
    if (h->fd >= 0) ::close(h->fd);
    h->fd = -1;
    if (lock && agent) agent->release_tracked(lock);
    delete h;
  }

  bool write_refused(FileHandle* h) {
    std::lock_guard guard(h->m);
    if (!h->lock || !h->lock->lost) return false;
    if (!h->lost_logged.exchange(true))
      log(LogLevel::Error, "mount", "write to ", h->key, " refused with EIO: its lock (",
          h->lock->lock.lock_id, ") was lost: ", h->lock->lost_reason);
    return true;
  }

  // ---- operations -------------------------------------------------------------

  void init(fuse_conn_info* conn) {
    auto want = [conn](unsigned cap) {
      if (conn->capable & cap) conn->want |= cap;
    };
    want(FUSE_CAP_SPLICE_WRITE);
    want(FUSE_CAP_SPLICE_MOVE);
    want(FUSE_CAP_SPLICE_READ);
    want(FUSE_CAP_PARALLEL_DIROPS);
    want(FUSE_CAP_ATOMIC_O_TRUNC);
    // Locks stay exact only if the kernel does not answer from a write-back cache.
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    conn->max_write = 1u << 20;  // libfuse lowers it to what its buffer holds
    conn->max_background = 64;
  }

  void lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
    fuse_entry_param e;
    int err = entry_for(inode(parent), name, &e);
    if (err) {
      log_fd_exhaustion(err);
      fuse_reply_err(req, err);
      return;
    }
    reply_entry(req, e);
  }

  void forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) {
    inodes->forget(inode(ino), n);
    fuse_reply_none(req);
  }

  void forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
    for (size_t i = 0; i < count; ++i) inodes->forget(inode(forgets[i].ino), forgets[i].nlookup);
    fuse_reply_none(req);
  }

  void getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    reply_attr(req, fi ? file_of(fi)->fd : inode(ino).fd);
  }

  static int apply_setattr(Inode& in, const struct stat& a, int valid, int fd) {
    const std::string proc = proc_path(in.fd);
    if (valid & FUSE_SET_ATTR_MODE) {
      int r = fd >= 0 ? ::fchmod(fd, a.st_mode) : ::chmod(proc.c_str(), a.st_mode);
      if (r < 0) return errno;
    }
    if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
      uid_t uid = (valid & FUSE_SET_ATTR_UID) ? a.st_uid : static_cast<uid_t>(-1);
      gid_t gid = (valid & FUSE_SET_ATTR_GID) ? a.st_gid : static_cast<gid_t>(-1);
      if (::fchownat(in.fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) return errno;
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

  static AttrChange attr_change(int valid) {
    if (valid & FUSE_SET_ATTR_SIZE) return AttrChange::Size;
    if (valid & FUSE_SET_ATTR_MODE) return AttrChange::Mode;
    if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) return AttrChange::Owner;
    return AttrChange::Times;
  }

  void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi) {
    Inode& in = inode(ino);
    // A handle stays until its release, which the kernel sends only after this call.
    FileHandle* h = fi ? file_of(fi) : nullptr;
    const int fd = h ? h->fd : -1;
    const struct stat a = *attr;
    const LockPlan plan =
        plan_locks({.op = FsOp::Setattr, .key = h ? h->key : inodes->key_of(in), .attr = attr_change(valid)});
    run_locked(req, plan, h,
               {[&in, a, valid, fd](std::vector<HeldLock>&) { return apply_setattr(in, a, valid, fd); },
                [this, req, &in, fd](int err) {
                  if (err) fuse_reply_err(req, err);
                  else reply_attr(req, fd >= 0 ? fd : in.fd);
                }});
  }

  void readlink(fuse_req_t req, fuse_ino_t ino) {
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

  // mknod, mkdir and symlink: make the object under a write lock, answer its entry.
  void make_node(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev,
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

  void remove(fuse_req_t req, fuse_ino_t parent, const char* name, int flags) {
    Inode& p = inode(parent);
    const std::string nm = name;
    const FsOp op = (flags & AT_REMOVEDIR) ? FsOp::Rmdir : FsOp::Unlink;
    run_locked(req, plan_locks({.op = op, .key = inodes->child_key(p, nm)}), nullptr,
               just(req, [&p, nm, flags] { return ::unlinkat(p.fd, nm.c_str(), flags) < 0 ? errno : 0; }));
  }

  // renameat2, keeping the inode table's names in step.
  int rename_at(Inode& p, const std::string& nm, Inode& np, const std::string& nn, unsigned flags) {
    struct stat src {}, dst {};
    bool have_src = ::fstatat(p.fd, nm.c_str(), &src, AT_SYMLINK_NOFOLLOW) == 0;
    bool have_dst = (flags & RENAME_EXCHANGE) &&
                    ::fstatat(np.fd, nn.c_str(), &dst, AT_SYMLINK_NOFOLLOW) == 0;
    if (::renameat2(p.fd, nm.c_str(), np.fd, nn.c_str(), flags) < 0) return errno;
    if (have_src) inodes->moved(src.st_ino, src.st_dev, np, nn);
    if (have_dst) inodes->moved(dst.st_ino, dst.st_dev, p, nm);
    return 0;
  }

  void rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
              const char* newname, unsigned int flags) {
    if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) {
      fuse_reply_err(req, EINVAL);
      return;
    }
    Inode& p = inode(parent);
    Inode& np = inode(newparent);
    const std::string nm = name, nn = newname;
    const LockPlan plan = plan_locks(
        {.op = FsOp::Rename, .key = inodes->child_key(p, nm), .second = inodes->child_key(np, nn)});
    run_locked(req, plan, nullptr,
               just(req, [this, &p, &np, nm, nn, flags] { return rename_at(p, nm, np, nn, flags); }));
  }

  void link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
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

  // An open or create on its way: what the kernel asked, and the handle once made.
  struct Opening {
    fuse_file_info f;  // a copy: *fi lives only as long as the handler call
    std::string key;
    pid_t pid = 0;
    FileHandle* h = nullptr;
    fuse_entry_param entry{};  // create only
  };

  // The act of open and create: the new handle takes over the lock (kept until
  // release). `fd` < 0: the open failed with errno.
  int adopt(Opening& o, int fd, std::vector<HeldLock>& held) {
    if (fd < 0) {
      int err = errno;
      log_fd_exhaustion(err);
      return err;
    }
    auto* h = new FileHandle;
    h->fd = fd;
    h->key = o.key;
    {
      std::lock_guard guard(open_files_mu);
      open_files.insert(h);
    }
    if (agent && !held.empty()) h->lock = agent->track(held.front(), o.pid);
    held.clear();
    o.h = h;
    return 0;
  }

  // The reply of open and create. If the caller went away meanwhile (the reply
  // fails), everything is undone.
  void reply_open(fuse_req_t req, Opening& o, int err, bool created) {
    if (err) {
      fuse_reply_err(req, err);
      return;
    }
    o.f.fh = reinterpret_cast<uint64_t>(o.h);
    // Another holder may have changed the file since, and timestamps are too coarse
    // to tell (two writes in one clock tick look alike): always read afresh.
    o.f.keep_cache = 0;
    if (o.f.flags & O_DIRECT) o.f.direct_io = 1;
    int r = created ? fuse_reply_create(req, &o.entry, &o.f) : fuse_reply_open(req, &o.f);
    if (r != 0) {
      log(LogLevel::Debug, "mount", "open of ", o.key, " was abandoned by pid ", o.pid);
      close_handle(o.h);
      if (created) inodes->forget(inode(o.entry.ino), 1);
    }
  }

  void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
    Inode& in = inode(ino);
    auto o = std::make_shared<Opening>(Opening{*fi, inodes->key_of(in), fuse_req_ctx(req)->pid});
    run_locked(req, plan_locks({.op = FsOp::Open, .key = o->key, .open_flags = fi->flags}), nullptr,
               {[this, &in, o](std::vector<HeldLock>& held) {
                  int flags = o->f.flags & ~(O_NOFOLLOW | O_CREAT | O_EXCL | O_NOCTTY);
                  return adopt(*o, ::open(proc_path(in.fd).c_str(), flags | O_CLOEXEC), held);
                },
                [this, req, o](int err) { reply_open(req, *o, err, false); }});
  }

  void create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
              fuse_file_info* fi) {
    Inode& p = inode(parent);
    const std::string nm = name;
    const fuse_ctx* ctx = fuse_req_ctx(req);
    const uid_t uid = ctx->uid;
    const gid_t gid = ctx->gid;
    auto o = std::make_shared<Opening>(Opening{*fi, inodes->child_key(p, nm), ctx->pid});
    run_locked(req, plan_locks({.op = FsOp::Create, .key = o->key, .open_flags = fi->flags}), nullptr,
               {[this, &p, nm, mode, uid, gid, o](std::vector<HeldLock>& held) {
                  int flags = (o->f.flags | O_CREAT | O_NOFOLLOW | O_CLOEXEC) & ~O_NOCTTY;
                  int fd = ::openat(p.fd, nm.c_str(), flags, mode);
                  if (fd >= 0) {
                    give_to_caller(p.fd, nm, fd, uid, gid);
                    if (int err = entry_for(p, nm, &o->entry)) {
                      ::close(fd);
                      return err;
                    }
                  }
                  return adopt(*o, fd, held);
                },
                [this, req, o](int err) { reply_open(req, *o, err, true); }});
  }

  void read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi) {
    fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    buf.buf[0].fd = file_of(fi)->fd;
    buf.buf[0].pos = off;
    fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
  }

  void write_buf(fuse_req_t req, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
    FileHandle* h = file_of(fi);
    if (write_refused(h)) {
      fuse_reply_err(req, EIO);
      return;
    }
    fuse_bufvec out = FUSE_BUFVEC_INIT(fuse_buf_size(in));
    out.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    out.buf[0].fd = h->fd;
    out.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&out, in, static_cast<fuse_buf_copy_flags>(0));
    if (n < 0) fuse_reply_err(req, static_cast<int>(-n));
    else fuse_reply_write(req, static_cast<size_t>(n));
  }

  void flush(fuse_req_t req, fuse_file_info* fi) {
    FileHandle* h = file_of(fi);
    int r = ::close(::dup(h->fd));
    int err = r < 0 ? errno : 0;
    if (opts.release_on_flush && agent) {
      std::shared_ptr<TrackedLock> lock;
      {
        std::lock_guard guard(h->m);
        lock = std::move(h->lock);
      }
      if (lock) agent->release_tracked(lock);
    }
    fuse_reply_err(req, err);
  }

  void release(fuse_req_t req, fuse_file_info* fi) {
    close_handle(file_of(fi));
    fuse_reply_err(req, 0);
  }

  void fsync(fuse_req_t req, int datasync, fuse_file_info* fi) {
    int fd = file_of(fi)->fd;
    int r = datasync ? ::fdatasync(fd) : ::fsync(fd);
    fuse_reply_err(req, r < 0 ? errno : 0);
  }

  void fallocate(fuse_req_t req, int mode, off_t off, off_t len, fuse_file_info* fi) {
    FileHandle* h = file_of(fi);
    if (write_refused(h)) {
      fuse_reply_err(req, EIO);
      return;
    }
    fuse_reply_err(req, ::fallocate(h->fd, mode, off, len) < 0 ? errno : 0);
  }

  void lseek(fuse_req_t req, off_t off, int whence, fuse_file_info* fi) {
    off_t r = ::lseek(file_of(fi)->fd, off, whence);
    if (r < 0) fuse_reply_err(req, errno);
    else fuse_reply_lseek(req, r);
  }

  void copy_file_range(fuse_req_t req, off_t off_in, fuse_file_info* fi_in, off_t off_out,
                       fuse_file_info* fi_out, size_t len, int flags) {
    FileHandle* out = file_of(fi_out);
    if (write_refused(out)) {
      fuse_reply_err(req, EIO);
      return;
    }
    loff_t in_pos = off_in, out_pos = off_out;
    ssize_t n = ::copy_file_range(file_of(fi_in)->fd, &in_pos, out->fd, &out_pos, len,
                                  static_cast<unsigned>(flags));
    if (n < 0) fuse_reply_err(req, errno);
    else fuse_reply_write(req, static_cast<size_t>(n));
  }

  void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
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
    if (fuse_reply_open(req, fi) != 0) delete d;
  }

  static bool dot_or_dotdot(const char* name) {
    return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
  }

  void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi,
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

  void releasedir(fuse_req_t req, fuse_file_info* fi) {
    delete dir_of(fi);
    fuse_reply_err(req, 0);
  }

  void fsyncdir(fuse_req_t req, int datasync, fuse_file_info* fi) {
    int fd = ::dirfd(dir_of(fi)->dp);
    int r = datasync ? ::fdatasync(fd) : ::fsync(fd);
    fuse_reply_err(req, r < 0 ? errno : 0);
  }

  void statfs(fuse_req_t req, fuse_ino_t ino) {
    struct statvfs st;
    if (::fstatvfs(inode(ino).fd, &st) < 0) fuse_reply_err(req, errno);
    else fuse_reply_statfs(req, &st);
  }

  // getxattr/listxattr: size 0 asks for the length only.
  template <typename Call>
  void reply_xattr(fuse_req_t req, size_t size, Call call) {
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

  void getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
    std::string proc = proc_path(inode(ino).fd);
    reply_xattr(req, size, [&](char* buf, size_t len) {
      return ::getxattr(proc.c_str(), name, buf, len);
    });
  }

  void listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    std::string proc = proc_path(inode(ino).fd);
    reply_xattr(req, size,
                [&](char* buf, size_t len) { return ::listxattr(proc.c_str(), buf, len); });
  }

  void setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                int flags) {
    Inode& in = inode(ino);
    const std::string nm = name, val(value, size);
    run_locked(req, plan_locks({.op = FsOp::Setxattr, .key = inodes->key_of(in)}), nullptr,
               just(req, [&in, nm, val, flags] {
                 return ::setxattr(proc_path(in.fd).c_str(), nm.c_str(), val.data(), val.size(),
                                   flags) < 0
                            ? errno
                            : 0;
               }));
  }

  void removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
    Inode& in = inode(ino);
    const std::string nm = name;
    run_locked(req, plan_locks({.op = FsOp::Removexattr, .key = inodes->key_of(in)}), nullptr,
               just(req, [&in, nm] {
                 return ::removexattr(proc_path(in.fd).c_str(), nm.c_str()) < 0 ? errno : 0;
               }));
  }

  static const fuse_lowlevel_ops& operations();
};

namespace {
GateFs::Impl& fs(fuse_req_t req) { return *static_cast<GateFs::Impl*>(fuse_req_userdata(req)); }
}  // namespace

const fuse_lowlevel_ops& GateFs::Impl::operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o{};
    o.init = [](void* self, fuse_conn_info* conn) { static_cast<Impl*>(self)->init(conn); };
    o.lookup = [](fuse_req_t req, fuse_ino_t parent, const char* name) {
      fs(req).lookup(req, parent, name);
    };
    o.forget = [](fuse_req_t req, fuse_ino_t ino, uint64_t n) { fs(req).forget(req, ino, n); };
    o.forget_multi = [](fuse_req_t req, size_t count, fuse_forget_data* forgets) {
      fs(req).forget_multi(req, count, forgets);
    };
    o.getattr = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
      fs(req).getattr(req, ino, fi);
    };
    o.setattr = [](fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid,
                   fuse_file_info* fi) { fs(req).setattr(req, ino, attr, valid, fi); };
    o.readlink = [](fuse_req_t req, fuse_ino_t ino) { fs(req).readlink(req, ino); };
    o.mknod = [](fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
      fs(req).make_node(req, parent, name, mode, rdev, nullptr);
    };
    o.mkdir = [](fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
      fs(req).make_node(req, parent, name, S_IFDIR | mode, 0, nullptr);
    };
    o.symlink = [](fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
      fs(req).make_node(req, parent, name, S_IFLNK, 0, link);
    };
    o.unlink = [](fuse_req_t req, fuse_ino_t parent, const char* name) {
      fs(req).remove(req, parent, name, 0);
    };
    o.rmdir = [](fuse_req_t req, fuse_ino_t parent, const char* name) {
      fs(req).remove(req, parent, name, AT_REMOVEDIR);
    };
    o.rename = [](fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                  const char* newname, unsigned int flags) {
      fs(req).rename(req, parent, name, newparent, newname, flags);
    };
    o.link = [](fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
      fs(req).link(req, ino, newparent, newname);
    };
    o.open = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) { fs(req).open(req, ino, fi); };
    o.create = [](fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                  fuse_file_info* fi) { fs(req).create(req, parent, name, mode, fi); };
    o.read = [](fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
      fs(req).read(req, size, off, fi);
    };
    o.write_buf = [](fuse_req_t req, fuse_ino_t, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
      fs(req).write_buf(req, in, off, fi);
    };
    o.flush = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) { fs(req).flush(req, fi); };
    o.release = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) { fs(req).release(req, fi); };
    o.fsync = [](fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
      fs(req).fsync(req, datasync, fi);
    };
    o.fallocate = [](fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len,
                     fuse_file_info* fi) { fs(req).fallocate(req, mode, off, len, fi); };
    o.lseek = [](fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
      fs(req).lseek(req, off, whence, fi);
    };
    o.copy_file_range = [](fuse_req_t req, fuse_ino_t, off_t off_in, fuse_file_info* fi_in,
                           fuse_ino_t, off_t off_out, fuse_file_info* fi_out, size_t len,
                           int flags) {
      fs(req).copy_file_range(req, off_in, fi_in, off_out, fi_out, len, flags);
    };
    o.opendir = [](fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
      fs(req).opendir(req, ino, fi);
    };
    o.readdir = [](fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
      fs(req).readdir(req, ino, size, off, fi, false);
    };
    o.readdirplus = [](fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       fuse_file_info* fi) { fs(req).readdir(req, ino, size, off, fi, true); };
    o.releasedir = [](fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
      fs(req).releasedir(req, fi);
    };
    o.fsyncdir = [](fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
      fs(req).fsyncdir(req, datasync, fi);
    };
    o.statfs = [](fuse_req_t req, fuse_ino_t ino) { fs(req).statfs(req, ino); };
    o.getxattr = [](fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
      fs(req).getxattr(req, ino, name, size);
    };
    o.listxattr = [](fuse_req_t req, fuse_ino_t ino, size_t size) {
      fs(req).listxattr(req, ino, size);
    };
    o.setxattr = [](fuse_req_t req, fuse_ino_t ino, const char* name, const char* value,
                    size_t size, int flags) {
      fs(req).setxattr(req, ino, name, value, size, flags);
    };
    o.removexattr = [](fuse_req_t req, fuse_ino_t ino, const char* name) {
      fs(req).removexattr(req, ino, name);
    };
    return o;
  }();
  return ops;
}

// ---- GateFs -------------------------------------------------------------------

GateFs::GateFs(MountOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

GateFs::~GateFs() {
  if (impl_->agent) impl_->agent->stop();
  if (impl_->se) {
    if (impl_->mounted) fuse_session_unmount(impl_->se);
    fuse_remove_signal_handlers(impl_->se);
    fuse_session_destroy(impl_->se);
  }
}

std::string GateFs::mount() {
  Impl& d = *impl_;
  int root_fd = ::open(d.opts.root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0)
    return "cannot open the source directory " + d.opts.root + ": " + std::strerror(errno);
  struct stat st;
  if (::fstat(root_fd, &st) < 0) {
    int err = errno;
    ::close(root_fd);
    return "cannot stat the source directory " + d.opts.root + ": " + std::strerror(err);
  }
  d.inodes = std::make_unique<InodeTable>(root_fd, st);
  if (d.opts.locking) {
    d.opts.locks.mountpoint = d.opts.mountpoint;
    d.agent = std::make_unique<LockAgent>(d.opts.locks);
  }

  // Modes arrive from the kernel with the caller's umask applied already.
  ::umask(0);

  std::string fsname = "gate:" + d.opts.root;
  std::string escaped;
  for (char c : fsname) {
    if (c == ',' || c == '\\') escaped += '\\';
    escaped += c;
  }
  std::string mount_opts = "fsname=" + escaped + ",subtype=gate";
  if (d.opts.allow_other) mount_opts += ",allow_other,default_permissions";
  std::vector<std::string> argv_text{"gate", "-o", mount_opts};
  if (d.opts.debug_fuse) argv_text.push_back("-d");
  fuse_args args = FUSE_ARGS_INIT(0, nullptr);
  for (auto& a : argv_text) fuse_opt_add_arg(&args, a.c_str());

  d.se = fuse_session_new(&args, &Impl::operations(), sizeof(fuse_lowlevel_ops), &d);
  fuse_opt_free_args(&args);
  if (!d.se) return "could not start a FUSE session (is the fuse module loaded, /dev/fuse there?)";
  if (fuse_set_signal_handlers(d.se) != 0) return "could not install signal handlers";
  if (fuse_session_mount(d.se, d.opts.mountpoint.c_str()) != 0)
    return "could not mount " + d.opts.root + " at " + d.opts.mountpoint;
  d.mounted = true;
  return "";
}

void GateFs::start() {
  if (impl_->agent) impl_->agent->start();
}

int GateFs::serve() {
  Impl& d = *impl_;
  if (!d.se || !d.mounted) return 1;
  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(cfg, d.opts.max_threads);
  fuse_loop_cfg_set_idle_threads(cfg, d.opts.max_idle_threads);
  int r = fuse_session_loop_mt(d.se, cfg);
  fuse_loop_cfg_destroy(cfg);
  log(LogLevel::Info, "mount", "unmounting ", d.opts.mountpoint);
  // Waiters get EIO now and every held lock goes back before the mount disappears.
  if (d.agent) d.agent->stop();
  d.close_remaining_handles();
  fuse_session_unmount(d.se);
  d.mounted = false;
  fuse_remove_signal_handlers(d.se);
  fuse_session_destroy(d.se);
  d.se = nullptr;
  // libfuse reports the signal that ended the loop; that is a clean end too.
  return (r == 0 || r == SIGINT || r == SIGTERM || r == SIGHUP) ? 0 : 1;
}

}  // namespace gate::mount
