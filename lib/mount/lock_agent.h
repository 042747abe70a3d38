#pragma once
// LockAgent: everything the mount says to the broker.
//
// Threads (all started and joined by the agent; none per request):
// - one broker thread (BrokerLoop) carries every broker call that is not answered at
//   once, without blocking: waiting acquires, late answers, the answers to releases,
//   heartbeats. A thousand waiting opens are a thousand idle sockets on that thread.
// - kActThreads "act" threads run the `done` of each job that had to go to the broker
//   thread (the file system call under the locks, and the reply to the kernel), so
//   that the broker thread never waits on that work. `done` must not wait on the
//   broker or on another job, and must not call into the kernel's VFS of this mount
//   (notify calls take directory locks that a waiting process may hold): the mount
//   hands those to its own notifier thread.
// A FUSE worker (or act thread) spends at most kTryPatience (5 ms) on the broker for
// one try or release. The common case, answered in well under a millisecond, is
// finished on the caller's thread, `done` included, with no hand-over between
// threads. Whatever takes longer, and every wait, goes on on the broker thread, so a
// slow or stopped broker never holds the mount's workers.
//
// - A LockJob asks for one or more locks (already in the order they must be taken).
//   Each is first asked for without waiting (timeout 0), on the caller's thread; the
//   first that cannot be granted now is asked for again as a waiting acquire, and so
//   are the rest, on the broker thread.
// - A job marked `under_kernel_locks` (setattr, rename, unlink, create, ...: the
//   kernel holds inode or directory locks while it waits for the mount) waits at
//   most LockAgentOptions::meta_wait, then fails with EBUSY, leaves the broker's
//   queue and logs who held the key. A holder of that key may need those very
//   kernel locks to finish (every write() takes the file's inode lock), and the
//   broker cannot see them, so a longer wait could freeze both for good.
// - LockJob::interrupt() (a FUSE interrupt, Ctrl-C) ends a wait at once: the wait's
//   connection is closed, which also takes the request out of the broker's queue,
//   and the job finishes with EINTR.
// - A release waits at most kTryPatience for the broker's answer, then goes on
//   without the caller. Until the answer comes, the lock still counts as its holder's: an acquire of the same key by the same process that
//   the broker calls a deadlock waits for that release instead (release_in_flight).
// - Locks that outlive a call (open handles) are tracked and heartbeaten at a third
//   of the lease, one after the other; one the broker no longer knows is marked lost.
// - Retries: BrokerLoop re-sends a call once on a fresh connection when a kept-alive
//   one turns out closed; a queued wait that loses the broker tries again every
//   200 ms for reconnect_window (a restarted broker keeps its queue that long, and the
//   request_id re-attaches). Nothing else retries.
// - State: a job's progress is touched by the thread that called run() until it hands
//   the job over, then only on the broker thread (and by `done`, after it). jobs_m_
//   guards the list of jobs in progress; track_m_ the tracked locks and the releases
//   in flight; a job's m_ its call in flight, against interrupt(). None of them is
//   held while another is taken, nor while calling out.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "client/broker_client.h"
#include "client/broker_loop.h"
#include "core/lock_mode.h"
#include "core/worker_pool.h"
#include "mount/reconnect.h"

namespace gate::mount {
class Delegation;
}

namespace gate::mount {

class LockAgent;

struct LockNeed {
  std::string key;
  LockMode mode = LockMode::Write;
  std::string owner;
};

struct HeldLock {
  std::string key;
  LockMode mode = LockMode::Write;
  std::string lock_id;
  std::string owner;
  std::uint64_t fence = 0;
  std::uint64_t version = 0;  // the key's content version at the grant
  bool changed = false;       // the holder changed the content (said at release)
  std::string stale;          // what a stale replacement under it got (said at release)
  pid_t pid = 0;              // the thread it was taken for (its broker session)
};

struct LockAgentOptions {
  BrokerEndpoint broker;
  std::string mount_id;  // session = "<mount_id>:<pid>"
  // What this mount shows, the same across its processes ("<host>:<mountpoint>"): a
  // broker restarted with its space lent to this view's last process, unheard from
  // when this one asks, ends that delegation 0.5 s after its restart
  // (docs/delegation.md).
  std::string view;
  std::int64_t lease_ms = defaults::kLeaseMs;
  std::optional<std::int64_t> max_hold_ms;
  std::optional<std::int64_t> acquire_timeout_ms;  // nullopt: wait until granted
  // How long a queued wait keeps retrying while the broker is unreachable (a
  // restart keeps queued requests for a grace period; request_id re-attaches).
  std::chrono::milliseconds reconnect_window{defaults::kRestoreGraceMs};
  // The longest wait of a job under kernel locks (see above); 0: never wait.
  std::chrono::milliseconds meta_wait{defaults::kMetaWaitMs};
  // Ask the broker to lend this mount its lock space while it is the only client
  // (Delegation): locks are then taken in-process until another client asks.
  bool delegation = true;
  // Where the mount shows; lets a wait be refused when the caller itself holds the
  // file open through an inherited descriptor (`sh -c 'cat f >> f'`: the shell opened
  // f, its child cat waits for it), which per-pid sessions cannot see.
  std::string mountpoint;
};

// One request's locks. Create with std::make_shared, fill the public fields, run.
class LockJob {
 public:
  std::vector<LockNeed> needs;  // taken in this order
  pid_t pid = 0;                // the calling thread, as the kernel says (the session)
  pid_t process = 0;            // its process, the agent and command: who it is for
  std::string agent;            // (sent to the broker, shown by `gate locks`)
  std::string command;
  bool nonblocking = false;     // O_NONBLOCK: never wait, EAGAIN instead
  // The kernel holds inode/directory locks during this call: wait at most
  // meta_wait, then EBUSY.
  bool under_kernel_locks = false;
  const char* op = "open";  // the FUSE operation, for log lines
  // Called once: err 0 with every lock in `held`, or an errno with nothing held.
  std::function<void(LockJob& job, int err)> done;

