#pragma once
// EtcdService: API v1 over a lock space that every broker on one etcd cluster shares
// (`gate broker --store etcd://...`; docs/etcd-store.md). The contract is the one
// BrokerService keeps (shared/docs/locking.md); only where the space lives differs.
//
// - Every decision is taken from one key's queue as the broker's mirror has it at a
//   revision V, and written in a transaction that holds only while no entry of that
//   queue was made or changed after V (a compare of the whole queue's range): a stale
//   view fails the compare, the failure branch reads the queue afresh, and the
//   decision is taken again. So two brokers never grant past each other.
// - Waiting acquires are this broker's: it grants them when its mirror shows them
//   grantable, answers their time-outs and drops their entries when their clients go.
// - Release, heartbeat and status work for any lock, whichever broker granted it.
// - Held entries past their lease or hold cap are deleted by their own broker at once
//   and by any other a moment later (a guarded delete: once).
// - The broker's etcd session lease (kept in the state directory, so that a restart
//   within its TTL keeps every place) carries its entries: a broker that dies takes
//   them with it when the lease ends.
//
// Threads: HTTP and every piece of request state on the io_context thread; etcd calls
// on a few worker threads (a client each), whose results come back to the io thread;
// the mirror's watch thread; the session's keep-alive thread.
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "broker/broker_service.h"
#include "broker/handler.h"
#include "broker/lock_json.h"
#include "core/worker_pool.h"
#include "etcd/etcd_client.h"
#include "etcd/etcd_space.h"
#include "etcd/space_mirror.h"
#include "etcd/txn_batcher.h"
#include "lock/lock_table.h"

namespace gate {

struct EtcdServiceOptions {
  std::vector<etcd::Endpoint> endpoints;
  std::string state_dir;  // the session lease's id is kept here (etcd-session)
  std::int64_t default_lease_ms = 30'000;
  std::int64_t max_hold_ms = 3'600'000;  // <= 0: no cap
  std::int64_t restore_grace_ms = 10'000;
  std::int64_t session_ttl_s = 2;        // etcd's minimum is 2
  std::chrono::milliseconds call_timeout{5'000};
  std::size_t workers = 16;
  std::string address;  // where this broker listens, for the broker's key (people)
  // Lend quiet keys to this broker (docs/etcd-store.md, "lending quiet keys"; being
  // built, off unless GATE_ETCD_LEND=1).
  bool lend = false;
};

class EtcdService : public RequestHandler {
 public:
  EtcdService(boost::asio::io_context& ioc, EtcdServiceOptions options);
  ~EtcdService() override;

  // Takes up the session (the saved one while its lease lives), reads the space and
  // starts following it. Blocking; call before serving. A failure says why.
  Status start();
  // Answers every waiting request 503 (their entries stay for a restart within the
  // session's TTL) and stops taking requests.
  void shutdown();
  // Joins the threads; after the io_context stopped.
  void stop();

  std::uint64_t handle(const std::string& method, const std::string& target, const std::string& body,
                       Reply reply) override;
  void client_gone(std::uint64_t ticket) override;
  void count_bad_request() override { ++metrics_.bad_requests; }
  void set_connections(std::size_t n) override { metrics_.connections = n; }

  std::string broker_id() const;
  // The etcd lease entries are made under and the broker id they name, together.
  struct Session {
    std::int64_t lease = 0;
    std::string id;
  };
  Session session() const;
  std::int64_t session_lease() const { return lease_.load(); }
  // The queued entries of the previous run that are this broker's (start()).
  std::size_t restored_waiting() const { return restored_waiting_; }

  // How long after its deadline another broker ends a lock whose own broker did not.
  static constexpr Micros kForeignSweepDelayUs = 300'000;

 private:
  struct Waiter;
  struct Outcome;
  struct Adoption;

  // ---- io thread ----
  void acquire(const std::string& body, Reply& reply, std::uint64_t* ticket);
  // Waiter `ticket`'s acquire: from the lent table when its key is lent here and it
  // need not wait, else etcd's way (a lend adopted first).
  void begin_acquire(std::uint64_t ticket);
  // The acquires that waited for a lend to be handed back, etcd's way, one after
  // another in their order.
  void begin_acquires_in_order(const std::string& key, const std::vector<std::uint64_t>& tickets);
  void release(const std::string& body, Reply& reply);
  void release_lock(ReleaseParams p, Reply reply);
  void heartbeat(const std::string& body, Reply& reply);
  void heartbeat_lock(HeartbeatParams p, Reply reply);
  void status(const std::string& query, Reply& reply);
  HttpAnswer status_now(const std::string& key);  // ("" : every key) as the mirror and lent table have it
  void health(Reply& reply);
  void answer(Reply reply, HttpAnswer a);
  void acquired(std::uint64_t ticket, Outcome o);  // an acquire or grant job's result
  void evaluate();  // the mirror changed: grants due, vanished entries, the timer
  void arm_timer(Micros at);
  void cancel_entry(const etcd::Entry& e);  // a waiter's entry, deleted (client gone, time-out)
  void schedule_evaluate();
  void give_back(const etcd::Entry& held);  // a grant nobody will hear of, released
  void record_grant(Micros since, bool waited);

