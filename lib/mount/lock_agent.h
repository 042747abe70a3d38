#pragma once
// LockAgent: everything the mount says to the broker.
//
// - A LockJob asks for one or more locks (already in the order they must be taken).
//   LockAgent::run() first tries them at once on the calling thread with a pooled
//   keep-alive client (timeout 0). Whatever cannot be granted now is handed to a
//   waiter thread, which waits on its own BrokerClient and finishes the job there,
//   so a FUSE worker never blocks on a lock wait. The job's `done` is called exactly
//   once, on whichever thread finished it.
// - A job marked `under_kernel_locks` (setattr, rename, unlink, create, ...: the
//   kernel holds inode or directory locks while it waits for the mount) waits at
//   most LockAgentOptions::meta_wait, then fails with EBUSY, leaves the broker's
//   queue and logs who held the key. A holder of that key may need those very
//   kernel locks to finish (every write() takes the file's inode lock), and the
//   broker cannot see them, so a longer wait could freeze both for good.
// - LockJob::interrupt() (a FUSE interrupt, Ctrl-C) ends a wait at once: the
//   waiter's connection is aborted, which also takes the request out of the broker's
//   queue, and the job finishes with EINTR.
// - Locks that outlive a call (open handles) are tracked: one background thread
//   heartbeats them at a third of the lease and marks them lost when the broker no
//   longer knows them.
// - A pool of idle clients serves the short calls (try-acquire, release), so no
//   call opens a new connection when an idle one exists.
// - Retries: BrokerClient retries a call once on a fresh connection when a
//   kept-alive one turns out closed; a queued wait that loses the broker tries again
//   every 200 ms for reconnect_window (a restarted broker keeps its queue that
//   long, and the request_id re-attaches). Nothing else retries.
// - Threads: the heartbeat thread and the waiter threads are all started and joined
//   by the agent (stop(), or the destructor). Lock order: wait_m_, then a LockJob's
//   m_, then its BrokerClient's own; track_m_, pool_m_ and hb_m_ are never held
//   together with another.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "client/broker_client.h"
#include "core/lock_mode.h"

namespace gate::mount {

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
};

struct LockAgentOptions {
  BrokerEndpoint broker;
  std::string mount_id;  // session = "<mount_id>:<pid>"
  std::int64_t lease_ms = defaults::kLeaseMs;
  std::optional<std::int64_t> max_hold_ms;
  std::optional<std::int64_t> acquire_timeout_ms;  // nullopt: wait until granted
  // How long a queued wait keeps retrying while the broker is unreachable (a
  // restart keeps queued requests for a grace period; request_id re-attaches).
  std::chrono::milliseconds reconnect_window{defaults::kRestoreGraceMs};
  // The longest wait of a job under kernel locks (see above); 0: never wait.
  std::chrono::milliseconds meta_wait{defaults::kMetaWaitMs};
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
  std::mutex m_;
  std::condition_variable cv_;
  BrokerClient* current_ = nullptr;  // the client waiting for this job
  std::atomic<bool> interrupted_{false};
  std::vector<std::string> request_ids_;
  std::chrono::steady_clock::time_point started_;
};

// Shared between an open handle and the heartbeat thread.
struct TrackedLock {
  HeldLock lock;
  pid_t pid = 0;
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

  // Starts the heartbeat thread (after daemonizing: fork keeps no threads).
  void start();
  // Ends every wait (jobs finish with EIO), releases every tracked lock, stops the
  // threads. Idempotent.
  void stop();

  void run(const std::shared_ptr<LockJob>& job);

  // Releases locks on a pooled client; failures are logged, never fatal (the lease
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

 private:
  std::unique_ptr<BrokerClient> take_client();
  void give_back(std::unique_ptr<BrokerClient> client);

  AcquireRequest make_request(const LockJob& job, std::size_t index,
                              std::optional<std::int64_t> timeout_ms) const;
  // Outcome of one acquire as an errno (0 granted, -1 "would wait").
  int classify(const CallResult& r, const LockJob& job, std::size_t index,
               const BrokerClient& client, bool try_once) const;
  void finish(const std::shared_ptr<LockJob>& job, int err);
  // When the job must give up waiting (acquire time-out, meta_wait); nullopt: never.
  std::optional<std::chrono::steady_clock::time_point> deadline_of(const LockJob& job) const;
  // Finishes a job under kernel locks that could not get `index` in time with EBUSY,
  // logging who held the key (asked of the broker before the reply frees the kernel).
  void give_up_busy(const std::shared_ptr<LockJob>& job, std::size_t index,
                    BrokerClient& client);
  bool waits_for_itself(const LockJob& job, std::size_t index) const;
  // Whether `pid` has `key` open (a descriptor, its own or inherited) or mapped.
  bool process_has_open(pid_t pid, const std::string& key) const;
  // The broker's "deadlock" for a process that holds `key` only through handles it
  // has already closed: close() returns before the kernel's RELEASE reaches the mount
  // (it is sent in the background), so a process that writes a file and opens it
  // again at once finds its old handle still holding. Not a deadlock: the release
  // is on its way.
  // The release may also have completed between the broker's answer and this check:
  // `epoch_before` is release_epoch() from before the acquire was sent, and any
  // release since then counts as possibly this one.
  bool release_in_flight(const LockJob& job, std::size_t index,
                         std::uint64_t epoch_before) const;
  // How many tracked locks have been released so far (for release_in_flight).
  std::uint64_t release_epoch() const;
  // Whether a handle `pid` opened holds `key` (being released counts). track_m_ held.
  bool has_handle_locked(const std::string& key, pid_t pid) const;
  // Waits (bounded, interruptible) until those handles are released; true when they are.
  bool await_release(const LockJob& job, std::size_t index,
                     std::optional<std::chrono::steady_clock::time_point> deadline);
  void enqueue(std::shared_ptr<LockJob> job);
  struct Waiter;
  void waiter_main(Waiter& self);
  void wait_for(const std::shared_ptr<LockJob>& job, BrokerClient& client);
  void heartbeat_main();
  void heartbeat_all(BrokerClient& client);

  LockAgentOptions options_;
  std::atomic<bool> stopping_{false};

  mutable std::mutex pool_m_;
  std::vector<std::unique_ptr<BrokerClient>> idle_clients_;

  // Waiter threads: one per waiting job at most; idle ones linger a while, then
  // end. Every one is joined: the ended ones by the next enqueue(), the rest by
  // stop(), which first aborts their waits.
  struct Waiter {
    std::thread thread;
    bool ended = false;  // guarded by wait_m_; set as the thread's last step
  };
  mutable std::mutex wait_m_;
  std::condition_variable wait_cv_;
  std::deque<std::shared_ptr<LockJob>> queue_;
  std::vector<std::weak_ptr<LockJob>> waiting_;  // jobs a waiter works on
  std::list<Waiter> waiters_;
  std::size_t idle_threads_ = 0;

  mutable std::mutex track_m_;
  std::condition_variable untracked_cv_;  // a tracked lock went away
  std::uint64_t release_epoch_ = 0;        // tracked locks released (track_m_)
  std::unordered_map<TrackedLock*, std::shared_ptr<TrackedLock>> tracked_;
  std::unordered_multimap<std::string, TrackedLock*> by_key_;

  std::mutex hb_m_;
  std::condition_variable hb_cv_;
  std::thread heartbeat_;
};

// Starts a thread with every signal blocked, so SIGINT/SIGTERM reach the thread
// that runs the FUSE loop.
std::thread start_quiet_thread(std::function<void()> body);

}  // namespace gate::mount
