#pragma once
// LockTable: the pure lock engine. FIFO read/write locks per key, as
// ../shared/docs/locking.md specifies:
//   - requests for a key form one queue in arrival order; a write is granted when
//     nobody holds the key and it is the oldest request; a read when no writer holds
//     the key and no write is queued ahead of it;
//   - re-entrancy per (owner, key), including read->write upgrade;
//   - leases, a hold cap and broker-wide fences;
//   - deadlock detection through sessions;
//   - request_id re-attachment, and a grace period for requests restored after a
//     restart.
// No I/O, no threads, no clock of its own: every call takes `now` (wall-clock
// microseconds). Whatever a call changes is recorded in the journal (for the store)
// and in the events (grants and time-outs of queued requests, dropped locks), which
// the caller drains. Not thread-safe: one owner drives it.
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "core/iso_time.h"
#include "core/lock_mode.h"

namespace gate {

// Who a lock or request is for, as its client describes it (the mount: the agent,
// process and command of the caller). Shown to people, never used to decide.
struct HolderInfo {
  std::string agent;    // empty: not given
  std::int64_t pid = 0;  // 0: not given
  std::string command;  // empty: not given
};

struct Lock {
  std::string lock_id;
  std::string key;
  LockMode mode = LockMode::Read;
  std::string owner;
  std::string session;
  Micros acquired_at = 0;
  Micros lease_expires_at = 0;
  std::int64_t lease_ms = 0;
  std::optional<std::int64_t> max_hold_ms;
  std::int64_t hold_count = 0;
  std::uint64_t fence = 0;
  HolderInfo who;  // of the request that first took it
  // Set when an orphaned (restored) request was granted before its client came back:
  // an acquire repeating this request_id claims the lock. Not persisted.
  std::string unclaimed_request_id;

  // When the lease or the hold cap ends this lock.
  Micros ends_at() const;
};

struct QueuedRequest {
  std::uint64_t req_id = 0;
  std::string key;
  LockMode mode = LockMode::Read;
  std::string owner;
  std::string session;
  std::string request_id;  // client-chosen, may be empty
  Micros requested_at = 0;
  std::int64_t lease_ms = 0;
  std::optional<std::int64_t> max_hold_ms;
  std::optional<Micros> deadline;  // time-out, or end of the restore grace period
  HolderInfo who;
  bool orphan = false;     // restored after a restart and not yet re-attached
  bool persisted = false;  // written to the store (not saved itself)
};

struct AcquireParams {
  std::string key;
  LockMode mode = LockMode::Write;
  std::string owner;
  std::string session;     // empty: the owner is its own session
  std::string request_id;  // empty: none
  std::optional<std::int64_t> timeout_ms;  // nullopt: wait; 0: try once
  std::optional<std::int64_t> lease_ms;
  std::optional<std::int64_t> max_hold_ms;
  HolderInfo who;
};

struct AcquireResult {
  enum class Kind { Granted, Queued, Timeout, Deadlock };
  Kind kind = Kind::Timeout;
  Lock lock;                  // Granted
  std::uint64_t req_id = 0;   // Queued: wait for a Granted/TimedOut event with this id
  std::uint64_t replaced_req_id = 0;  // Queued by re-attachment: the id it took over
  std::string error;          // Deadlock: who waits on whom
};

enum class OpStatus { Ok, NotFound, Forbidden };

struct Event {
  enum class Kind { Granted, TimedOut, Dropped };
  Kind kind;
  std::uint64_t req_id = 0;  // Granted, TimedOut
  Lock lock;                 // Granted: the lock; Dropped: the lock that ended
  std::string reason;        // Dropped: "lease expired" / "hold cap reached"
};

// What changed, for the store to write in one transaction.
struct JournalEntry {
  enum class Kind { PutLock, DeleteLock, PutRequest, DeleteRequest, Counters, PutVersion, SetCounter };
  Kind kind;
  Lock lock;               // PutLock
  QueuedRequest request;   // PutRequest
  std::string lock_id;     // DeleteLock
  std::uint64_t req_id = 0;  // DeleteRequest
  std::uint64_t fence_floor = 0;  // Counters: every future fence is at least this
  std::string key;             // PutVersion: the key's content version is now
  std::uint64_t version = 0;   //   this
  std::string counter;         // SetCounter: a named number of the broker's own (the
  std::int64_t value = 0;      //   delegation out, BrokerService), now this
};

// Everything a table holds, as handed between a broker and the client it delegated
// its lock space to (BrokerService, "Delegation").
struct TableState {
  std::vector<Lock> locks;
  std::vector<QueuedRequest> queue;  // in arrival order
  std::unordered_map<std::string, std::uint64_t> versions;
  std::uint64_t next_fence = 1;
};

struct LockTableOptions {
  std::int64_t default_lease_ms = 30'000;
  std::int64_t max_hold_ms = 3'600'000;  // the cap; <= 0 means none
  std::int64_t restore_grace_ms = 10'000;
};

class LockTable {
 public:
  using IdSource = std::function<std::string()>;
  LockTable(LockTableOptions options, IdSource new_lock_id);

