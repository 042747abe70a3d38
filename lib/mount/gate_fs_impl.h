#pragma once
// Inside GateFs (not a public header): the state a mount shares between its FUSE
// handlers, and the handlers themselves. gate_fs.cc holds the session, the lock
// plumbing and the operations table; gate_fs_changes.cc the calls that take locks
// (open, create and every change of names or attributes, as lock_policy.h says);
// gate_fs_io.cc the ones that take none (reads, writes, lookups, directories).
//
// Kernel guarantees the handlers rely on: an Inode stays while a request on it is in
// flight (the kernel holds its lookup count), so a handler may keep an Inode& until it
// replies, also on an act thread (LockAgent); a FileHandle stays until its release, which the
// kernel sends only after every call through that file has been answered.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "core/files.h"
#include "core/worker_pool.h"
#include "mount/gate_fs.h"
#include "mount/inode_table.h"
#include "mount/agent_resolver.h"
#include "mount/ignore_rules.h"
#include "mount/lock_agent.h"
#include "mount/lock_policy.h"
#include "mount/passthrough.h"
#include "mount/read_log.h"
#include "mount/source_watch.h"

namespace gate::mount {

// A merge put in place by a rename (GateFs::Impl::install_merge): the file, and the
// name (parent id, name) the kernel must look up again.
struct Installed {
  UniqueFd file;
  fuse_ino_t parent = 0;
  std::string name;
};

// One open file. fi->fh points at it from open/create until release.
struct FileHandle {
  ~FileHandle() {
    if (fd >= 0) ::close(fd);
  }
  // The daemon's own descriptor of the file. A read-only handle that goes straight
  // (its reads never reach the daemon) has none until a call needs one: see fd_of().
  std::atomic<int> fd{-1};
  std::string key;
  std::mutex m;
  std::shared_ptr<TrackedLock> lock;  // guarded by m; null when not locked (any more)
  std::atomic<bool> lost_logged{false};
  // Something was written, truncated, allocated or created through it: its
  // release gives the file a new version.
  std::atomic<bool> changed{false};
  std::uint64_t version = 0;  // the file's version when the lock was granted
  Caller who;                 // who opened it
  bool created = false;
  std::once_flag kept;        // the content before the first change is in the history
  // The kernel's id of the file, for cache invalidation only (it may be forgotten
  // by then): of the file now at the name when redirected.
  fuse_ino_t ino = 0;
  // Opened on the file that took the name of the one the kernel asked for (see
  // file_now_named()): what the kernel caches of that file is dropped at release.
  bool redirected = false;
  bool writer = false;  // counted in its Inode's writers
  // How the kernel does its I/O (GateFs::Impl::choose_io): through the page cache and
  // this daemon, straight from the file below (passthrough; reads and writes never
  // reach the daemon), or direct (through this daemon, never cached).
  enum class Io : std::uint8_t { Cached, Through, Direct } io = Io::Direct;
  fuse_ino_t io_ino = 0;  // Cached or Through: the kernel's inode it is counted in
  // A writer that went direct while others read the file straight: the file as it was
  // at its open (see GateFs::Impl::changed_below).
  std::optional<struct stat> mapped_from;
  // A stale replacement (--stale-writes merge): the agent's reads, merged at release,
  // and the content it replaced, read at the open (nullopt: from the history).
  std::vector<std::uint64_t> stale_reads;
  std::optional<std::string> theirs;
  // A merge installed by a rename (see merge_stale): the name the kernel is told to
  // look up again once the lock is back.
  Installed renamed;
};

struct DirHandle {
  ~DirHandle() {
    if (dp) ::closedir(dp);
  }
  DIR* dp = nullptr;
  off_t offset = 0;
  std::mutex m;  // one readdir at a time; dropped before replying
};

inline FileHandle* file_of(const fuse_file_info* fi) { return reinterpret_cast<FileHandle*>(fi->fh); }
inline DirHandle* dir_of(const fuse_file_info* fi) { return reinterpret_cast<DirHandle*>(fi->fh); }

// Logs, once per call, that the daemon ran out of descriptors (and what to do).
void log_fd_exhaustion(int err);

// "Until told otherwise": a day, as libfuse's passthrough_hp caches.
inline constexpr double kWatchedCacheTimeoutS = 86400.0;

struct GateFs::Impl {
  MountOptions opts;
  std::unique_ptr<InodeTable> inodes;
  std::unique_ptr<LockAgent> agent;  // null with locking off
  AgentResolver callers;             // who each request is for
  std::unique_ptr<HistoryStore> history;  // null: no history
  std::unique_ptr<IgnoreRules> ignore;
  std::atomic<bool> history_warned{false};
  std::mutex history_problem_m;
  std::string history_problem;  // the last one, for `gate status`
  ReadLog reads;                            // what each agent read, for stale replacements
  std::atomic<std::uint64_t> stale_refused{0}, stale_merged{0}, stale_conflicts{0};
  fuse_session* se = nullptr;
  bool mounted = false;
  Passthrough passthrough;  // reads straight from the files below, where the kernel can
  // READ and WRITE requests served (kPassthroughXattr)
  std::atomic<std::uint64_t> reads_served{0}, writes_served{0};
  // Runs the kernel notifications that take VFS locks (an entry's directory lock):
  // never on an act thread, where a wait for a lock a waiting caller holds could
  // leave no act thread for that caller's own call.
  WorkerPool notifier{1, "gate-notify"};
  // Off once the FUSE loop has ended: nobody reads the requests a notification may
  // then wait behind, so queued ones are dropped (the mount is going away anyway).
  std::atomic<bool> notifying{true};
  bool running_as_root = ::geteuid() == 0;
  // inotify on the source: what changes beside the mount is told to the kernel, so
  // it may cache names and attributes for long. Null: not watched.
  std::unique_ptr<SourceWatch> watch;

