#include "mount/source_watch.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/files.h"
#include "core/log.h"
#include "core/worker_pool.h"

namespace gate::mount {

namespace {

// File systems whose inotify events cover every change to them: the local ones. Over
// NFS, SMB, 9p, FUSE or virtio-fs, another host's changes raise no event.
bool reports_every_change(long type) {
  switch (static_cast<unsigned long>(type)) {
    case 0xEF53:      // ext2, ext3, ext4
    case 0x58465342:  // xfs
    case 0x9123683E:  // btrfs
    case 0x01021994:  // tmpfs
    case 0xF2F52010:  // f2fs
    case 0x2FC12FC1:  // zfs
    case 0xCA451A4E:  // bcachefs
    case 0x52654973:  // reiserfs
    case 0x3153464A:  // jfs
    case 0x4D44:      // vfat
    case 0x2011BAB0:  // exfat
    case 0x7366746E:  // ntfs3
      return true;
    default:
      return false;
  }
}

constexpr std::uint32_t kMask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_MODIFY |
                                IN_ATTRIB | IN_CLOSE_WRITE | IN_ONLYDIR | IN_EXCL_UNLINK;

}  // namespace

std::unique_ptr<SourceWatch> SourceWatch::open(int source_fd, std::string* why) {
  struct statfs fs {};
  if (::fstatfs(source_fd, &fs) != 0) {
    *why = std::string("cannot tell its file system: ") + std::strerror(errno);
    return nullptr;
  }
  if (!reports_every_change(fs.f_type)) {
    char type[32];
    std::snprintf(type, sizeof type, "0x%lx", static_cast<unsigned long>(fs.f_type));
    *why = std::string("its file system (type ") + type +
           ") does not report every change to it (a network or FUSE file system)";
    return nullptr;
  }
  UniqueFd inotify(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!inotify) {
    *why = std::string("inotify: ") + std::strerror(errno);
    return nullptr;
  }
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) {
    *why = std::string("eventfd: ") + std::strerror(errno);
    return nullptr;
  }
  return std::unique_ptr<SourceWatch>(new SourceWatch(std::move(inotify), std::move(wake)));
}

SourceWatch::SourceWatch(UniqueFd inotify, UniqueFd wake)
    : inotify_(std::move(inotify)), wake_(std::move(wake)) {}

SourceWatch::~SourceWatch() { stop(); }

int SourceWatch::add(int dir_fd, ino_t ino, dev_t dev) {
  const std::string path = proc_path(dir_fd);
  const int wd = ::inotify_add_watch(inotify_.get(), path.c_str(), kMask);
  if (wd < 0) {
    const int err = errno;
    if (complete_.exchange(false))
      log(LogLevel::Warn, "mount", "cannot watch every directory of the source (", std::strerror(err),
          err == ENOSPC ? "; raise fs.inotify.max_user_watches" : "",
          "): names and attributes are cached for --attr-timeout-ms from now on");
    return -1;
  }
  std::lock_guard lock(m_);
  dirs_[wd] = {ino, dev};
  return wd;
}

void SourceWatch::remove(int id) {
  {
    std::lock_guard lock(m_);
    dirs_.erase(id);
  }
  ::inotify_rm_watch(inotify_.get(), id);
}

std::size_t SourceWatch::dirs() const {
  std::lock_guard lock(m_);
  return dirs_.size();
}

void SourceWatch::start(Handler handler) {
  handler_ = std::move(handler);
  thread_ = start_quiet_thread([this] { main(); });
}

void SourceWatch::stop() {
  if (!thread_.joinable()) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
  thread_.join();
}

void SourceWatch::main() {
  using Clock = std::chrono::steady_clock;
  alignas(inotify_event) char buf[64 * 1024];
  std::map<std::pair<int, std::string>, std::uint32_t> pending;  // (wd, name) -> mask
  bool lost = false;
  bool gathering = false;  // a batch has begun: it goes out when the source is quiet
  Clock::time_point first;
  for (;;) {
    int wait_ms = -1;
    if (gathering) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(first + kMaxDelay - Clock::now());
      wait_ms = static_cast<int>(std::max<long>(0, std::min<long>(kSettle.count(), left.count())));
    }
    pollfd fds[2] = {{inotify_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    const int ready = ::poll(fds, 2, wait_ms);
    if (ready < 0 && errno != EINTR) {
      log(LogLevel::Error, "mount", "watching the source stopped: poll: ", std::strerror(errno));
      return;
    }
    if (fds[1].revents) return;
    bool got = false;
    while (ready > 0 && (fds[0].revents & POLLIN)) {
      const ssize_t n = ::read(inotify_.get(), buf, sizeof buf);
      if (n <= 0) break;
      got = true;
      for (char* p = buf; p < buf + n;) {
        const auto* ev = reinterpret_cast<const inotify_event*>(p);
        p += sizeof(inotify_event) + ev->len;
        if (ev->mask & IN_Q_OVERFLOW) {
          lost = true;
        } else if (ev->mask & IN_IGNORED) {
          std::lock_guard lock(m_);
          dirs_.erase(ev->wd);
        } else {
          pending[{ev->wd, ev->len ? std::string(ev->name) : std::string()}] |= ev->mask;
        }
      }
    }
    if (got && !gathering) {
      gathering = true;
      first = Clock::now();
    }
    // Nothing yet, or still arriving within the longest delay: wait for more.
    if (!gathering || (got && Clock::now() < first + kMaxDelay)) continue;
    gathering = false;
    std::vector<Change> changes;
    changes.reserve(pending.size());
    {
      std::lock_guard lock(m_);
      for (auto& [at, mask] : pending) {
        auto dir = dirs_.find(at.first);
        if (dir != dirs_.end()) changes.push_back({dir->second.first, dir->second.second, at.second, mask});
      }
    }
    pending.clear();
    if (!changes.empty() || lost) {
      handler_(changes, std::exchange(lost, false));
      batches_.fetch_add(1, std::memory_order_release);
    }
  }
}

}  // namespace gate::mount
