// GateFs: stale replacements (locking.md, "Stale replacement"): what each agent
// read, and the check at the open (O_TRUNC) or the rename that replaces a file.
#include <sys/stat.h>

#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

void GateFs::Impl::note_read(const Caller& who, const std::string& key, std::uint64_t version) {
  if (opts.stale_writes == StaleWrites::Off) return;
  reads.read(who.agent, key, version);
}

bool GateFs::Impl::refuse_stale(const Caller& who, const std::string& key, std::uint64_t version,
                                int fd, bool truncating) {
  if (opts.stale_writes != StaleWrites::Refuse) return false;
  if (!reads.stale(who.agent, key, version)) return false;
  struct stat st {};
  if (::fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
    return false;
  if (truncating && st.st_size == 0) return false;  // nothing there to lose
  const auto read = reads.reads(who.agent, key);
  reads.refused(who.agent, key);
  ++stale_refused;
  log(LogLevel::Info, "mount", "refused a stale replacement of ", key, " by ", who.agent, " (pid ",
      who.pid, ", ", who.command, ") with EBUSY: it read version ", read.front(),
      ", and the file has changed since (now version ", version,
      "); its next read counts as its new base");
  return true;
}

std::string GateFs::Impl::stale_summary() const {
  const char* policy = opts.stale_writes == StaleWrites::Refuse ? "refuse" : "off";
  return std::string(policy) + " refused=" + std::to_string(stale_refused.load());
}

}  // namespace gate::mount
