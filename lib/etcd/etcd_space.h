#pragma once
// The lock space as brokers keep it in etcd (docs/etcd-store.md), as pure decisions:
// the key layout, the queue entries' codec, and the rules of shared/docs/locking.md
// over one key's entries in create-revision order: who holds, who may be granted now,
// which locks have run out, and whether a request would deadlock. No I/O and no clock
// of its own: every broker computes the same answers from the same entries.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/iso_time.h"
#include "core/lock_mode.h"
#include "core/status.h"
#include "etcd/etcd_client.h"

namespace gate::etcd {

// ---- keys: everything below kRoot; lock keys hex-encoded (no '/' inside) ----
inline constexpr std::string_view kRoot = "/gate/v1/";
std::string hex(std::string_view bytes);
std::optional<std::string> unhex(std::string_view text);
std::string queue_prefix(std::string_view lock_key);                        // .../q/<hex>/
std::string queue_key(std::string_view lock_key, std::string_view request);  // .../q/<hex>/<request>
std::string all_queues_prefix();                                             // .../q/
std::string version_key(std::string_view lock_key);                          // .../v/<hex>
std::string broker_key(std::string_view broker);                             // .../b/<broker>
// The lock key a queue key belongs to; nullopt for any other key.
std::optional<std::string> lock_key_of(std::string_view queue_key);
// Recall keys: another broker asks the broker a key is lent to to hand it back
// (docs/etcd-store.md, "lending quiet keys"), under the asking broker's session.
std::string recall_prefix(std::string_view lock_key);                        // .../r/<hex>/
std::string recall_key(std::string_view lock_key, std::string_view asker);   // .../r/<hex>/<asker>
std::string all_recalls_prefix();                                            // .../r/
// The lock key a recall key is for; nullopt for any other key.
std::optional<std::string> lock_key_of_recall(std::string_view recall_key);

// Fences: each etcd revision has kFenceSlots slots, more than the etcd clients of one
// broker (its workers), and each slot kSlotFences fences: the first is the fence of the
// entry that client made at that revision, the rest are for the grants of a lend entry
// made there (docs/etcd-store.md, "lending quiet keys").
inline constexpr std::int64_t kFenceSlots = 64;
inline constexpr std::int64_t kSlotFences = 1024;
// How this gate numbers fences, in every broker's key ("format"): brokers that number
// them otherwise (before format 2: create revision x 64 + slot) must not share a space.
inline constexpr std::int64_t kFormat = 2;

// One request or lock: a queue key's value, and where etcd keeps it.
struct Entry {
  std::string key;  // its queue key (etcd's)
  std::int64_t create_revision = 0, mod_revision = 0;
  std::int64_t etcd_lease = 0;  // the etcd lease it lives under (its broker's session)

  std::string lock_key;
  LockMode mode = LockMode::Read;
  std::string owner, session, broker, request_id, lock_id;
  // Which request of its broker waits on it: made afresh by each (re-)attachment, so
  // that an older request on the same entry knows it was superseded.
  std::string attach;
  // The last write's own mark: a writer whose answer was lost reads the entry back
  // and knows whether its write was applied.
  std::string op;
  bool held = false;             // marked granted by its broker
  std::int64_t hold_count = 0;   // while held: at least 1
  bool upgrade = false;          // a write asked while its owner holds read here
  Micros requested_at = 0, acquired_at = 0, lease_expires_at = 0;
  std::int64_t lease_ms = 0;
  std::optional<std::int64_t> max_hold_ms;
  // Who it is for, as its client described it (shown to people only).
  std::string agent, command;
  std::int64_t pid = 0;

  // Which of its broker's etcd clients made it: entries made in one transaction (a
  // batch, txn_batcher.h) share a create revision, never a slot.
  std::int64_t slot = 0;
  // A fence kept in the entry ("f"): a lent lock's, from its lend entry's fences, once
  // the lend is adopted. 0: the fence comes from the create revision and slot.
  std::uint64_t fixed_fence = 0;
  // A lend entry ("ln"): the key is lent to its broker, which grants it in a table of
  // its own while nobody else asks. To everyone else it is one write holder (the
  // party "broker:<id>") with no lease or hold cap: only its broker, or the end of its
  // broker's session, removes it.
  bool lend = false;

  // Its grant's fence: from the create revision, so global and increasing in queue
  // order (kFenceSlots x kSlotFences apart, the slot telling apart the entries one
  // batch made); a lent lock's own once adopted.
  std::uint64_t fence() const {
    return fixed_fence ? fixed_fence
                       : static_cast<std::uint64_t>((create_revision * kFenceSlots + slot) * kSlotFences);
  }
  // When the lease or the hold cap ends it (held entries only; never for a lend).
  Micros ends_at() const;
  // The session deadlock detection follows (the owner when none was given).
  const std::string& party() const { return session.empty() ? owner : session; }
};

std::string encode_entry(const Entry& e);  // the value etcd keeps (JSON)
// From what etcd has; a failure names the key and what is wrong.
Result<Entry> decode_entry(const KeyValue& kv);

// ---- one key's entries, in queue order (create revision, then slot: queue_order) ----
using Queue = std::vector<Entry>;
// The queue's order: by create revision, and by slot among the entries one batch made
// (the order of their fences); an adopted lent lock at its own fence's place, which is
// its lend's.
inline bool queue_order(const Entry& a, const Entry& b) { return a.fence() < b.fence(); }

// The entry at queue key `key` in `q`; null when none.
const Entry* find_entry(const Queue& q, std::string_view key);

enum class Standing { Held, Grantable, Waiting };
// A write may be held when every entry before it is its own owner's (its held read,
// for an upgrade); a read when no other owner's write comes before it.
std::vector<Standing> standings(const Queue& q);
// The entry `owner` holds here, if any.
const Entry* held_by(const Queue& q, std::string_view owner);
// Granting q[i] (Grantable): for an upgrade whose owner still holds its read here,
// that read entry, which becomes write (hold_count + 1) while q[i] goes; else null, and
// q[i] itself is held (hold_count 1; an upgrade whose read ended is a plain write).
const Entry* upgrade_target(const Queue& q, std::size_t i);
// Held entries whose lease or hold cap has ended at `now`.
std::vector<const Entry*> expired(const Queue& q, Micros now);

// What an owner's new acquire becomes, given what it holds on the key.
enum class Reentry {
  None,      // nothing held: a new entry
  Again,     // hold_count + 1 on the held entry (write held; or read held, read asked)
  UpgradeNow,  // read held by this owner alone, write asked: the entry becomes write
  Upgrade,   // read held with others, write asked: a new upgrade entry waits
  Deadlock,  // read held, write asked, and another owner's upgrade waits already
};
Reentry reentry(const Queue& q, std::string_view owner, LockMode mode);

// The whole space, lock key -> queue (what a broker's mirror holds).
using Space = std::map<std::string, Queue>;
// Whether `waiter` (an entry of `space`, not yet held) would wait, directly or through
// other waiting sessions, on a lock its own session holds: the sentence saying so.
std::optional<std::string> deadlock(const Space& space, const Entry& waiter);

}  // namespace gate::etcd
