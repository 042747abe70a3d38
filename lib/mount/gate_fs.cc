// GateFs: the FUSE session, the lock plumbing every locked call goes through, and
// the table of operations.
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
#include <cerrno>
#include <climits>
#include <cstring>

#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

void log_fd_exhaustion(int err) {
  if (err == EMFILE || err == ENFILE)
    log(LogLevel::Error, "mount", "out of file descriptors (", std::strerror(err),
        "); raise the limit (ulimit -n) or close files");
}

void GateFs::Impl::run_locked(fuse_req_t req, const LockPlan& plan, FileHandle* h, Step step,
                              const Caller* who) {
  if (!agent || plan.locks.empty()) {
    std::vector<HeldLock> none;
    int err = step.act(none);
    step.reply(err);
    return;
  }
  const Caller caller = who ? *who : callers.resolve(fuse_req_ctx(req)->pid);
  auto finish = [this, step = std::move(step), changes = plan.changes, event = plan.name,
                 caller](int err, std::vector<HeldLock>& held) {
    if (!err) err = step.act(held);
    if (!err)
      for (HeldLock& l : held) {
        l.changed = std::find(changes.begin(), changes.end(), l.key) != changes.end();
        if (l.changed) record_made(l.key, l.fence, caller, event);
      }
    give_back(held);
    held.clear();
    step.reply(err);
  };
  auto job = std::make_shared<LockJob>();
  for (const KeyLock& l : plan.locks)
    job->needs.push_back({l.key, l.mode, owner_for(plan, l.key, h, caller.tid)});
  job->pid = caller.tid;
  job->process = caller.pid;
  job->agent = caller.agent;
  job->command = caller.command;
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

std::string GateFs::Impl::owner_for(const LockPlan& plan, const std::string& key, FileHandle* h, pid_t pid) {
  if (plan.span == Span::Handle) return agent->new_owner();
  if (h && h->key == key) {
    std::lock_guard lock(h->m);
    if (h->lock && !h->lock->lost) return h->lock->lock.owner;
  }
  if (auto owner = agent->owner_holding(key, pid)) return *owner;
  return agent->new_owner();
}

void GateFs::Impl::give_back(const std::vector<HeldLock>& held) {
  if (agent && !held.empty()) agent->release(held);
}

int GateFs::Impl::entry_for(Inode& parent, const std::string& name, fuse_entry_param* e) {
  std::memset(e, 0, sizeof(*e));
  Inode* found = nullptr;
  int err = inodes->lookup(parent, name.c_str(), &e->attr, &found);
  if (err) return err;
  e->ino = inodes->id(*found);
  e->attr_timeout = cache_timeout();
  e->entry_timeout = cache_timeout();
  return 0;
}

GateFs::Impl::Step GateFs::Impl::just(fuse_req_t req, std::function<int()> act) {
  return {[act = std::move(act)](std::vector<HeldLock>&) { return act(); },
          [req](int err) { fuse_reply_err(req, err); }};
}

GateFs::Impl::Step GateFs::Impl::new_entry(fuse_req_t req, Inode& parent, std::string name, std::function<int()> make) {
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

void GateFs::Impl::reply_entry(fuse_req_t req, fuse_entry_param& e) {
  if (fuse_reply_entry(req, &e) != 0) inodes->forget(inode(e.ino), 1);
}

void GateFs::Impl::reply_attr(fuse_req_t req, int fd) {
  struct stat st;
  if (::fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
    fuse_reply_err(req, errno);
    return;
  }
  fuse_reply_attr(req, &st, cache_timeout());
}

void GateFs::Impl::give_to_caller(int dirfd, const std::string& name, int fd, uid_t uid, gid_t gid) {
  if (!running_as_root || (uid == 0 && gid == 0)) return;
  struct stat dir;
  if (::fstat(dirfd, &dir) == 0 && (dir.st_mode & S_ISGID)) gid = static_cast<gid_t>(-1);
  int r = fd >= 0 ? ::fchown(fd, uid, gid)
                  : ::fchownat(dirfd, name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW);
  if (r < 0)
    log(LogLevel::Debug, "mount", "could not give ", name, " to uid ", uid, ": ",
        std::strerror(errno));
}

void GateFs::Impl::close_remaining_handles() {
  std::vector<FileHandle*> left;
  {
    std::lock_guard guard(open_files_mu);
    left.assign(open_files.begin(), open_files.end());
  }
  for (FileHandle* h : left) close_handle(h);
}

void GateFs::Impl::close_handle(FileHandle* h) {
  {
    std::lock_guard guard(open_files_mu);
    open_files.erase(h);
  }
  std::shared_ptr<TrackedLock> lock;
  {
    std::lock_guard guard(h->m);
    lock = std::move(h->lock);
  }
  if (!h->changed && changed_below(h)) h->changed = true;
  const char* event = lock ? settle_handle(h, lock) : nullptr;
  // What it wrote through the kernel's cache is what the kernel caches (unless a merge
  // changed the file since): the next open may keep that. Written past the cache,
  // the next open must not.
  if (h->changed && !h->redirected && h->ino && h->fd >= 0)
    note_cached_content(inode(h->ino), h->fd, lock ? lock->lock.fence : 0,
                        event != nullptr || h->io != FileHandle::Io::Cached);
  if (h->writer) --inode(h->ino).writers;
  end_io(h);
  // Data reaches the source before the next holder can get in.
  if (h->fd >= 0) ::close(h->fd);
  h->fd = -1;
  if (lock) release_handle_lock(h, lock, event);
  delete h;
}

void GateFs::Impl::release_handle_lock(FileHandle* h, const std::shared_ptr<TrackedLock>& lock,
                                       const char* event) {
  if (!agent) return;
  // Changed behind the kernel's cache of the file (see FileHandle::redirected):
  // attributes only, which takes no lock the kernel may hold.
  if (h->changed && h->redirected && se && h->ino) fuse_lowlevel_notify_inval_inode(se, h->ino, -1, 0);
  if (h->changed)
    record_made(h->key, lock->lock.fence, h->who, event ? event : h->created ? "create" : "write");
  agent->release_tracked(lock, h->changed, stale_outcome(event));
  if (h->renamed.file) forget_name(std::exchange(h->renamed, {}));
}

bool GateFs::Impl::write_refused(FileHandle* h) {
  std::lock_guard guard(h->m);
  if (!h->lock || !h->lock->lost) return false;
  if (!h->lost_logged.exchange(true))
    log(LogLevel::Error, "mount", "write to ", h->key, " refused with EIO: its lock (",
        h->lock->lock.lock_id, ") was lost: ", h->lock->lost_reason);
  return true;
}

void GateFs::Impl::init(fuse_conn_info* conn) {
  auto want = [conn](unsigned cap) {
    if (conn->capable & cap) conn->want |= cap;
  };
#if !defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer requests and replies go by read and writev instead: it
  // sees the kernel's ordering of them (a release comes after every reply on its
  // handle) through those calls, not through splice.
  want(FUSE_CAP_SPLICE_WRITE);
  want(FUSE_CAP_SPLICE_MOVE);
  want(FUSE_CAP_SPLICE_READ);
#else
  conn->want &= ~(FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_SPLICE_READ);
#endif
  want(FUSE_CAP_PARALLEL_DIROPS);
  want(FUSE_CAP_ATOMIC_O_TRUNC);
  // The kernel checks POSIX ACLs itself (with default_permissions, which this turns
  // on) and caches them with the attributes, so `ls -l`'s ACL probe of every file
  // is no round trip. They are dropped whenever the attributes are: a change beside
  // the mount is seen as any other (a watched directory's inval, or the timeout).
  // Modes still arrive with the umask applied (the mount never asks for DONT_MASK).
  want(FUSE_CAP_POSIX_ACL);
  // Watched, the mount itself tells the kernel when a file's content changed beside
  // it (and the kernel's mtime, which the mount's own writes change, decides
  // nothing: else the first read after a write would find its cache dropped). Not
  // watched, the kernel drops a file's cached content when it sees a new mtime.
  if (watch && watch->complete()) conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  else want(FUSE_CAP_AUTO_INVAL_DATA);
  // Locks stay exact only if the kernel does not answer from a write-back cache.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  passthrough.ask_in_init_reply();
  conn->max_write = 1u << 20;  // libfuse lowers it to what its buffer holds
  conn->max_background = 64;
}


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
  impl_->notifying = false;
  if (impl_->watch) impl_->watch->stop();
  if (impl_->agent) impl_->agent->stop();
  impl_->notifier.stop();
  if (impl_->se) {
    if (impl_->mounted) fuse_session_unmount(impl_->se);
    fuse_remove_signal_handlers(impl_->se);
    fuse_session_destroy(impl_->se);
  }
}

Status GateFs::mount() {
  Impl& d = *impl_;
  int root_fd = ::open(d.opts.root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0)
    return Status::failure("cannot open the source directory " + d.opts.root + ": " + std::strerror(errno));
  struct stat st;
  if (::fstat(root_fd, &st) < 0) {
    int err = errno;
    ::close(root_fd);
    return Status::failure("cannot stat the source directory " + d.opts.root + ": " + std::strerror(err));
  }
  d.inodes = std::make_unique<InodeTable>(root_fd, st);
  d.inodes->set_backing_closer([&d](int id) { d.passthrough.close_backing(id); });
  if (d.opts.watch_source) {
    std::string why;
    d.watch = SourceWatch::open(root_fd, &why);
    if (d.watch)
      d.inodes->set_watcher(d.watch.get());
    else
      log(LogLevel::Info, "mount", "not watching ", d.opts.root, ": ", why,
          "; names and attributes are cached for --attr-timeout-ms (", d.opts.cache_timeout_s, " s)");
  }
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
  if (!d.se) return Status::failure("could not start a FUSE session (is the fuse module loaded, /dev/fuse there?)");
  if (fuse_set_signal_handlers(d.se) != 0) return Status::failure("could not install signal handlers");
  if (fuse_session_mount(d.se, d.opts.mountpoint.c_str()) != 0)
    return Status::failure("could not mount " + d.opts.root + " at " + d.opts.mountpoint);
  d.mounted = true;
  d.passthrough.want(d.opts.passthrough);
  std::string why;
  if (!d.passthrough.install<Impl>(d.se, &why))
    log(LogLevel::Warn, "mount", "files are read through the daemon: ", why);
  else if (!why.empty())
    log(LogLevel::Info, "mount", "files are read through the daemon: passthrough ", why);
  return {};
}

void GateFs::start() {
  Impl& d = *impl_;
  if (d.agent) d.agent->start();
  d.notifier.start();
  if (d.watch)
    d.watch->start([&d](const std::vector<SourceWatch::Change>& changes, bool lost) {
      d.on_source_changes(changes, lost);
    });
  // Opened here, after any fork: neither its connection nor its writer thread
  // should cross one. Requests are served only from serve() on.
  if (d.agent && !d.opts.history.dir.empty()) {
    auto store = HistoryStore::open(d.opts.history);
    if (store.ok()) {
      d.history = std::move(store).value();
      d.history->start();
      d.ignore = std::make_unique<IgnoreRules>(d.opts.root, d.opts.history_git_rules);
      log(LogLevel::Info, "mount", "keeping the history of replaced versions in ",
          d.opts.history.dir,
          d.ignore->has_repository() ? " (leaving out .git/ and what the repository ignores)"
                                     : " (leaving out .git/)");
    } else {
      log(LogLevel::Warn, "mount", "no history of replaced versions: ", store.message(),
          "; files are served as usual");
    }
  }
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
  d.notifying = false;
  if (d.watch) d.watch->stop();
  // Waiters get EIO now and every held lock goes back before the mount disappears.
  if (d.agent) d.agent->stop();
  d.close_remaining_handles();
  d.notifier.stop();
  fuse_session_unmount(d.se);
  d.mounted = false;
  fuse_remove_signal_handlers(d.se);
  fuse_session_destroy(d.se);
  d.se = nullptr;
  // libfuse reports the signal that ended the loop; that is a clean end too.
  return (r == 0 || r == SIGINT || r == SIGTERM || r == SIGHUP) ? 0 : 1;
}

}  // namespace gate::mount