  // ---- worker threads (blocking etcd calls) ----
  template <typename F>
  void run_job(F&& fn);
  // `slot`: the client's (Entry::slot), for the entry it makes.
  // `may_lend`: an empty queue is lent to this broker (Outcome::Lent) rather than granted.
  Outcome acquire_job(etcd::EtcdClient& c, std::int64_t slot, const AcquireParams& p, etcd::Entry fresh, Micros now,
                      bool may_lend);
  Outcome grant_job(etcd::EtcdClient& c, const etcd::Entry& known, Micros now);
  Outcome after_queued(etcd::EtcdClient& c, etcd::Entry e);
  // Whether waiting entry `e` closes a cycle in the mirror's space (an entry made
  // later is left out: its own check finds it); *lend_seen: the space holds a lend.
  std::optional<std::string> cycle_of(const etcd::Entry& e, bool* lend_seen) const;
  // A transaction on the queue of `lock_key` (batched with other keys' decisions);
  // the revision it saw is noted for catch_up().
  Result<etcd::TxnResult> txn(etcd::EtcdClient& c, const std::string& lock_key, const boost::json::array& compares,
                              const boost::json::array& success, const boost::json::array& failure,
                              etcd::Retry retry, etcd::Share share = etcd::Share::Decides);
  // Waits (briefly) until the mirror has what this broker's transactions saw.
  void catch_up() const;
  static constexpr std::chrono::milliseconds kCatchUp{200};
  // How long a lookup of a lock waits for the mirror to reach etcd's present revision.
  static constexpr std::chrono::milliseconds kMirrorWait{2'000};
  // Grants of this broker's, kept until the mirror shows them (or their release).
  void remember(const etcd::Entry& held);
  void forget(const std::string& lock_id);
  // The held entry with `lock_id` (the mirror's, else etcd's); nullopt when none.
  Result<std::optional<etcd::Entry>> find_lock(etcd::EtcdClient& c, const std::string& lock_id);

  // ---- lent keys (docs/etcd-store.md, "lending quiet keys"): io thread ----
  struct Lent {
    etcd::Entry lend;          // its lend entry, as written
    std::uint64_t next = 1;    // the next of its fences, after the lend's own
    bool adopting = false;     // its adoption is under way (with etcd, or to be tried again)
    bool in_flight = false;    // an adoption job runs
    bool used_up = false;      // adopted for want of fences, or idle (lent again at once)
    Micros idle_since = 0;     // when its last lent lock ended (0: one is held)
    // A version write of a lent release is with etcd; the next ones wait their turn
    // (so that versions land in fence order).
    bool writing_version = false;
    std::deque<std::function<void()>> version_turns;
    // What waits for the adoption: called with "" once the key is etcd's again, or
    // with why the adoption failed (the key stays lent).
    std::vector<std::function<void(const std::string& error)>> after;
    std::vector<std::uint64_t> acquires;  // waiters waiting for it, in their order
    std::vector<etcd::Entry> adoption;    // what its adoption writes (the same on each try)
    // A lend of the key made meanwhile by a late acquire (its first lend gone in etcd
    // already): this broker's once the adoption is done.
    std::optional<std::pair<etcd::Entry, std::uint64_t>> next_lend;
  };
  // The lend `lend` (made here, read with the key's content version) is this broker's.
  void register_lend(const etcd::Entry& lend, std::uint64_t version);
  // Serves waiter `ticket` from the lent table: false, and *why, when it would wait
  // (or the lend's fences are used up, or this broker's session is in doubt).
  bool serve_lent(std::uint64_t ticket, std::string* why);
  // Hands the lent key back to etcd: its lend entry goes and its lent locks become
  // ordinary entries in the lend's place (`why`: for the log); `then` runs after.
  void adopt(const std::string& key, const char* why, std::function<void(const std::string& error)> then);
  Adoption adopt_job(etcd::EtcdClient& c, const etcd::Entry& lend, std::vector<etcd::Entry> entries, Micros now);
  void adopted(const std::string& key, Adoption a);
  // The lend of `key` ended with this broker's session: its lent locks are gone.
  void lost_lend(const std::string& key, const std::string& why);
  // (worker) Asks the brokers of `lends` to hand their keys back (a recall key each,
  // under this broker's session) and waits until the mirror shows the lends gone, or
  // `limit`; the recall keys go after. A failure: etcd did not take them.
  Status recall(etcd::EtcdClient& c, const std::vector<etcd::Entry>& lends,
                std::chrono::milliseconds limit = kRecallWait);
  static constexpr std::chrono::milliseconds kRecallWait{5'000};
  static constexpr std::chrono::milliseconds kStatusRecall{500};
  void release_lent(const ReleaseParams& p, Reply reply);
  // Whether this broker may grant under its lends now: its session's last keep-alive
  // was sent within TTL / 2, and its mirror followed etcd within the last 1.5 s.
  bool lends_trusted() const;
  // The keeper's interval, and how long after the keeper's last probe the mirror counts
  // as following etcd.
  std::chrono::milliseconds keeper_every() const;
  // The lent locks' ends, and the lends someone else asks for (adopted) or that ended
  // with the session (lost); evaluate() calls it.
  void lend_evaluate(Micros now, const std::function<void(Micros)>& soon);
  // The lent table's changes journaled in lent.db, and its ended locks counted and
  // logged. A journal that cannot be written (logged) hands `key` back to etcd, which
  // then has its locks as they are.
  void lent_changed(const std::string& key = "");
  // (start) The last run's lends: each is handed back to etcd with the locks lent.db
  // journaled under it; lent.db is then emptied.
  Status hand_back_last_run();

  // The session: keep-alive and the quorum's state.
  void keeper_main();
  std::string unavailable() const;  // "" while etcd answers
  void set_unavailable(std::string why);
  Status take_session(etcd::EtcdClient& c);

  boost::asio::io_context& ioc_;
  EtcdServiceOptions opts_;
  std::unique_ptr<etcd::SpaceMirror> mirror_;
  std::unique_ptr<etcd::EtcdClient> keeper_client_;
  std::mutex clients_mu_;
  // Idle etcd clients, each with its slot (Entry::slot: < kFenceSlots, one per client).
  std::vector<std::pair<std::unique_ptr<etcd::EtcdClient>, std::int64_t>> idle_clients_;
  std::int64_t clients_made_ = 0;
  // (One batch with etcd at a time, more only past a stuck one: bench/run_etcd_bench.sh
  // made about 25% more pairs per second so than with two at a time.)
  etcd::TxnBatcher batcher_;
  WorkerPool workers_;
  std::atomic<std::int64_t> lease_{0};
  mutable std::mutex health_mu_;
  std::string unavailable_;
  std::string broker_id_;  // guarded by health_mu_ (changes with a new session)
  std::thread keeper_;
  std::mutex keeper_mu_;
  std::condition_variable keeper_cv_;
  bool keeper_stop_ = false;
  std::atomic<bool> change_posted_{false};
  std::atomic<std::int64_t> written_{0};  // the highest revision a transaction of ours saw
  std::mutex recent_mu_;
  std::map<std::string, std::pair<etcd::Entry, std::chrono::steady_clock::time_point>> recent_;
  // The keeper's probe of the mirror: the revision of its last write of the broker's
  // key, and when it was made; a mirror that does not reach it in time is re-read.
  std::int64_t probe_revision_ = 0;
  std::int64_t probe_seen_ = 0;  // the mirror's revision then
  std::chrono::steady_clock::time_point probe_at_;
  std::int64_t probe_made_ = 0;  // (steady clock, ns) when that write was sent
  // (steady clock, ns) When the last keep-alive etcd answered was sent; when the write
  // that the mirror was last seen to have reached was made.
  std::atomic<std::int64_t> alive_sent_at_{0};
  std::atomic<std::int64_t> mirror_fresh_at_{0};

  // io thread only
  std::map<std::uint64_t, std::unique_ptr<Waiter>> waiters_;
  std::uint64_t next_ticket_ = 0;
  boost::asio::steady_timer timer_;
  std::optional<Micros> timer_at_;
  std::int64_t start_revision_ = 0;  // entries of this broker made before it: the last run's
  Micros started_at_ = 0;
  std::size_t restored_waiting_ = 0;
  bool shutting_down_ = false;
  BrokerMetrics metrics_;
  std::map<std::string, Micros> sweeping_;    // entries being deleted, since when
  std::map<std::string, Micros> unattached_;  // entries of ours no request waits on, since when
  // Entries an acquire answered 503 may have made: key -> (its write's mark, when).
  std::map<std::string, std::pair<std::string, Micros>> doubtful_;
  std::map<std::string, Lent> lent_;          // lock key -> its lend here
  LockTable lent_table_;                      // the lent keys' locks
  std::unique_ptr<LockStore> lent_store_;     // their journal (<state-dir>/lent.db)
  std::string lending_;                       // the lend a grant is being made under (lock ids)
  std::map<std::string, Micros> recalled_;    // lock key -> when its lend was last adopted
  std::map<std::string, Micros> retired_;     // lend entries adopted or lost -> when
  // Keys whose acquires go to etcd in order after a hand-back: later ones wait their turn.
  std::map<std::string, std::vector<std::uint64_t>> draining_;
  // The TTL etcd gives this broker's session lease (a lease taken up keeps its own).
  std::atomic<std::int64_t> lease_ttl_s_{2};
  std::uint64_t adoptions_ = 0;
};

}  // namespace gate
