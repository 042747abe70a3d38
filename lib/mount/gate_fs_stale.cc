// GateFs: stale replacements (locking.md, "Stale replacement"): what each agent
// read, the check at the open (O_TRUNC) or the rename that replaces a file, and what
// the policy does then: refuse it, or merge it before its lock goes back.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "core/files.h"
#include "core/log.h"
#include "mount/gate_fs_impl.h"
#include "mount/merge.h"

namespace gate::mount {

namespace {

// Makes `data` the whole content of `fd`.
bool replace_content(int fd, const std::string& data) {
  return write_all_at(fd, data) && ::ftruncate(fd, static_cast<off_t>(data.size())) == 0;
}

}  // namespace

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
                                      std::uint64_t new_version, int mine_fd, fuse_ino_t ino) {
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
    int out = ::open(proc_path(mine_fd).c_str(), O_WRONLY | O_CLOEXEC);
    const bool written = out >= 0 && replace_content(out, m.text);
    const int err = errno;
    if (!written && out >= 0 && !replace_content(out, *mine))
      log(LogLevel::Error, "mount", "could not put back what ", who.agent, " wrote to ", key,
          " after a failed merge; it is in the history (gate conflicts ", key, ")");
    if (out >= 0) ::close(out);
    if (!written) why = std::string("the merge could not be written: ") + std::strerror(err);
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
  const char* event = merge_stale(h->who, h->key, h->version, std::nullopt, h->stale_reads,
                                  lock->lock.fence, h->fd, h->ino);
  h->stale_reads.clear();
  return event;
}

int GateFs::Impl::settle_stale_rename(const Caller& who, Inode& p, const std::string& nm, Inode& np,
                                      const std::string& nn, const std::string& target,
                                      std::vector<HeldLock>& held) {
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
  // Merged into the file about to be renamed, so the name never shows the unmerged
  // content.
  int src = ::openat(p.fd, nm.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (src < 0) return 0;  // the rename will say why
  struct stat st {};
  if (::fstat(src, &st) == 0 && S_ISREG(st.st_mode)) {
    const char* event = merge_stale(who, target, version, std::move(theirs), *stale,
                                    mine ? mine->fence : 0, src, inodes->find(st.st_ino, st.st_dev));
    if (mine) mine->stale = stale_outcome(event);
  }
  ::close(src);
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
