// GateFs: what the mount keeps of replaced versions (HistoryStore), and when.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

std::uint64_t GateFs::Impl::version_in(const std::vector<HeldLock>& held, const std::string& key) {
  for (const HeldLock& l : held)
    if (l.key == key) return l.version;
  return 0;
}

void GateFs::Impl::keep_before_change(const std::string& key, std::uint64_t version, int fd,
                                      bool even_ignored) {
  if (!history || (!even_ignored && ignore->ignored(key))) return;
  // A descriptor of our own to read from: `fd` may be O_PATH or write-only.
  int in = ::open(proc_path(fd).c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (in < 0) return;  // not a readable file (a FIFO, a socket, gone): nothing to keep
  Status st = history->keep(key, version, in, wall_clock_micros());
  ::close(in);
  if (st.ok()) return;
  {
    std::lock_guard guard(history_problem_m);
    history_problem = format_iso8601(wall_clock_micros()).substr(0, 19) + "Z " + st.message();
  }
  // Said once at warning level (a full disk says it on every change), then quietly.
  const bool first = !history_warned.exchange(true);
  log(first ? LogLevel::Warn : LogLevel::Debug, "mount", "history: ", st.message(),
      first ? " (history is best effort: files are served as usual; later misses are logged at debug level)"
            : "");
}

void GateFs::Impl::keep_named(const std::string& key, std::uint64_t version, int dir_fd,
                              const std::string& name) {
  if (!history) return;
  int fd = ::openat(dir_fd, name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return;  // nothing there to replace
  keep_before_change(key, version, fd);
  ::close(fd);
}

void GateFs::Impl::keep_first_change(FileHandle* h) {
  if (!history) return;
  std::call_once(h->kept, [this, h] { keep_before_change(h->key, h->version, h->fd); });
}

void GateFs::Impl::record_made(const std::string& key, std::uint64_t version, const Caller& who,
                               const char* event) {
  reads.forget(who.agent, key);  // its own change: its reads of the key start afresh
  if (!history || ignore->ignored(key)) return;
  Status st = history->made(key, version, wall_clock_micros(), {who.agent, who.pid, who.command}, event);
  if (!st.ok()) log(LogLevel::Debug, "mount", "history: ", st.message());
}

}  // namespace gate::mount