  AcquireResult acquire(const AcquireParams& p, Micros now);
  // `changed`: the holder changed the key's content under this lock; for a write
  // lock the key's version becomes the lock's fence (see version_of).
  OpStatus release(const std::string& lock_id, const std::string& owner, Micros now,
                   bool changed = false);
  OpStatus heartbeat(const std::string& lock_id, const std::string& owner,
                     std::optional<std::int64_t> lease_ms, Micros now, Lock* out);
  // Removes a queued request (client went away). False when it is not queued.
  bool cancel(std::uint64_t req_id, Micros now);
  // Drops ended locks and timed-out requests; called by every other operation too.
  void expire(Micros now);
  // The earliest time at which expire() has work, if any.
  std::optional<Micros> next_deadline() const;

  // Restore state saved by the store. Queued requests get the grace period.
  // Request numbers continue after the highest restored one. Saved entries that
  // break the engine's rules (a damaged or edited database: a second lock of one
  // owner on a key, a writer beside other holders, a repeated id, numbers out of
  // range) are left out, as if they had ended; answers how many.
  std::size_t restore(std::vector<Lock> locks, std::vector<QueuedRequest> queue,
               std::uint64_t next_fence, Micros now,
               std::unordered_map<std::string, std::uint64_t> versions = {});

  // Takes in the state a delegate hands back (a table holding nothing of anyone
  // else's, as while its lock space was delegated): its locks and queued requests
  // (queued in their order, after nothing; they wait for their clients to re-attach
  // by request_id for the restore grace period), versions and fences, all journaled.
  // Entries that break the engine's rules are left out, as in restore(); answers how
  // many.
  std::size_t adopt(TableState state, Micros now);
  // Everything held and queued, the versions (unless !with_versions) and the next fence.
  TableState export_state(bool with_versions = true) const;
  // Remembers the keys whose version a release changes, for take_version_changes()
  // (a delegate reports those, not every version).
  void keep_version_changes(bool on) { keep_version_changes_ = on; }
  std::unordered_map<std::string, std::uint64_t> take_version_changes();
  // Versions learnt from elsewhere (a delegate's report): kept where newer, journaled.
  void merge_versions(const std::unordered_map<std::string, std::uint64_t>& versions);
  // Sets aside `n` fences for another engine to hand out (a delegation): answers the
  // first; none of them is handed out here, before or after a restart.
  std::uint64_t reserve_fence_block(std::uint64_t n);
  // Where new grants' fences come from instead of this table's counter: a broker's
  // keys lent to it by an etcd store, each with its lend entry's own block
  // (docs/etcd-store.md). The owner makes sure a key has one left before it lets an
  // acquire of it in. The table's fence floor is then neither used nor journaled.
  using FenceSource = std::function<std::uint64_t(const std::string& key)>;
  void set_fence_source(FenceSource source) { fence_source_ = std::move(source); }
  // Takes every lock of `key` out of the table (journaled, no events) and answers
  // them: the key now lives elsewhere (a lent key handed back to the etcd store).
  // Requests queued on it stay.
  std::vector<Lock> take_key(const std::string& key);

  // The version of a key's content: the fence of the last write hold that changed
  // it; 0 for content never seen to change. Versions only grow.
  std::uint64_t version_of(const std::string& key) const;
  const std::unordered_map<std::string, std::uint64_t>& versions() const { return versions_; }