  std::vector<HeldLock> held;

  // Thread-safe, callable at any time (also before or after the wait).
  void interrupt();
  bool interrupted() const { return interrupted_.load(); }

 private:
  friend class LockAgent;
  std::atomic<LockAgent*> agent_{nullptr};
  std::mutex m_;                    // guards call_ against interrupt()
  BrokerLoop::CallId call_ = 0;     // the acquire in flight, 0: none
  std::atomic<bool> interrupted_{false};
  // The broker thread's own:
  std::vector<std::string> request_ids_;
  std::chrono::steady_clock::time_point started_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  bool waiting_ = false;            // past the first, non-waiting try
  bool awaiting_release_ = false;   // parked until a release of its key comes back
  bool park_any_ = false;           // ... of anyone's (O_NONBLOCK), else its own process's
  std::uint64_t parks_ = 0;         // how often parked (a timer acts on its own park only)
  std::optional<Reconnect> reconnect_;
  int in_flight_retries_ = 0;
  std::uint64_t epoch_ = 0;         // release_epoch() when the acquire went out
  bool finished_ = false;
};

// Shared between an open handle and the broker thread (heartbeats).
struct TrackedLock {
  HeldLock lock;  // lock.pid: the thread whose open took it
  std::atomic<bool> lost{false};
  std::string lost_reason;  // set before `lost` becomes true
  bool releasing = false;   // guarded by LockAgent::track_m_
};

class LockAgent {
 public:
  explicit LockAgent(LockAgentOptions options);
  ~LockAgent();
  LockAgent(const LockAgent&) = delete;
  LockAgent& operator=(const LockAgent&) = delete;

  // Starts the threads (after daemonizing: fork keeps no threads).
  void start();
  // Ends every wait (jobs finish with EIO), releases every tracked lock (waiting up
  // to a few seconds for the answers), stops the threads. Idempotent.
  void stop();

  // Hands the job over and returns at once; its `done` runs on an act thread.
  void run(const std::shared_ptr<LockJob>& job);

  // Sends the releases and returns; failures are logged, never fatal (the lease
  // frees the lock at the broker anyway).
  void release(const std::vector<HeldLock>& locks);
  void release(const HeldLock& lock);

  std::shared_ptr<TrackedLock> track(HeldLock lock, pid_t pid);
  // Stops heartbeating and releases the lock at the broker; false when it was no
  // longer tracked (released already, e.g. by stop()). Until the broker has it
  // back, the lock still counts as this process's (see release_in_flight).
  // `changed`: the handle changed the file's content (a new version).
  // `stale`: what a stale replacement through the handle got (HeldLock::stale).
  bool release_tracked(const std::shared_ptr<TrackedLock>& tracked, bool changed = false,
                       const std::string& stale = "");

  // The owner token to re-enter for a metadata call by `pid` on `key`: that of a
  // handle `pid` opened, or of any handle on `key` when `pid` holds the file open
  // through an inherited descriptor; nullopt when the call must take its own lock.
  std::optional<std::string> owner_holding(const std::string& key, pid_t pid) const;

  std::string new_owner() const;
  const LockAgentOptions& options() const { return options_; }
  std::size_t waiting_jobs() const;
  // Whether the broker's lock space is lent to this mount now (Delegation).
  bool delegated() const;

 private:
  friend class LockJob;
  static constexpr std::size_t kActThreads = 4;

  // LockJob::interrupt(): ends the job's call in flight, or wakes it where it is parked.
  void interrupt(LockJob* job, BrokerLoop::CallId call);

