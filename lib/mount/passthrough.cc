#include "mount/passthrough.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/fuse.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "core/files.h"
#include "core/log.h"

namespace gate::mount {

namespace {

// What Linux 6.9 added to the protocol (7.40), past the headers Debian 12 ships.
constexpr std::uint64_t kFusePassthrough = 1ull << 37;  // INIT flags, in flags2
constexpr std::uint32_t kFopenPassthrough = 1u << 7;    // fuse_open_out.open_flags
constexpr std::uint32_t kInitExt = 1u << 30;            // FUSE_INIT_EXT
constexpr std::uint32_t kWritebackCache = 1u << 16;     // FUSE_WRITEBACK_CACHE

struct BackingMap {
  std::int32_t fd;
  std::uint32_t flags;
  std::uint64_t padding;
};
constexpr unsigned long kBackingOpen = _IOW(229, 1, BackingMap);
constexpr unsigned long kBackingClose = _IOW(229, 2, std::uint32_t);

// fuse_init_out's first unused word became max_stack_depth, and fuse_open_out's
// padding backing_id.
constexpr std::size_t kMaxStackDepthAt = offsetof(fuse_init_out, unused);
constexpr std::size_t kBackingIdAt = offsetof(fuse_open_out, padding);
static_assert(sizeof(fuse_init_out) == 64 && kMaxStackDepthAt == 36);
static_assert(sizeof(fuse_open_out) == 16 && kBackingIdAt == 12);

// The reply this thread sends next, if it is one to change.
struct Pending {
  enum Kind : std::uint8_t { None, Init, Open } kind = None;
  std::int32_t backing_id = 0;
};
thread_local Pending t_pending;

bool has_sys_admin() {
  __user_cap_header_struct head{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &head, data) != 0) return false;
  return (data[CAP_SYS_ADMIN / 32].effective & (1u << (CAP_SYS_ADMIN % 32))) != 0;
}

// Writes iov with its payload (iov[1]) replaced by `payload`.
ssize_t write_patched(int fd, struct iovec* iov, const void* payload) {
  struct iovec out[2] = {iov[0], {const_cast<void*>(payload), iov[1].iov_len}};
  return ::writev(fd, out, 2);
}

}  // namespace

bool Passthrough::install_io(fuse_session* se, const fuse_custom_io& io, std::string* why) {
  if (!wanted_) {
    not_installed_ = "turned off (--no-passthrough)";
  } else if (!has_sys_admin()) {
    not_installed_ = "the mount runs without CAP_SYS_ADMIN, which the kernel asks of it";
  } else {
    const int fd = fuse_session_fd(se);
    if (const int r = fuse_session_custom_io(se, &io, fd); r != 0) {
      not_installed_ = std::string("libfuse refused its device calls: ") + std::strerror(-r);
      if (why) *why = not_installed_;
      return false;
    }
    dev_fd_ = fd;
    installed_ = true;
  }
  if (why) *why = not_installed_;
  return true;
}

ssize_t Passthrough::read(int fd, void* buf, size_t len) {
  const ssize_t n = ::read(fd, buf, len);
  if (n >= static_cast<ssize_t>(sizeof(fuse_in_header) + offsetof(fuse_init_in, unused)) &&
      !init_seen_.load(std::memory_order_relaxed)) {
    fuse_in_header in;
    std::memcpy(&in, buf, sizeof in);
    if (in.opcode == FUSE_INIT) {
      fuse_init_in init;
      std::memset(&init, 0, sizeof init);
      std::memcpy(&init, static_cast<const char*>(buf) + sizeof in,
                  std::min(sizeof init, static_cast<size_t>(n) - sizeof in));
      const std::uint64_t flags =
          init.flags | ((init.flags & kInitExt) ? static_cast<std::uint64_t>(init.flags2) << 32 : 0);
      offered_ = (flags & kFusePassthrough) != 0;
      init_seen_ = true;
    }
  }
  return n;
}