  std::vector<Event> take_events();
  std::vector<JournalEntry> take_journal();
  // Whether changes are journaled at all (a table no store learns from, as a
  // delegate's, keeps none: each entry is a copy of a lock).
  void keep_journal(bool on) { journaling_ = on; }
  bool has_events() const { return !events_.empty(); }

  // Views for status and tests. key empty: all keys.
  std::vector<Lock> locks(const std::string& key = "") const;
  std::vector<QueuedRequest> queue(const std::string& key = "") const;
  const Lock* find_lock(const std::string& lock_id) const;
  std::size_t lock_count() const { return locks_.size(); }
  std::size_t holders(const std::string& key) const;  // how many hold `key`
  std::size_t queue_length() const { return requests_.size(); }
  std::uint64_t next_fence() const { return next_fence_; }
  const LockTableOptions& options() const { return options_; }
  std::uint64_t next_req_id() const { return next_req_id_; }

 private:
  struct KeyState {
    std::vector<Lock*> holders;        // in grant order
    std::vector<std::uint64_t> queue;  // req ids, in arrival order
  };
  // Fences are saved in blocks: the store holds a floor above every fence handed
  // out, so a restart never reuses one, without a counter write per grant.
  static constexpr std::uint64_t kFenceBlock = 1024;

  static std::string owner_key(const std::string& owner, const std::string& key);
  static std::string session_of(const std::string& session, const std::string& owner);

  Lock* holder_of(const std::string& owner, const std::string& key);
  bool write_held_by_other(const KeyState& ks, const std::string& owner) const;
  bool held_only_by(const KeyState& ks, const std::string& owner) const;
  void pump(const std::string& key, Micros now);
  Lock& grant(QueuedRequest&& r, Micros now);  // takes r's strings
  // Whether r may hold the key now, as far as its holders go (not its queue).
  bool grantable(const KeyState& ks, const QueuedRequest& r) const;
  void reenter(Lock& lock, LockMode mode, Micros now);
  void remove_request(std::uint64_t req_id);
  QueuedRequest take_request(std::uint64_t req_id);  // removes a queued one, answers it
  void drop_lock(Lock* lock, const std::string& reason);
  Lock& insert_lock(Lock l);
  void forget_key_if_idle(const std::string& key);
  std::optional<std::string> find_deadlock(const QueuedRequest& r) const;
  std::vector<std::string> blockers(const QueuedRequest& r) const;
  std::int64_t effective_max_hold(std::optional<std::int64_t> asked) const;
  void index_lock(const Lock& l);
  void unindex_lock(const Lock& l);
  void put_lock_journal(const Lock& l);
  template <class Fill>
  void record(JournalEntry::Kind kind, Fill fill) {
    if (!journaling_) return;
    JournalEntry e{kind};
    fill(e);
    journal_.push_back(std::move(e));
  }
  void reserve_fences();

  LockTableOptions options_;
  IdSource new_lock_id_;
  std::uint64_t next_fence_ = 1;
  FenceSource fence_source_;  // set: new grants' fences come from it
  std::uint64_t fence_reserved_ = 1;  // the floor the store holds
  std::uint64_t next_req_id_ = 1;

  // Locks live in locks_ (nodes never move); the indexes point at them.
  std::unordered_map<std::string, Lock> locks_;  // by lock id
  std::unordered_map<std::string, Lock*> by_owner_key_;  // owner\0key
  std::unordered_map<std::string, KeyState> keys_;
  std::map<std::uint64_t, QueuedRequest> requests_;
  std::unordered_map<std::string, std::set<std::uint64_t>> waiting_by_session_;
  std::unordered_map<std::string, std::uint64_t> versions_;  // keys ever changed
  bool keep_version_changes_ = false;
  std::unordered_map<std::string, std::uint64_t> version_changes_;
  std::set<std::pair<Micros, Lock*>> lock_deadlines_;
  std::set<std::pair<Micros, std::uint64_t>> request_deadlines_;

  std::vector<Event> events_;
  std::vector<JournalEntry> journal_;
  bool journaling_ = true;
};

}  // namespace gate
