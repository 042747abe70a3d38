#pragma once
// What the parts of EtcdService share (etcd_service.cc: requests and their state on
// the io thread; etcd_evaluate.cc: what the mirror shows, on the io thread;
// etcd_decide.cc: the decisions written to etcd on worker threads; etcd_lend.cc: the
// keys lent to the broker; etcd_session.cc: the broker's etcd session). Not for other
// users.
#include <boost/json.hpp>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "broker/etcd_service.h"
#include "etcd/etcd_client.h"
#include "etcd/etcd_space.h"

namespace gate {

// (Names the parts all use; this header is theirs alone.)
namespace json = boost::json;
using etcd::Entry;
using etcd::EtcdClient;
using etcd::find_entry;
using etcd::Queue;
using etcd::Retry;

struct EtcdService::Outcome {
  // NotYet: a grant job found its request still waiting (nothing changes). Lent: the
  // key is lent to this broker (entry: the lend), to be served from its lent table.
  enum class Kind { Granted, Queued, NotYet, Timeout, Deadlock, Vanished, Superseded, Unavailable, Lent };
  Kind kind = Kind::Unavailable;
  etcd::Entry entry;  // Granted: the held entry; Queued: the waiting one; Lent: the lend
  std::uint64_t version = 0;
  std::string error;
  // Queued: its deadlock check saw a lend, whose locks it cannot see; checked again
  // until it sees none.
  bool lend_seen = false;
};

// A request that waits for its acquire's answer (io thread).
struct EtcdService::Waiter {
  Reply reply;
  AcquireParams params;
  Micros since = 0;
  std::optional<Micros> deadline;
  std::string made_as;         // the key its first entry is made under (acquire_job)
  Entry fresh;                 // that entry, as made
  std::optional<Entry> entry;  // its queue entry once made, as last written
  bool busy = false;           // a job for it runs
  bool gone = false;           // its client went away
  bool seen = false;           // the mirror showed its entry
  bool recheck = false;        // its deadlock check saw a lend: checked again (evaluate)
};

template <typename F>
void EtcdService::run_job(F&& fn) {
  workers_.post([this, fn = std::forward<F>(fn)]() mutable {
    std::pair<std::unique_ptr<EtcdClient>, std::int64_t> c;
    {
      std::lock_guard lock(clients_mu_);
      if (!idle_clients_.empty()) {
        c = std::move(idle_clients_.back());
        idle_clients_.pop_back();
      } else {
        // (never more clients than workers, plus the caller's after stop())
        c.second = clients_made_++ % etcd::kFenceSlots;
      }
    }
    if (!c.first) c.first = std::make_unique<EtcdClient>(opts_.endpoints, opts_.call_timeout);
    if constexpr (std::is_invocable_v<F&, EtcdClient&, std::int64_t>)
      fn(*c.first, c.second);
    else
      fn(*c.first);
    std::lock_guard lock(clients_mu_);
    idle_clients_.push_back(std::move(c));
  });
}

// What an adoption of a lent key came to (EtcdService::adopt_job).
struct EtcdService::Adoption {
  // Done: the lend entry is gone and `entries` are its locks in etcd; Lost: the lend
  // entry was gone already (this broker's session ended); Failed: etcd did not answer.
  enum class Kind { Done, Lost, Failed };
  Kind kind = Kind::Failed;
  std::vector<etcd::Entry> entries;
  std::string error;
};

namespace etcd_parts {

// The steady clock, in ns (the session's keep-alives and the mirror's freshness).
inline std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Decisions taken on a stale view fail their compare and are taken again on the
// queue the failure read; this many times at most before the client hears 503.
constexpr int kAttempts = 16;

// A job etcd refused is tried again after this long.
constexpr Micros kRetryUs = 250'000;
// A queue entry as the API shows it: a lock, or a queued request.
Lock to_lock(const etcd::Entry& e);
QueuedRequest to_queued(const etcd::Entry& e);
// The queue a range read, in queue order (entries not gate's are left out).
etcd::Queue queue_of(const etcd::RangeResult& range);
// The queue a transaction's failure branch read at response i (entries not gate's
// are left out), and the version a range at response i read.
etcd::Queue queue_from(const etcd::TxnResult& r, std::size_t i);
std::uint64_t version_from(const etcd::TxnResult& r, std::size_t i);
// A fresh mark for an entry's write (Entry::op).
std::string new_op();
// What ends one hold of `held`: *left is it with its count one lower and a fresh
// mark, put while a hold stays; at the last hold the entry goes.
boost::json::array release_writes(const etcd::Entry& held, etcd::Entry* left);
// `e` granted now: held once, with a fresh lock id; what writes it (under `lease`) and
// reads the key's version (`vkey`; none when empty), last.
boost::json::array grant_writes(etcd::Entry& e, Micros now, std::int64_t lease, const std::string& vkey);
// What the release of `gone` lets in, granted in the release's own transaction, and
// in *compares what keeps that right (etcd_decide.cc says more).
boost::json::array hand_off(const etcd::Queue& queue, const etcd::Entry& gone, Micros now,
                            boost::json::array* compares);
// Takes the held entries whose lease or hold cap ended by `now` out of `q`; their deletes.
boost::json::array drop_ended(etcd::Queue& q, Micros now);
// A lend of `lock_key` to `broker` (docs/etcd-store.md), made by its etcd client `slot`.
etcd::Entry lend_entry(const std::string& lock_key, const std::string& broker, std::int64_t slot, Micros now);
// Lent lock `l` of `lend` as an ordinary held entry in the lend's place.
etcd::Entry adopted_entry(const Lock& l, const etcd::Entry& lend);
// The entry at `key` when the write marked `op` is in it; nullopt when it is not, or
// etcd cannot say.
std::optional<etcd::Entry> applied(etcd::EtcdClient& c, const std::string& key, const std::string& op);

}  // namespace etcd_parts
}  // namespace gate
