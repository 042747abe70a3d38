#pragma once
// What the parts of EtcdService share (etcd_service.cc: requests and their state on
// the io thread; etcd_decide.cc: the decisions written to etcd on worker threads;
// etcd_session.cc: the broker's etcd session). Not for other users.
#include <boost/json.hpp>

#include <optional>
#include <string>

#include "broker/etcd_service.h"
#include "etcd/etcd_client.h"
#include "etcd/etcd_space.h"

namespace gate {

// (Names the three parts all use; this header is theirs alone.)
namespace json = boost::json;
using etcd::Entry;
using etcd::EtcdClient;
using etcd::find_entry;
using etcd::Queue;
using etcd::Retry;

struct EtcdService::Outcome {
  // NotYet: a grant job found its request still waiting (nothing changes).
  enum class Kind { Granted, Queued, NotYet, Timeout, Deadlock, Vanished, Superseded, Unavailable };
  Kind kind = Kind::Unavailable;
  etcd::Entry entry;  // Granted: the held entry; Queued: the waiting one
  std::uint64_t version = 0;
  std::string error;
};

namespace etcd_parts {

// Decisions taken on a stale view fail their compare and are taken again on the
// queue the failure read; this many times at most before the client hears 503.
constexpr int kAttempts = 16;

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
// The entry at `key` when the write marked `op` is in it; nullopt when it is not, or
// etcd cannot say.
std::optional<etcd::Entry> applied(etcd::EtcdClient& c, const std::string& key, const std::string& op);

}  // namespace etcd_parts
}  // namespace gate