ssize_t Passthrough::writev(int fd, struct iovec* iov, int count) {
  const Pending p = std::exchange(t_pending, Pending{});
  if (p.kind == Pending::None || count != 2 || iov[0].iov_len != sizeof(fuse_out_header))
    return ::writev(fd, iov, count);
  fuse_out_header head;
  std::memcpy(&head, iov[0].iov_base, sizeof head);
  if (head.error != 0) return ::writev(fd, iov, count);

  if (p.kind == Pending::Init && iov[1].iov_len == sizeof(fuse_init_out)) {
    fuse_init_out out;
    std::memcpy(&out, iov[1].iov_base, sizeof out);
    const std::uint64_t flags =
        out.flags | ((out.flags & kInitExt) ? static_cast<std::uint64_t>(out.flags2) << 32 : 0);
    // The kernel takes passthrough only without the write-back cache (the mount
    // never asks for that one).
    if (flags & kWritebackCache) return ::writev(fd, iov, count);
    out.flags |= kInitExt;
    out.flags2 |= static_cast<std::uint32_t>(kFusePassthrough >> 32);
    // The file system below may be stacked once itself (overlayfs); FUSE then stops
    // anything from stacking on the view, which nobody does.
    const std::uint32_t depth = 2;
    std::memcpy(reinterpret_cast<char*>(&out) + kMaxStackDepthAt, &depth, sizeof depth);
    const ssize_t n = write_patched(fd, iov, &out);
    if (n > 0) asked_ = true;
    return n;
  }
  if (p.kind == Pending::Open && iov[1].iov_len >= sizeof(fuse_open_out)) {
    // An OPEN reply is a fuse_open_out; a CREATE reply a fuse_entry_out, then one.
    char payload[sizeof(fuse_entry_out) + sizeof(fuse_open_out)];
    if (iov[1].iov_len > sizeof payload) return ::writev(fd, iov, count);
    std::memcpy(payload, iov[1].iov_base, iov[1].iov_len);
    char* open_out = payload + iov[1].iov_len - sizeof(fuse_open_out);
    fuse_open_out o;
    std::memcpy(&o, open_out, sizeof o);
    o.open_flags |= kFopenPassthrough;
    std::memcpy(&o.padding, &p.backing_id, sizeof p.backing_id);
    std::memcpy(open_out, &o, sizeof o);
    return write_patched(fd, iov, payload);
  }
  return ::writev(fd, iov, count);
}

void Passthrough::ask_in_init_reply() {
  if (installed_ && offered_) t_pending = {Pending::Init, 0};
}

std::string Passthrough::why_off() const {
  if (!installed_) return not_installed_;
  if (!offered_) return "the kernel does not offer it (Linux 6.9 or later with CONFIG_FUSE_PASSTHROUGH)";
  if (!asked_) return "the kernel's INIT could not be answered with it";
  if (refused_) return "the kernel refused to register a file";
  return "";
}

int Passthrough::open_backing(int path_fd, dev_t dev) {
  if (!on()) return 0;
  {
    std::lock_guard lock(m_);
    if (refused_devs_.count(dev)) return 0;
  }
  int id = -1;
  int err = 0;
  if (!no_o_path_.load(std::memory_order_relaxed)) {
    BackingMap map{path_fd, 0, 0};
    id = ::ioctl(dev_fd_, kBackingOpen, &map);
    err = errno;
    // Before Linux 6.14 the kernel takes no O_PATH descriptor: a read-only one, then.
    if (id < 0 && err == EBADF) no_o_path_ = true;
  }
  if (id < 0 && no_o_path_.load(std::memory_order_relaxed)) {
    const int fd = ::open(proc_path(path_fd).c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      log(LogLevel::Debug, "mount", "a file is read through the daemon: cannot open it to register it (",
          std::strerror(errno), ")");
      return 0;
    }
    BackingMap map{fd, 0, 0};
    id = ::ioctl(dev_fd_, kBackingOpen, &map);
    err = errno;
    ::close(fd);
  }
  if (id > 0) {
    registered_.fetch_add(1, std::memory_order_relaxed);
    return id;
  }
  if (err == EPERM || err == ENOTTY) {
    // No right to (a mount in a user namespace), or no passthrough after all: every
    // file would be refused alike.
    if (!refused_.exchange(true))
      log(LogLevel::Info, "mount", "files are read through the daemon from now on: the kernel "
          "refused to register one for passthrough (", std::strerror(err), ")");
  } else if (err == ELOOP || err == EOPNOTSUPP) {
    // A file system below stacked too deep (ELOOP), or one whose files cannot be read
    // this way: every file of it would be refused alike. (EINVAL and EISDIR are about
    // one file: not a regular one.)
    std::lock_guard lock(m_);
    if (refused_devs_.insert(dev).second)
      log(LogLevel::Info, "mount", "files on device ", major(dev), ":", minor(dev),
          " are read through the daemon: the kernel refused to register one for passthrough (",
          std::strerror(err), ")");
  } else {
    log(LogLevel::Debug, "mount", "a file is read through the daemon: the kernel refused to register it (",
        std::strerror(err), ")");
  }
  return 0;
}

void Passthrough::close_backing(int id) {
  const std::uint32_t backing = static_cast<std::uint32_t>(id);
  if (::ioctl(dev_fd_, kBackingClose, &backing) != 0)
    log(LogLevel::Warn, "mount", "could not close backing file ", id, ": ", std::strerror(errno));
  else
    registered_.fetch_sub(1, std::memory_order_relaxed);
}

Passthrough::ReplyThrough::ReplyThrough(int backing_id) { t_pending = {Pending::Open, backing_id}; }
Passthrough::ReplyThrough::~ReplyThrough() { t_pending = {}; }

}  // namespace gate::mount
