// GateFs: stale replacements (locking.md, "Stale replacement"): what each agent
// read, the check at the open (O_TRUNC) or the rename that replaces a file, and what
// the policy does then: refuse it, or merge it before its lock goes back.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "core/files.h"
#include "core/log.h"
#include "mount/gate_fs_impl.h"
#include "mount/merge.h"

namespace gate::mount {

namespace {

// Test only: GATE_TEST_FAULT=kill-mid-merge makes the mount kill itself (SIGKILL)
// half way through writing a merge, as a crash would; the tests check what is left.
bool kill_mid_merge() {
  static const bool on = [] {
    const char* f = std::getenv("GATE_TEST_FAULT");
    return f && std::string_view(f) == "kill-mid-merge";
  }();
  return on;
}

// Writes `data` to `fd` from its start.
bool write_merge(int fd, std::string_view data) {
  if (!kill_mid_merge()) return write_all_at(fd, data);
  const std::size_t half = data.size() / 2;
  if (!write_all_at(fd, data.substr(0, half))) return false;
  ::raise(SIGKILL);
  return write_all_at(fd, data.substr(half), static_cast<off_t>(half));
}

// Makes `data` the whole content of `fd`.
bool replace_content(int fd, const std::string& data) {
  return write_merge(fd, data) && ::ftruncate(fd, static_cast<off_t>(data.size())) == 0;
}

// Gives `to` the owner, mode and extended attributes (ACLs among them) of `from`
// (stat `st`); false when one does not copy.
bool copy_identity(int from, int to, const struct stat& st) {
  if ((st.st_uid != ::geteuid() || st.st_gid != ::getegid()) && ::fchown(to, st.st_uid, st.st_gid) != 0)
    return false;
  if (::fchmod(to, st.st_mode & 07777) != 0) return false;  // after chown, which drops set-id bits
  const std::string path = proc_path(from);
  ssize_t n = ::listxattr(path.c_str(), nullptr, 0);
  if (n < 0) return errno == ENOTSUP;
  std::string names(static_cast<std::size_t>(n), '\0');
  n = ::listxattr(path.c_str(), names.data(), names.size());
  if (n < 0) return false;
  names.resize(static_cast<std::size_t>(n));
  for (std::size_t at = 0; at < names.size(); at = names.find('\0', at) + 1) {
    const char* name = names.c_str() + at;
    ssize_t len = ::getxattr(path.c_str(), name, nullptr, 0);
    if (len < 0) return false;
    std::string value(static_cast<std::size_t>(len), '\0');
    len = ::getxattr(path.c_str(), name, value.data(), value.size());
    if (len < 0 || ::fsetxattr(to, name, value.data(), static_cast<std::size_t>(len), 0) != 0)
      return false;
  }
  return true;
}

}  // namespace

int GateFs::Impl::install_merge(int mine_fd, const std::string& key, const std::string& data,
                                bool same_file, Installed* out) {
  struct stat st {};
  if (::fstat(mine_fd, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  // Another name for the same file would keep the agent's content.
  if (same_file && st.st_nlink != 1) return -1;
  const auto slash = key.rfind('/');
  const std::string name = slash == std::string::npos ? key : key.substr(slash + 1);
  UniqueFd dir(slash == std::string::npos
                   ? ::fcntl(inodes->root().fd, F_DUPFD_CLOEXEC, 0)
                   : open_beneath_root(key.substr(0, slash), O_PATH | O_DIRECTORY | O_CLOEXEC));
  struct stat named {}, dir_st {};
  if (!dir || ::fstatat(dir.get(), name.c_str(), &named, AT_SYMLINK_NOFOLLOW) != 0 ||
      ::fstat(dir.get(), &dir_st) != 0)
    return -1;
  if (same_file && (named.st_ino != st.st_ino || named.st_dev != st.st_dev)) return -1;
  // Unnamed while it is written (O_TMPFILE): a crash leaves nothing behind. Where the
  // file system cannot, a hidden name beside the file.
  static std::atomic<unsigned> serial{0};
  const std::string temp = ".gate-merge-" + std::to_string(::getpid()) + "-" + std::to_string(++serial);
  bool named_temp = false;
  UniqueFd file(::openat(dir.get(), ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (!file && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    file.reset(::openat(dir.get(), temp.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600));
    named_temp = true;
  }
  if (!file) return errno == ENOSPC || errno == EDQUOT ? errno : -1;
  // What the agent wrote: its owner, mode and attributes are the file's from now on.
  if (!copy_identity(mine_fd, file.get(), st)) {
    if (named_temp) ::unlinkat(dir.get(), temp.c_str(), 0);
    return -1;
  }
  // From the rename on, what the kernel still asks of the agent's file goes to the
  // one at the name (see live_fd()). Its table entry stays while this runs: the
  // kernel holds the inode through the release (until its reply), the flush or the
  // rename that got here, so no FORGET can free it.
  if (fuse_ino_t old = inodes->find(st.st_ino, st.st_dev)) inode(old).superseded = true;
  if (!write_merge(file.get(), data) ||
      (!named_temp && ::linkat(AT_FDCWD, proc_path(file.get()).c_str(), dir.get(), temp.c_str(),
                               AT_SYMLINK_FOLLOW) != 0) ||
      ::renameat(dir.get(), temp.c_str(), dir.get(), name.c_str()) != 0) {
    const int err = errno;
    ::unlinkat(dir.get(), temp.c_str(), 0);  // if it was given its name
    return err;
  }
  out->parent = dir_st.st_ino == inodes->root().src_ino && dir_st.st_dev == inodes->root().src_dev
                    ? FUSE_ROOT_ID
                    : inodes->find(dir_st.st_ino, dir_st.st_dev);
  out->name = name;
  out->file = std::move(file);
  return 0;
}

void GateFs::Impl::forget_name(const Installed& at) {
  // Until then the kernel's entry names the file replaced; calls through it act on
  // the new one (live_fd(), file_now_named()), and this ends even that.
  // It waits for the directory's lock, which the renaming process holds until this
  // call is answered, and which others may hold while they wait for a lock here.
  forget_entry(at.parent, at.name);
}

void GateFs::Impl::note_read(const Caller& who, const std::string& key, std::uint64_t version) {
  if (opts.stale_writes == StaleWrites::Off) return;
  reads.read(who.agent, key, version);
}

std::optional<std::vector<std::uint64_t>> GateFs::Impl::stale_reads(const Caller& who,
                                                                    const std::string& key,
                                                                    std::uint64_t version, int fd,
                                                                    bool truncating) {
  if (opts.stale_writes == StaleWrites::Off || !reads.stale(who.agent, key, version))
    return std::nullopt;
  struct stat st {};
  if (::fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
    return std::nullopt;
  if (truncating && st.st_size == 0) return std::nullopt;  // nothing there to lose
  auto read = reads.reads(who.agent, key);
  if (read.empty()) return std::nullopt;
  return read;
}

void GateFs::Impl::refuse_stale(const Caller& who, const std::string& key, std::uint64_t version,
                                const std::vector<std::uint64_t>& read) {
  reads.refused(who.agent, key);
  ++stale_refused;
  log(LogLevel::Info, "mount", "refused a stale replacement of ", key, " by ", who.agent, " (pid ",
      who.pid, ", ", who.command, ") with EBUSY: it read version ", read.front(),
      ", and the file has changed since (now version ", version,
      "); its next read counts as its new base");
}

const char* GateFs::Impl::merge_stale(const Caller& who, const std::string& key,
                                      std::uint64_t theirs_version, std::optional<std::string> theirs,
                                      const std::vector<std::uint64_t>& read,
                                      std::uint64_t new_version, int mine_fd, fuse_ino_t ino,
                                      bool same_file, Installed* installed) {
  if (!history) return nullptr;  // merge is not offered without the history
  const std::uint64_t cap = history->options().max_file_bytes;
  StaleSave rec{.key = key, .version = new_version, .theirs = theirs_version,
                .at = wall_clock_micros(), .by = {who.agent, who.pid, who.command}};
  std::string why;
  auto mine = read_file(proc_path(mine_fd), cap + 1);
  if (!mine) why = "what it wrote could not be read back";
  else if (mine->size() > cap) why = "the file is over --history-max-file";
  if (why.empty() && !theirs) theirs = history->content_of(key, theirs_version);
  if (why.empty() && (!theirs || theirs->size() > cap))
    why = "the version it replaced was not kept";
  // The base: of the versions the agent read, the one closest to what it wrote.
  std::optional<std::string> base;
  if (why.empty()) {
    std::size_t best = SIZE_MAX;
    for (std::uint64_t v : read) {
      auto c = v == theirs_version ? theirs : history->content_of(key, v);
      if (!c) continue;
      const std::size_t d = changed_lines(*c, *mine);
      if (!base || d < best) {  // any kept read beats none (binary: no line count)
        best = d;
        base = std::move(c);
        rec.base = v;
      }
    }
    if (!base) why = "no version it read is kept";
  }
  // Built on the current content after all (an edit after a fresh read): its own.
  if (why.empty() && *base == *theirs) return nullptr;
  MergeResult m;
  if (why.empty()) {
    m = merge3(*base, *theirs, *mine);
    if (m.kind != MergeResult::Kind::Clean) why = m.why;
  }
  // What the agent wrote is kept as it was, merged or not.
  if (mine) {
    if (auto blob = history->keep_data(*mine, rec.at); blob.ok()) rec.mine = *blob;
    else log(LogLevel::Warn, "mount", "history: the agent's own content of ", key, " was not kept: ", blob.message());
  }
  if (why.empty() && m.text != *mine) {
    // By a rename, so a crash half way leaves either content, never a mix.
    int err = installed ? install_merge(mine_fd, key, m.text, same_file, installed) : -1;
    if (err < 0) {
      // In place (a file that cannot be replaced by another): what it wrote is put
      // back on failure.
      int out = ::open(proc_path(mine_fd).c_str(), O_WRONLY | O_CLOEXEC);
      const bool written = out >= 0 && replace_content(out, m.text);
      err = written ? 0 : errno;
      if (!written && out >= 0 && !replace_content(out, *mine))
        log(LogLevel::Error, "mount", "could not put back what ", who.agent, " wrote to ", key,
            " after a failed merge; it is in the history (gate conflicts ", key, ")");
      if (out >= 0) ::close(out);
    }
    if (err) why = std::string("the merge could not be written: ") + std::strerror(err);
    // The kernel's idea of the size is the agent's: drop it (attributes only, which
    // takes no lock the kernel may hold while it waits for this call).
    else if (se && ino) fuse_lowlevel_notify_inval_inode(se, ino, -1, 0);
  }
  rec.merged = why.empty();
  rec.reason = why;
  if (Status st = history->record_stale(rec); !st.ok())
    log(LogLevel::Warn, "mount", "history: ", st.message());
  if (rec.merged) {
    ++stale_merged;
    log(LogLevel::Info, "mount", "merged a stale replacement of ", key, " by ", who.agent, " (pid ",
        who.pid, ", ", who.command, "): its read of version ", rec.base, " with version ",
        theirs_version, " (now version ", new_version, ")");
    return "merge";
  }
  ++stale_conflicts;
  log(LogLevel::Warn, "mount", "a stale replacement of ", key, " by ", who.agent, " (pid ", who.pid,
      ", ", who.command, ") was installed as written: ", why, "; the version it replaced (",
      theirs_version, ") stays in the history (gate conflicts ", key, "; gate show ", key, "@",
      theirs_version, ")");
  return "conflict";
}

const char* GateFs::Impl::settle_handle(FileHandle* h, const std::shared_ptr<TrackedLock>& lock) {
  if (!h->changed || h->stale_reads.empty() || h->fd < 0) return nullptr;
  Installed at;
  const char* event = merge_stale(h->who, h->key, h->version, std::move(h->theirs), h->stale_reads,
                                  lock->lock.fence, h->fd, h->ino, true, &at);
  h->stale_reads.clear();
  h->theirs.reset();
  if (at.file) {
    // The handle goes on with the file now at the name: writes after a flush must
    // not go to the one replaced.
    const int access = ::fcntl(h->fd, F_GETFL) & (O_ACCMODE | O_APPEND | O_DIRECT | O_SYNC | O_DSYNC);
    UniqueFd again(::open(proc_path(at.file.get()).c_str(), access | O_CLOEXEC));
    if (again) ::dup3(again.get(), h->fd, O_CLOEXEC);
    h->renamed = std::move(at);
  }
  return event;
}

int GateFs::Impl::settle_stale_rename(const Caller& who, Inode& p, const std::string& nm, Inode& np,
                                      const std::string& nn, const std::string& target,
                                      std::vector<HeldLock>& held, Installed* installed) {
  const std::uint64_t version = version_in(held, target);
  int dst = ::openat(np.fd, nn.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (dst < 0) return 0;  // nothing there to replace
  auto stale = stale_reads(who, target, version, dst, false);
  HeldLock* mine = nullptr;
  for (HeldLock& l : held)
    if (l.key == target) mine = &l;
  if (stale && opts.stale_writes == StaleWrites::Refuse) {
    ::close(dst);
    refuse_stale(who, target, version, *stale);
    if (mine) mine->stale = "refused";
    return EBUSY;
  }
  std::optional<std::string> theirs;
  if (stale && history) theirs = read_file(proc_path(dst), history->options().max_file_bytes + 1);
  keep_before_change(target, version, dst, stale.has_value());
  ::close(dst);
  if (!stale || opts.stale_writes != StaleWrites::Merge) return 0;
  // The merge takes the target's name in the agent's stead (then the agent's file
  // goes, as the rename would have taken it), so the name never shows the unmerged
  // content, and a crash half way leaves the target as it was and the agent's file.
  UniqueFd src(::openat(p.fd, nm.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  struct stat st {};
  if (!src || ::fstat(src.get(), &st) != 0 || !S_ISREG(st.st_mode)) return 0;  // the rename says why
  const char* event = merge_stale(who, target, version, std::move(theirs), *stale, mine ? mine->fence : 0,
                                  src.get(), inodes->find(st.st_ino, st.st_dev), false, installed);
  if (mine) mine->stale = stale_outcome(event);
  if (installed->file) {
    if (::unlinkat(p.fd, nm.c_str(), 0) != 0)
      log(LogLevel::Warn, "mount", "the merge of ", target, " is in place, but ", inodes->child_key(p, nm),
          " could not be removed: ", std::strerror(errno));
    inodes->moved(st.st_ino, st.st_dev, np, nn);
  }
  return 0;
}

const char* GateFs::Impl::stale_outcome(const char* event) {
  if (!event) return "";
  if (std::strcmp(event, "merge") == 0) return "merged";
  if (std::strcmp(event, "conflict") == 0) return "conflict";
  return "";
}

std::string GateFs::Impl::stale_summary() const {
  const char* policy = opts.stale_writes == StaleWrites::Refuse  ? "refuse"
                       : opts.stale_writes == StaleWrites::Merge ? "merge"
                                                                 : "off";
  return std::string(policy) + " refused=" + std::to_string(stale_refused.load()) +
         " merged=" + std::to_string(stale_merged.load()) +
         " conflicts=" + std::to_string(stale_conflicts.load());
}

}  // namespace gate::mount
