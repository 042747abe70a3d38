#pragma once
// SpaceMirror: one broker's copy of the lock space that brokers share in etcd (every
// queue entry under /gate/v1/q/ and every content version under /gate/v1/v/), from which it decides grants, waits, status and
// deadlocks (docs/etcd-store.md). Read once, then followed by a prefix watch from the
// revision after the read; a watch cut off by a compaction, or a member that goes
// away, is made again (a compaction: the whole space read again). Entries etcd holds
// that are not gate's are skipped and counted, never fatal.
//
// Thread-safe: the watch's thread applies changes; any thread may take a snapshot or
// wait until the mirror has seen a revision (a broker's own write, read back).
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "etcd/etcd_client.h"
#include "etcd/etcd_space.h"
#include "etcd/etcd_watch.h"

namespace gate::etcd {

class SpaceMirror {
 public:
  // `on_change` runs on the watch's thread after each applied change (no lock held).
  explicit SpaceMirror(std::vector<Endpoint> endpoints, std::function<void()> on_change = {});
  ~SpaceMirror();
  SpaceMirror(const SpaceMirror&) = delete;
  SpaceMirror& operator=(const SpaceMirror&) = delete;

  // Reads the space and starts following it; a failure when etcd cannot be read.
  Status start();
  void stop();

  // The whole space (and the revision it is as of, when asked). A copy of everything:
  // for status and metrics; decisions take what they need below.
  Space snapshot(std::int64_t* revision = nullptr) const;
  // The queues in which something waits, and the queue of `also` (in one view): all
  // that deadlock detection needs (a cycle is made of waits, each in a queue with a
  // waiting entry).
  Space contested(const std::string& also) const;
  // What a sweep looks at, from indexes rather than the whole space: the held entries
  // whose lease or hold cap ended by `now`, the entries of `broker` that wait, and the
  // soonest end after `now` of a held one (a lock's own end: other brokers sweep it
  // later).
  struct Due {
    std::vector<Entry> ended, waiting;
    std::optional<Micros> next_end;
  };
  Due due(Micros now, const std::string& broker) const;
  // Entries held and waiting, counted.
  std::pair<std::size_t, std::size_t> counts() const;
  // The entry at queue key `key`, if the mirror has it.
  std::optional<Entry> entry(const std::string& key) const;
  Queue queue(const std::string& lock_key) const;
  // One key's queue and content version, and the revision the mirror had then.
  struct KeyView {
    Queue queue;
    std::uint64_t version = 0;
    std::int64_t revision = 0;
  };
  KeyView view(const std::string& lock_key) const;
  // Whether another broker asks for `lock_key` to be handed back (a recall key).
  bool recalled(const std::string& lock_key) const;
  // Whether a broker other than `me` has had an entry in `lock_key`'s queue (a lend
  // too) within `window` of now, as far as this mirror has seen since it started.
  bool other_broker_within(const std::string& lock_key, const std::string& me, std::chrono::microseconds window) const;
  // The held entry with this lock id, if the mirror has it.
  std::optional<Entry> find_lock(const std::string& lock_id) const;
  // Content versions (0: never changed).
  std::uint64_t version_of(const std::string& lock_key) const;
  std::map<std::string, std::uint64_t> versions() const;
  // The revision the mirror has applied everything through.
  std::int64_t revision() const;
  // Waits until revision() >= `revision`; false after `limit`.
  bool wait_for(std::int64_t revision, std::chrono::milliseconds limit) const;

  // Reads the space again and watches on from there (a watch that stopped delivering).
  void resync();

  std::uint64_t resyncs() const;   // whole reads after a compaction
  std::uint64_t skipped() const;   // entries that were not gate's
  std::string last_problem() const;

 private:
  // Reads everything under the prefix into a new space; its revision.
  Result<std::int64_t> load();
  void start_watch(std::int64_t from);
  void apply(const WatchUpdate& u);
  // One key's value (or deletion) into the space; mu_ held.
  void put_kv(const KeyValue& kv);
  void delete_key(const std::string& key);
  // An entry into its queue (in queue order, or over its older self), with its indexes.
  void put_entry(Entry e);
  void index(const Entry& e);
  void unindex(const Entry& e);
  const Entry* at(const std::string& key) const;  // the entry at a queue key; mu_ held
  void resync_loop();

  std::vector<Endpoint> endpoints_;
  std::function<void()> on_change_;
  EtcdClient client_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Space space_;
  std::map<std::string, std::uint64_t> versions_;        // lock key -> version
  std::map<std::string, std::string> lock_ids_;          // lock id -> queue key
  std::multimap<Micros, std::string> ends_;              // a held entry's end -> its queue key
  struct Waiting {
    std::string lock_key, broker;
  };
  std::map<std::string, Waiting> waiting_;               // a waiting entry's queue key -> where
  std::map<std::string, std::string> recalls_;           // a recall key -> its lock key
  // When each broker last had an entry in a key's queue (one put, or deleted: it had
  // one until then), on the steady clock; kept across resyncs, pruned as it grows.
  std::map<std::string, std::map<std::string, std::chrono::steady_clock::time_point>> had_;
  std::size_t had_since_prune_ = 0;
  void note_had(const Entry& e);
  std::int64_t revision_ = 0;
  std::uint64_t resyncs_ = 0, skipped_ = 0;
  std::string last_problem_;
  bool resync_ = false, stopping_ = false;
  std::unique_ptr<EtcdWatch> watch_;
  std::thread resync_thread_;
};

}  // namespace gate::etcd