  explicit Impl(MountOptions o) : opts(std::move(o)) {}

  // ---- the kernel's caches ------------------------------------------------------

  // How long the kernel may keep a name or attributes: until told otherwise while
  // every directory is watched, else --attr-timeout-ms.
  double cache_timeout() const {
    return watch && watch->complete() ? kWatchedCacheTimeoutS : opts.cache_timeout_s;
  }
  // Whether an open may keep what the kernel caches of the file's content: yes when
  // the file (its size, mtime and ctime, and its version at the broker) is as it was
  // when that content was read or written through the mount. Records what it is now;
  // when it changed, the kernel's attributes of it go too.
  // `known`: the file's stat taken under its lock just before the open, if any (a
  // change after it only makes the next open's stamp differ).
  bool keep_cache_at_open(Inode& in, int fd, std::uint64_t version, const struct stat* known = nullptr);
  // After a handle wrote through the kernel: the kernel's cache is the file's content
  // now (`version`: the one its release makes). `changed_behind`: the daemon changed
  // it too (a merge), so the cache must not be kept.
  void note_cached_content(Inode& in, int fd, std::uint64_t version, bool changed_behind);
  // Tells the kernel what changed beside the mount (SourceWatch's thread).
  void on_source_changes(const std::vector<SourceWatch::Change>& changes, bool lost);
  // What the kernel caches of a file's content (or a directory's list) and its
  // attributes go, on the notifier thread.
  void forget_content(fuse_ino_t id);
  // fuse_lowlevel_notify_inval_entry, on the notifier thread (it takes the directory's
  // lock, which a caller waiting for this daemon may hold).
  void forget_entry(fuse_ino_t parent, const std::string& name);

  // Handlers may keep this reference until they reply (also on an act thread):
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
    // The reply, after the locks the call did not adopt are sent back to the broker
    // (a next call of the caller that finds them still held waits for them: LockAgent).
    std::function<void(int err)> reply;
  };

