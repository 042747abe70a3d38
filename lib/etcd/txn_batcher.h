#pragma once
// TxnBatcher: group commit of guarded transactions on different lock keys.
//
// While a batch is with etcd, the transactions other threads submit wait; the next
// batch sends them together as one transaction whose success branch holds each as a
// nested transaction with its own compares and branches (etcd >= 3.3). Each still
// succeeds or fails alone, and answers as if sent alone (its branch's responses, the
// batch's revision); etcd makes one raft entry, and its gateway one call, for all of
// them. A transaction submitted while nothing is with etcd goes at once, alone: one
// client pays nothing for the batching. One batch is with etcd at a time (the
// batches are larger so, and etcd's work per transaction smaller), unless the one out
// has had no answer for `stuck_after`: then others go, up to `max_in_flight`, so that a
// call stuck on a member that stopped answering does not hold up every decision.
//
// etcd evaluates every compare of a batch before any of its writes, and refuses a
// transaction that writes one key twice; so what shares a batch must not depend on
// another's writes. Each transaction names its group (the caller's lock key:
// everything a decision writes is under that key's queue or is its version key) and
// how it may share a batch with others of its group (Share). The reads of a branch see
// the writes of the transactions before it in the batch and not those after; the
// Appends go first, so a decision whose compare failed reads its whole queue as of the
// batch's revision.
#include <boost/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "etcd/etcd_client.h"

namespace gate::etcd {

enum class Share {
  // With no other of its group: it makes an entry from a view of the whole queue.
  Alone,
  // With its group's Appends only: it decides on the entries there (a grant, a
  // release, a heartbeat, a removal) and makes none.
  Decides,
  // With its group's other Appends and one Decides: it makes one new key, which goes
  // behind all others, and depends on nothing else of its group.
  Append,
};

class TxnBatcher {
 public:
  // At most `max_batch` transactions in one. (etcd takes 128 requests per branch, and
  // leaves a nested branch 128 less the batch's size: a batch refused for its size goes
  // again one transaction at a time.)
  explicit TxnBatcher(std::size_t max_batch = 32, std::size_t max_in_flight = 4,
                      std::chrono::milliseconds stuck_after = std::chrono::milliseconds(200));

  // EtcdClient::txn, batched with what other threads submit meanwhile; sent on `c`
  // when this thread sends the batch. A batch etcd refuses as a whole for its shape
  // (a key written twice, too many requests, too large: nothing was applied) is sent
  // again one transaction at a time; any other failure of the batch is each one's.
  Result<TxnResult> txn(EtcdClient& c, std::string_view group, Share share, const boost::json::array& compares,
                        const boost::json::array& success, const boost::json::array& failure, Retry retry);

  std::uint64_t batches() const { return batches_.load(); }       // calls to etcd
  std::uint64_t transactions() const { return transactions_.load(); }  // in them
  std::uint64_t call_micros() const { return call_micros_.load(); }    // their time with etcd
  std::size_t waiting() const;  // submitted and in no batch yet

 private:
  struct Pending;
  void send(EtcdClient& c, const std::vector<Pending*>& batch);

  const std::size_t max_batch_, max_in_flight_;
  const std::chrono::milliseconds stuck_after_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending*> queue_;  // submitted, not yet in a batch
  std::vector<std::chrono::steady_clock::time_point> flying_;  // when each batch out was sent
  std::atomic<std::uint64_t> batches_{0}, transactions_{0}, call_micros_{0};
};

}  // namespace gate::etcd
