#pragma once
// GateFs: a FUSE passthrough of a source directory in which every open holds a
// broker lock until its last close, as ../../shared/docs/locking.md ("What the
// mount locks") says:
//   open read-only -> read lock; open for writing, O_TRUNC, O_APPEND, create ->
//   write lock; both held until the handle's release (or flush, when asked);
//   setattr, xattr changes, unlink, mkdir, rmdir, mknod -> write lock for the call,
//   re-entering an open handle's lock on the same key; rename, link, symlink ->
//   write locks on both keys in sorted order.
// Calls the kernel makes under inode or directory locks (every metadata change and
// the create of a new name) wait at most --meta-wait-ms, then fail with EBUSY; opens
// of existing names, sent with no inode lock held, wait their turn (README table).
// A FUSE worker never waits for the broker (see LockAgent); Ctrl-C ends a wait with
// EINTR. Names are resolved only with *at() calls on O_PATH fds and O_NOFOLLOW,
// so nothing the mount is asked to do reaches outside the source directory.
//
// Use: mount() (reports errors), optionally daemonize, start(), serve() until
// unmounted or SIGINT/SIGTERM; the destructor unmounts and releases every lock.
#include <memory>
#include <optional>
#include <string>

#include "core/status.h"
#include "mount/history_store.h"
#include "mount/lock_agent.h"

struct fuse_session;

namespace gate::mount {

// What the mount does with a stale replacement: a save over a file that another
// agent changed after this agent read it (locking.md, "Stale replacement").
enum class StaleWrites {
  Off,     // nothing (the history still keeps what was replaced)
  Refuse,  // EBUSY at the open (O_TRUNC) or the rename; nothing changes
  Merge,   // three-way merge at the release (or the rename); needs the history
};

struct MountOptions {
  std::string root;        // source directory
  std::string mountpoint;  // where it shows
  bool locking = true;     // off only for benchmarks (--no-locking)
  LockAgentOptions locks;
  bool release_on_flush = false;  // GATE_RELEASE_ON_FLUSH=1
  bool allow_other = false;       // adds default_permissions
  // How long the kernel may cache attributes and names when the source is not
  // watched; a watched source (watch_source, a local file system) is cached until a
  // change is seen (kWatchedCacheTimeoutS).
  double cache_timeout_s = 1.0;
  bool watch_source = true;
  unsigned max_threads = 64;      // FUSE workers; none ever waits for a lock
  unsigned max_idle_threads = 16;
  bool debug_fuse = false;
  // History of replaced versions (needs locking: versions come from the broker).
  // Empty dir: no history.
  HistoryOptions history;
  bool history_git_rules = true;  // leave out what the repository's rules ignore
  StaleWrites stale_writes = StaleWrites::Off;  // needs locking (versions)
  // Read-only handles read straight from the files below (FUSE passthrough), where
  // the kernel allows it (Linux 6.9+, CAP_SYS_ADMIN); --no-passthrough says no.
  bool passthrough = true;
  // Also handles that write a file their open created or truncated, unless a stale
  // replacement (--passthrough-writes). Their writes are then not refused once their
  // lock is lost (locking.md asks EIO).
  bool passthrough_writes = false;
};

// Read on the root of a view (getxattr), this attribute writes out the view's
// history index and answers the history's directory; `gate history` uses it.
inline constexpr const char* kHistoryXattr = "user.gate.history";
// Read on the root of a view: the history's last problem (a full disk, a file over
// the cap...), for `gate status`; no such attribute while there has been none.
inline constexpr const char* kHistoryProblemXattr = "user.gate.history.problem";
// Read on the root of a view: the stale-replacement policy and what it did so far,
// "<policy> refused=<n> merged=<n> conflicts=<n>", for `gate status`.
inline constexpr const char* kStaleXattr = "user.gate.stale";
// Read on the root of a view: "on opens=<n> files=<f> handles=<h> reads=<r> writes=<w>"
// while opens go straight to the files below (FUSE passthrough): <n> of them so far,
// <f> files registered with the kernel for it now, <h> handles the kernel has not
// released yet, and the daemon served <r> READ and <w> WRITE requests; else the same
// with "off" and ": <why>" at the end.
inline constexpr const char* kPassthroughXattr = "user.gate.passthrough";
// Read on the root of a view: "on dirs=<d> batches=<b>" while the directory below is
// watched for changes beside the mount (<d> directories watched now, <b> batches of
// changes told to the kernel so far), "partial ..." when a directory could not be
// watched (names and attributes then last --attr-timeout-ms), "off" when not watched.
inline constexpr const char* kWatchXattr = "user.gate.watch";

class GateFs {
 public:
  explicit GateFs(MountOptions options);
  ~GateFs();
  GateFs(const GateFs&) = delete;
  GateFs& operator=(const GateFs&) = delete;

  // Opens the source and mounts it.
  Status mount();
  // Starts background threads (heartbeats). Call after any fork.
  void start();
  // Serves requests until unmounted or signalled (SIGINT, SIGTERM, SIGHUP), then
  // ends every wait, releases every lock and unmounts. Returns 0 on a clean end.
  int serve();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace gate::mount