  // Takes the plan's locks for req, runs step.act, gives back the rest, then
  // step.reply: exactly once, on this thread (no locks) or on an act thread. `h`: the open
  // handle the call came through, whose lock a call on its key re-enters.
  // `who`: the caller when already known (else it is looked up here).
  void run_locked(fuse_req_t req, const LockPlan& plan, FileHandle* h, Step step,
                  const Caller* who = nullptr);

  // An open gets a fresh owner; a call for the call's length re-enters the lock of an
  // open handle on the same key (the caller's own first), so `touch` on an open
  // file does not wait for itself.
  std::string owner_for(const LockPlan& plan, const std::string& key, FileHandle* h, pid_t pid);
  void give_back(const std::vector<HeldLock>& held);

  // ---- history (best effort: never fails a call) ----------------------------------

  // Keeps the content of `key` at `version`, read through `fd` (any descriptor of
  // the file, O_PATH included), before a change replaces it.
  // `even_ignored`: also what the ignore rules leave out (a stale replacement's
  // merge needs it).
  void keep_before_change(const std::string& key, std::uint64_t version, int fd,
                          bool even_ignored = false);
  // The same for the file `name` in directory `dir_fd`, if it exists.
  void keep_named(const std::string& key, std::uint64_t version, int dir_fd, const std::string& name);
  // Before the first change through a handle.
  void keep_first_change(FileHandle* h);
  void record_made(const std::string& key, std::uint64_t version, const Caller& who,
                   const char* event);
  // Gives a handle's lock back to the broker (close, or flush with release-on-flush),
  // saying whether the handle changed the file and recording the version it made.
  // `event`: how the handle changed the file when not a plain write or create.
  void release_handle_lock(FileHandle* h, const std::shared_ptr<TrackedLock>& lock,
                           const char* event = nullptr);
  // A handle's stale replacement merged (if it was one), while h->fd is open and
  // before the lock goes back: the event to record (nullptr: none special).
  const char* settle_handle(FileHandle* h, const std::shared_ptr<TrackedLock>& lock);
  // The version `key` had when its lock in `held` was granted (0 if not there).
  static std::uint64_t version_in(const std::vector<HeldLock>& held, const std::string& key);

  // ---- stale replacements (locking.md) ------------------------------------------

  // `who` opened `key` at `version` for reading.
  void note_read(const Caller& who, const std::string& key, std::uint64_t version);
  // Whether `who`'s replacement of `key`, now at `version`, is stale: the agent's
  // reads if so, else nullopt (also with the policy off). `fd`: the file replaced
  // (any descriptor, O_PATH too); an O_TRUNC open replaces only a non-empty file.
  std::optional<std::vector<std::uint64_t>> stale_reads(const Caller& who, const std::string& key,
                                                        std::uint64_t version, int fd,
                                                        bool truncating);
  // Refuses it (--stale-writes refuse): logged and counted; the agent's next read
  // of `key` is its new base (until then its saves of `key` stay refused).
  void refuse_stale(const Caller& who, const std::string& key, std::uint64_t version,
                    const std::vector<std::uint64_t>& read);
  // Merges it (--stale-writes merge), before its lock goes back: the merge of
  // `theirs` (the content replaced, version `theirs_version`; nullopt: from the
  // history), the agent's read closest to what it wrote, and what it wrote (in the
  // file `mine_fd` is open on). With `installed`, the merge is a file of its own
  // renamed over `key` (see install_merge), so a crash half way leaves what was
  // there, never a mix; else, or where that cannot be, it is written over the
  // agent's file in place. A conflict (or what cannot be merged) leaves the agent's
  // content; both sides stay in the history, and `gate conflicts` lists it.
  // Answers the event to record: "merge", "conflict", or nullptr when the agent's
  // content already built on theirs.
  const char* merge_stale(const Caller& who, const std::string& key,
                          std::uint64_t theirs_version, std::optional<std::string> theirs,
                          const std::vector<std::uint64_t>& read, std::uint64_t new_version,
                          int mine_fd, fuse_ino_t ino, bool same_file, Installed* installed);
  // Writes `data` to a new file beside `key`, with the owner, mode and extended
  // attributes of the agent's file (`mine_fd`), and renames it over `key`; `same_file`:
  // `mine_fd` is the file at `key` (an O_TRUNC save), else the source of a rename.
  // 0 (*out filled), or an errno when the data could not be written (nothing
  // changed then); -1 when the file cannot be replaced by another here (several
  // links, a name that moved, attributes that do not copy): write in place then.
  int install_merge(int mine_fd, const std::string& key, const std::string& data, bool same_file,
                    Installed* out);
  // Tells the kernel to look up `at`'s name again. Only once the locks are back and
  // the call answered: the kernel takes the directory's lock for it.
  void forget_name(const Installed& at);
  // The stale check of a rename of p/nm onto the existing np/nn (key `target`),
  // under its locks: EBUSY when refused. When merging, the merge is renamed over
  // np/nn and p/nm removed: the rename is done then (*installed filled; the caller
  // has the kernel look np/nn up again after answering). Keeps the target's content
  // in the history either way.
  int settle_stale_rename(const Caller& who, Inode& p, const std::string& nm, Inode& np,
                          const std::string& nn, const std::string& target,
                          std::vector<HeldLock>& held, Installed* installed);
  std::string stale_summary() const;  // kStaleXattr's value
  // What the broker counts (HeldLock::stale) for a recorded event: "merged" for
  // "merge", "conflict" for "conflict", else "".
  static const char* stale_outcome(const char* event);