  // with_id: with the need's request_id (a typed try goes without).
  AcquireRequest make_request(LockJob& job, std::size_t index, std::optional<std::int64_t> timeout_ms,
                              bool with_id = true) const;
  static const std::string& request_id_of(LockJob& job, std::size_t index);
  // Outcome of one acquire as an errno (0 granted, -1 "would wait").
  int classify(const CallResult& r, const LockJob& job, std::size_t index, bool try_once) const;
  // How long a FUSE worker (or act thread) waits for the broker's answer to a try
  // or a release before the broker thread takes over.
  static constexpr std::chrono::microseconds kTryPatience{5000};
  // The steps of a job. `here`: on the thread that called run(), before any hand-over;
  // otherwise on the broker thread.
  void send(const std::shared_ptr<LockJob>& job, std::optional<std::int64_t> timeout_ms);
  // Handles a try's answer; true when the next lock is to be tried now. Otherwise the
  // job has finished or gone on to wait.
  bool tried(const std::shared_ptr<LockJob>& job, const CallResult& r, bool here);
  void on_try(const std::shared_ptr<LockJob>& job, const CallResult& r);
  // Runs fn on the broker thread: posted when `here`, else at once.
  void on_loop(bool here, std::function<void()> fn);
  // A try would wait: refuses (time is up, or the caller waits for itself) or waits.
  void to_wait(const std::shared_ptr<LockJob>& job, bool here);
  void send_wait(const std::shared_ptr<LockJob>& job);
  void on_wait(const std::shared_ptr<LockJob>& job, const CallResult& r);
  // Parks the job until the releases of its key it must wait for have come back
  // (any_process: anyone's, else its own process's), then asks again.
  void await_release(const std::shared_ptr<LockJob>& job, bool any_process);
  bool parked_for(const LockJob& job, const std::string& key) const;
  void resume(const std::shared_ptr<LockJob>& job);
  void releases_came_back(const std::string& key);
  // Finishes a job under kernel locks that could not get its next lock in time with
  // EBUSY, logging who held the key (asked of the broker before the reply frees the
  // kernel).
  void give_up_busy(const std::shared_ptr<LockJob>& job);
  // Ends the job: err 0 with its locks, or an errno (its locks go back first). Its
  // `done` runs here when `here`, else on an act thread. Once per job.
  void finish(const std::shared_ptr<LockJob>& job, int err, bool here);
  // When the job must give up waiting (acquire time-out, meta_wait); nullopt: never.
  std::optional<std::chrono::steady_clock::time_point> deadline_of(const LockJob& job) const;
  bool waits_for_itself(const LockJob& job, std::size_t index) const;
  // Whether `pid` has `key` open (a descriptor, its own or inherited) or mapped.
  bool process_has_open(pid_t pid, const std::string& key) const;
  // The broker's "deadlock" for a process whose lock on `key` is on its way back: a
  // handle it has closed (close() returns before the kernel's RELEASE reaches the
  // mount, which is sent in the background), or a release whose answer has not come
  // yet. A process that writes a file and opens it again at once finds its old lock
  // still there. Not a deadlock: the release is on its way. It may also have come
  // back between the broker's answer and this check: `epoch_before` is
  // release_epoch() from before the acquire was sent, and any release since counts
  // as possibly this one.
  bool release_in_flight(const LockJob& job, std::size_t index, std::uint64_t epoch_before) const;
  // releases_out_'s key for one process's releases of `key`.
  static std::string release_of(const std::string& key, pid_t pid);
  // How many releases have come back so far (for release_in_flight).
  std::uint64_t release_epoch() const;
  // Whether a handle `pid` opened holds `key`, or a release of `pid`'s lock on `key`
  // is out. track_m_ held.
  bool release_pending(const std::string& key, pid_t pid) const;
  bool any_release_out(const std::string& key) const;
  // Sends a release; `then` runs on the broker thread when its answer is in.
  void send_release(const HeldLock& lock, std::function<void()> then = {});
  void heartbeat_round();
  void heartbeat_next(std::shared_ptr<std::vector<std::shared_ptr<TrackedLock>>> locks, std::size_t i);

  LockAgentOptions options_;
  std::atomic<bool> stopping_{false};
  BrokerLoop loop_;
  WorkerPool acts_;
  std::shared_ptr<Delegation> delegation_;  // null: every call goes to the broker

  // Jobs in progress (for stop() and interrupts).
  mutable std::mutex jobs_m_;
  std::unordered_map<LockJob*, std::shared_ptr<LockJob>> jobs_;
  // The broker thread's own: jobs parked until a release of their key comes back.
  std::unordered_multimap<std::string, std::shared_ptr<LockJob>> awaiting_release_;
  std::atomic<std::size_t> parked_{0};
  std::atomic<std::size_t> waiting_count_{0};

  mutable std::mutex track_m_;
  std::uint64_t release_epoch_ = 0;  // releases come back (track_m_)
  // Releases not yet answered, by key and by release_of(key, pid).
  std::unordered_map<std::string, int> releases_out_;
  std::unordered_map<TrackedLock*, std::shared_ptr<TrackedLock>> tracked_;
  std::unordered_multimap<std::string, TrackedLock*> by_key_;
};

}  // namespace gate::mount
