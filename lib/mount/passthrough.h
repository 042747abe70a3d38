#pragma once
// Passthrough: FUSE passthrough (Linux 6.9 and later, CONFIG_FUSE_PASSTHROUGH) on
// libfuse 3.14, which predates it. The kernel then reads a file opened this way
// straight from the file below, as if the view were not there: no READ request
// reaches the daemon, and no copy of the data passes through it.
//
// libfuse 3.14 cannot ask for it, but it lets the daemon do the device's reads and
// writes itself (fuse_session_custom_io). Through that, this class
//   - notes whether the kernel's INIT request offers passthrough;
//   - adds the capability (FUSE_PASSTHROUGH, max_stack_depth) to the INIT reply;
//   - registers a file below with the kernel (FUSE_DEV_IOC_BACKING_OPEN, which needs
//     CAP_SYS_ADMIN) and marks the OPEN or CREATE reply that uses it
//     (FOPEN_PASSTHROUGH and the backing id).
// Which reply to mark is told by the thread that sends it (ReplyThrough), since
// libfuse writes a reply on the thread that calls fuse_reply_*.
//
// The kernel's rules, which the caller keeps (GateFs::Impl::choose_io):
//   - all passthrough opens of one inode at one time use one backing id;
//   - an inode is never open in passthrough and through the page cache at once (the
//     second open fails with EIO); a direct-io open goes with either;
//   - a backing id is closed only once no open uses it: the kernel looks it up after
//     the OPEN reply, in the opener's call, and opens the file below anew for each
//     open, with the open's flags (so the registration itself may be O_PATH).
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>

namespace gate::mount {

class Passthrough {
 public:
  // Whether to try at all (gate mount --no-passthrough says no). Call before install().
  void want(bool on) { wanted_ = on; }

  // Takes over the session's device reads and writes, after fuse_session_mount.
  // Does nothing (and says why in *why) when passthrough cannot work here: not
  // wanted, or not CAP_SYS_ADMIN. False only when libfuse refused the custom io.
  // The session's userdata is an Owner, whose member `passthrough` this is.
  template <typename Owner>
  bool install(fuse_session* se, std::string* why) {
    static const fuse_custom_io io = [] {
      fuse_custom_io c{};
      c.read = [](int fd, void* buf, size_t len, void* owner) {
        return static_cast<Owner*>(owner)->passthrough.read(fd, buf, len);
      };
      c.writev = [](int fd, struct iovec* iov, int count, void* owner) {
        return static_cast<Owner*>(owner)->passthrough.writev(fd, iov, count);
      };
      c.splice_receive = &Passthrough::splice;
      c.splice_send = &Passthrough::splice;
      return c;
    }();
    return install_io(se, io, why);
  }

  // The custom io's calls (see install()).
  ssize_t read(int fd, void* buf, size_t len);
  ssize_t writev(int fd, struct iovec* iov, int count);

  // From the init callback: the INIT reply this thread sends next asks for
  // passthrough, if the kernel offered it.
  void ask_in_init_reply();

  // Whether opens may go through: the kernel agreed and no registration failed for
  // want of the right to.
  bool on() const { return asked_.load(std::memory_order_relaxed) && !refused_.load(std::memory_order_relaxed); }
  // Why not (for the log and `gate status`), when !on().
  std::string why_off() const;

  // Registers the file `path_fd` (O_PATH) is on, on device `dev`, with the kernel: its
  // backing id (> 0), or 0 when it cannot go straight. A refusal for want of rights
  // turns passthrough off; one that every file of the device would get turns it off
  // for the device (both logged).
  int open_backing(int path_fd, dev_t dev);
  // Once no open uses `id` any more.
  void close_backing(int id);

  // Marks the OPEN or CREATE reply this thread sends while it lives.
  class ReplyThrough {
   public:
    explicit ReplyThrough(int backing_id);
    ~ReplyThrough();
    ReplyThrough(const ReplyThrough&) = delete;
    ReplyThrough& operator=(const ReplyThrough&) = delete;
  };

  // How many opens went through (for `gate status` and the tests).
  std::uint64_t opens() const { return opens_.load(std::memory_order_relaxed); }
  void count_open() { opens_.fetch_add(1, std::memory_order_relaxed); }
  // How many files are registered now.
  std::int64_t registered() const { return registered_.load(std::memory_order_relaxed); }

 private:
  bool install_io(fuse_session* se, const fuse_custom_io& io, std::string* why);
  static ssize_t splice(int fdin, off_t* offin, int fdout, off_t* offout, size_t len,
                        unsigned flags, void*) {
    return ::splice(fdin, offin, fdout, offout, len, flags);
  }

  bool wanted_ = true;
  bool installed_ = false;
  int dev_fd_ = -1;
  std::string not_installed_;              // why install() did nothing
  std::atomic<bool> offered_{false};       // the kernel's INIT offered passthrough
  std::atomic<bool> init_seen_{false};
  std::atomic<bool> asked_{false};         // the INIT reply asked for it
  std::atomic<bool> refused_{false};       // a registration was refused (EPERM...)
  std::atomic<std::uint64_t> opens_{0};
  std::atomic<std::int64_t> registered_{0};
  std::atomic<bool> no_o_path_{false};     // the kernel wants an open file, not O_PATH
  std::mutex m_;
  std::unordered_set<dev_t> refused_devs_;  // guarded by m_
};

}  // namespace gate::mount