  // ---- helpers ----------------------------------------------------------------

  int entry_for(Inode& parent, const std::string& name, fuse_entry_param* e);

  // A step whose answer is a plain errno.
  static Step just(fuse_req_t req, std::function<int()> act);

  // A step that makes `name` in `parent` with `make` and answers its entry.
  Step new_entry(fuse_req_t req, Inode& parent, std::string name, std::function<int()> make);
  void reply_entry(fuse_req_t req, fuse_entry_param& e);
  void reply_attr(fuse_req_t req, int fd);

  // New objects belong to the caller, not to the daemon (when the daemon is root).
  void give_to_caller(int dirfd, const std::string& name, int fd, uid_t uid, gid_t gid);

  // Handles the kernel has not released yet: closed by serve() at the end, since an
  // unmount with files still open never sends their release.
  std::mutex open_files_mu;
  std::unordered_set<FileHandle*> open_files;
  void close_remaining_handles();
  void close_handle(FileHandle* h);
  bool write_refused(FileHandle* h);

  // ---- operations -------------------------------------------------------------

  void init(fuse_conn_info* conn);
  void lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
  void forget(fuse_req_t req, fuse_ino_t ino, uint64_t n);
  void forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets);
  void getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static int apply_setattr(int at, const struct stat& a, int valid, int fd);
  static AttrChange attr_change(int valid);
  void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi);
  void readlink(fuse_req_t req, fuse_ino_t ino);

  // mknod, mkdir and symlink: make the object under a write lock, answer its entry.
  void make_node(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev,
                 const char* link);
  void remove(fuse_req_t req, fuse_ino_t parent, const char* name, int flags);

  // renameat2, keeping the inode table's names in step.
  int rename_at(Inode& p, const std::string& nm, Inode& np, const std::string& nn, unsigned flags);
  void rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
              const char* newname, unsigned int flags);
  void link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname);

  // An open or create on its way: what the kernel asked, and the handle once made.
  struct Opening {
    fuse_file_info f;  // a copy: *fi lives only as long as the handler call
    std::string key;
    Caller who;
    FileHandle* h = nullptr;
    fuse_ino_t ino = 0;        // open only (create: entry.ino); see FileHandle::ino
    bool redirected = false;   // see FileHandle::redirected
    std::vector<std::uint64_t> stale_reads;  // a stale replacement, merged at release
    std::optional<std::string> theirs;       // see FileHandle::theirs
    bool created = false;      // create (a new name), not open
    bool keep_cache = false;   // the kernel's cache of the file is its content
    int backing_id = 0;        // FileHandle::Io::Through: the file below, at the kernel
    fuse_entry_param entry{};  // create only
  };

  // While an open waited for its lock, a rename (a temp file saved over the file)
  // or an unlink may have taken the file's name: what is read from or written to
  // the file the kernel named would then be lost. Answers -1 when the file still
  // has a name; else a descriptor (O_PATH) of what is now at `key` (the name the
  // lock is for), or -2 when nothing usable is there (the caller answers ESTALE, and
  // the kernel looks the name up again). *now: the stat of the file returned.
  int file_now_named(Inode& in, const std::string& key, struct stat* now);
  // The descriptor calls on `in` act on: in.fd, or the file now at its name when a
  // merge was renamed over it (Inode::superseded); `hold` keeps that one open.
  int live_fd(Inode& in, UniqueFd& hold);
  // openat2 of `key` (relative to the root) with `flags`, resolved beneath the root
  // and through no symlink; -1 with errno when it cannot.
  int open_beneath_root(const std::string& key, int flags);

  // The act of open and create: the new handle takes over the lock (kept until
  // release). `fd` < 0: the open failed with errno.
  // `fd` < 0: the open failed (errno), unless `deferred` (a reader that may go
  // straight opens its own descriptor only when it needs one).
  int adopt(Opening& o, int fd, std::vector<HeldLock>& held, bool deferred = false);
  // The handle's own descriptor, opened now (read-only, on its inode) for one that
  // went straight without it; -1 with errno set when it cannot be had.
  int fd_of(FileHandle* h);

  // How the kernel is to do the I/O of a new handle (FileHandle::io), counted in the
  // kernel's inode of it (`kin`: the one the kernel opened) until the handle's
  // release (end_io). Read-only handles go straight to the file below (passthrough)
  // when the kernel can, since the mount needs to see none of their I/O; a handle
  // that writes, or any while one of the inode's handles goes through the page cache,
  // stays with the daemon. The kernel fails an open through its cache of an inode
  // open straight (EIO), so a writer then goes direct, marked passthrough.
  void choose_io(Opening& o, Inode& kin);
  void end_io(FileHandle* h);
  // Whether the file of a writer that went direct beside straight readers changed
  // since its open (FileHandle::mapped_from): through a shared mapping, which writes
  // to the file below past the daemon.
  static bool changed_below(const FileHandle* h);
  // The reply of open and create. If the caller went away meanwhile (the reply
  // fails), everything is undone.
  void reply_open(fuse_req_t req, Opening& o, int err, bool created);
  void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  void create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
              fuse_file_info* fi);
  void read(fuse_req_t req, size_t size, off_t off, fuse_file_info* fi);
  void write_buf(fuse_req_t req, fuse_bufvec* in, off_t off, fuse_file_info* fi);
  void flush(fuse_req_t req, fuse_file_info* fi);
  void release(fuse_req_t req, fuse_file_info* fi);
  void fsync(fuse_req_t req, int datasync, fuse_file_info* fi);
  void fallocate(fuse_req_t req, int mode, off_t off, off_t len, fuse_file_info* fi);
  void lseek(fuse_req_t req, off_t off, int whence, fuse_file_info* fi);
  void copy_file_range(fuse_req_t req, off_t off_in, fuse_file_info* fi_in, off_t off_out,
                       fuse_file_info* fi_out, size_t len, int flags);
  void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
  static bool dot_or_dotdot(const char* name);
  void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi,
               bool plus);
  void releasedir(fuse_req_t req, fuse_file_info* fi);
  void fsyncdir(fuse_req_t req, int datasync, fuse_file_info* fi);
  void statfs(fuse_req_t req, fuse_ino_t ino);

  // getxattr/listxattr: size 0 asks for the length only.
  template <typename Call>
  void reply_xattr(fuse_req_t req, size_t size, Call call);
  void getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
  void listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
  void setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                int flags);
  void removexattr(fuse_req_t req, fuse_ino_t ino, const char* name);

  static const fuse_lowlevel_ops& operations();
};

}  // namespace gate::mount
