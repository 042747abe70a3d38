#pragma once
// BrokerService: the broker's request handler. It maps API v1 requests onto the
// LockTable, persists every change through the LockStore before answering (changes
// made in one turn of the event loop are committed together: group commit), keeps
// waiting acquires as callbacks (no thread waits), and fires lease, hold-cap and
// time-out deadlines on one timer.
//
// It knows nothing of sockets: handle() takes a method, a target and a body and
// calls `reply` exactly once, now or later. Runs on one io_context thread.
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <boost/json/fwd.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "broker/handler.h"
#include "lock/lock_table.h"
#include "store/lock_store.h"

namespace gate {

struct BrokerMetrics {
  std::uint64_t grants = 0, grants_after_wait = 0, timeouts = 0, deadlocks = 0,
                lease_expiries = 0, cap_expiries = 0, bad_requests = 0, requests = 0,
                releases = 0, heartbeats = 0, disconnects_while_queued = 0, store_failures = 0;
  // Stale replacements as the mounts reported them at release ("stale" in the body).
  std::uint64_t stale_merged = 0, stale_conflicts = 0, stale_refused = 0;
  static constexpr std::array<double, 12> kWaitBuckets = {0.0005, 0.001, 0.005, 0.01, 0.05, 0.1,
                                                          0.5,    1,     5,     30,   300,  3600};
  std::array<std::uint64_t, kWaitBuckets.size()> wait_counts{};
  std::uint64_t wait_count = 0;
  double wait_sum = 0;
  std::uint64_t connections = 0;
  std::uint64_t delegations = 0, recalls = 0, delegations_expired = 0;

  // The counters of lock activity (grants to stale replacements), as a delegate
  // reports its own: added to the broker's in /metrics.
  void add_activity(const BrokerMetrics& o);
  // One release, and what its mount did with a stale replacement ("" for none).
  void count_release(std::string_view stale);
  // One grant after `waited` microseconds in the queue, in the wait histogram.
  void record_wait(Micros waited);
};

class BrokerService : public RequestHandler {
 public:
  using Clock = std::function<Micros()>;

  // `own_timer`: fire leases, caps and time-outs on a timer of its own; else the
  // owner calls expire_now() often enough (a delegate's engine: no timer syscall per
  // grant).
  BrokerService(boost::asio::io_context& ioc, LockTable& table, LockStore* store,
                Clock clock = wall_clock_micros, bool own_timer = true);
  // Ends what is due now (leases, the hold cap, waits' time-outs).
  void expire_now();

  // Handles one request; calls reply exactly once (always from a later turn of the
  // event loop, after the change is saved). Returns a non-zero ticket when the
  // request waits: pass it to client_gone() if the client disconnects first.
  std::uint64_t handle(const std::string& method, const std::string& target,
                       const std::string& body, Reply reply) override;
  void client_gone(std::uint64_t ticket) override;

  // A try (timeout 0) and a release by typed values, by the rules of handle()'s, for
  // an in-process caller (a mount's delegated engine, docs/delegation.md): no JSON,
  // answered at once. Only for a service without a store (nothing to save before an
  // answer) that has its lock space; nullopt otherwise, and handle() it is. What the
  // call lets in (a release may grant to waiters) is answered before it returns.
  std::optional<AcquireResult> try_acquire(const AcquireParams& p);
  // The sentence of a refused release or heartbeat (not found, another owner's).
  static std::string refusal_text(OpStatus status, const std::string& lock_id);
  std::optional<OpStatus> release_now(const std::string& lock_id, const std::string& owner,
                                      bool changed, std::string_view stale);

  // Answers every waiting request 503 (their queue places stay saved for a restart)
  // and saves what is pending.
  void shutdown();
  // Saves pending changes and sends the answers that waited for them.
  void flush();

  // A delegation the store kept (its counters, LockStore::Snapshot::counters): still
  // out after a restart, with a fresh lease. Call before serving.
  void restore_delegation(const std::unordered_map<std::string, std::int64_t>& counters);
  bool delegated() const { return delegation_.has_value(); }

  // The quiet time before a client may have the lock space delegated: no acquire
  // from any other client for this long.
  static constexpr Micros kDelegationQuietUs = 2'000'000;
  // How long a delegation restored at a restart stays out, unheard from, before its
  // own view's new mount may end it (docs/delegation.md, Failures).
  static constexpr Micros kRestoredSilenceUs = 500'000;
  static constexpr const char* kViewGoneWhy =
      "its mount's view asked for the space again, and it was not heard from since the restart: "
      "the mount it was lent to is gone";
  // Fences set aside for one delegation.
  static constexpr std::uint64_t kDelegationFences = std::uint64_t{1} << 32;

  void count_bad_request() override { ++metrics_.bad_requests; }
  void set_connections(std::size_t n) override { metrics_.connections = n; }
  BrokerMetrics& metrics() { return metrics_; }
  std::string metrics_text() const;
  // The lock activity counters as JSON (a delegate's report) and back.
  static boost::json::object activity_to_json(const BrokerMetrics& m);
  static void activity_from_json(const boost::json::object& o, BrokerMetrics* m);

 private:
  struct Waiter {
    Reply reply;
    Micros since = 0;
  };

  void acquire(const std::string& body, Reply& reply, std::uint64_t* ticket);
  // What acquire() and try_acquire() share: the table's answer, counted.
  AcquireResult acquire_checked(const AcquireParams& p, Micros now);
  // What release() and release_now() share: the table's answer, counted.
  OpStatus release_checked(const std::string& lock_id, const std::string& owner, bool changed,
                           std::string_view stale);
  bool typed_calls_here() const { return !store_ && !shutting_down_ && !delegation_; }
  // ---- delegation of the whole lock space to one client (broker_delegation.cc) ----
  struct Delegation {
    std::uint64_t id = 0;         // its first fence: never used twice
    std::uint64_t fence_end = 0;  // one past its last fence
    std::string client;           // "" when restored after a restart
    std::int64_t lease_ms = 0;
    Micros expires_at = 0;
    Micros since = 0;
    bool recalling = false;
    bool heard = true;  // false: restored after a restart, no word from its delegate yet
    std::int64_t view = 0;  // view_id() of the delegate's view; 0: not given
    bool view_asked = false;  // restored, unheard, and its view asked again
    std::optional<Reply> recall_waiter;  // the delegate's pending GET .../recall
    std::uint64_t recall_ticket = 0;
    TableState reported;  // its last report: what `status` shows
    BrokerMetrics activity;  // its engine's counters, as last reported
  };
  struct Parked {
    std::uint64_t ticket = 0;
    std::string body;
    Reply reply;
  };
  static constexpr std::uint64_t kParkedTicket = std::uint64_t{1} << 63;
  static constexpr std::uint64_t kRecallTicket = std::uint64_t{1} << 62;
  // An acquire while the space is out: held until the delegate hands it back.
  void park(const std::string& body, Reply& reply, std::uint64_t* ticket);
  void delegate(const std::string& body, Reply& reply);
  void recall_wait(const std::string& query, Reply& reply, std::uint64_t* ticket);
  void delegation_report(const std::string& body, Reply& reply);
  void delegation_return(const std::string& body, Reply& reply);
  // The delegation a report or hand-back names, and the state it carries; null
  // after a refusal (answered). `given` (reports): whether it carries one. Takes in
  // the delegate's counters and the number of the report asked for (*report).
  Delegation* delegation_state(const std::string& body, Reply& reply, TableState* state,
                               bool* given = nullptr, std::uint64_t* report = nullptr);
  // The delegation named in a request body ({"delegation": id}); null after a refusal.
  Delegation* delegation_in(const boost::json::object& body, Reply& reply);
  void recall(const std::string& why);
  // Ends the delegation (its state taken back, or its lease over) and runs the
  // acquires parked meanwhile, in their order.
  void end_delegation(const std::string& why);
  void journal_delegation();
  bool client_gone_delegation(std::uint64_t ticket);
  void note_client(const AcquireParams& p, Micros now);
  void add_delegated_status(const std::string& key, boost::json::array& locks,
                            boost::json::array& queue, boost::json::object& o) const;
  void release(const std::string& body, Reply& reply);
  void heartbeat(const std::string& body, Reply& reply);
  void status(const std::string& query, Reply& reply);
  HttpAnswer status_now(const std::string& key);
  // While the space is lent out and its delegate listens: asks it for a report (by
  // its recall poll) and answers true; status requests then wait for that report,
  // at most kReportWait.
  bool ask_for_report();
  // Answers the waiters a report numbered `got` satisfies (all of them: ~0).
  void answer_status_waiters(std::uint64_t got = ~std::uint64_t{0});
  static constexpr std::chrono::milliseconds kReportWait{250};
  // `undo` runs instead of the answer when the change cannot be saved (a grant the
  // client is told failed must not stay held).
  // A request refused for what it is (counted in /metrics as a bad request).
  void bad_request(Reply& reply, int status, const std::string& message);
  void answer(Reply reply, HttpAnswer a, std::function<void()> undo = nullptr,
              std::uint64_t ticket = 0);
  void after_change();
  void process_events();
  void settled_change();  // after_change(), flushed at once (typed calls)
  void arm_timer();
  void record_wait(Micros waited);
  std::function<void()> undo_grant(const Lock& l);

  boost::asio::io_context& ioc_;
  LockTable& table_;
  LockStore* store_;
  Clock clock_;
  boost::asio::steady_timer timer_;
  bool own_timer_ = true;
  std::optional<Micros> timer_at_;
  std::unordered_map<std::uint64_t, Waiter> waiters_;
  struct Pending {
    Reply reply;
    HttpAnswer answer;
    std::function<void()> undo;
    std::uint64_t ticket = 0;  // the request's, when it waited
  };
  std::vector<Pending> pending_;
  std::vector<JournalEntry> unsaved_;
  std::optional<Delegation> delegation_;
  // Status requests waiting for a report the delegate makes after they came in:
  // (the report number that answers them, key, reply).
  struct StatusWaiter {
    std::uint64_t needs = 0;
    std::function<HttpAnswer()> make;  // the answer, once the report is in
    Reply reply;
  };
  // Answers `make()` now, or, while the space is lent out, once the delegate reported.
  void answer_fresh(Reply& reply, std::function<HttpAnswer()> make);
  std::vector<StatusWaiter> status_waiters_;
  boost::asio::steady_timer status_timer_;
  std::uint64_t report_asked_ = 0;  // the number of the last report asked for
  bool report_pending_ = false;     // asked, its report not in yet
  bool report_wanted_ = false;      // to ask at the delegate's next recall poll
  void send_report_ask();
  std::vector<Parked> parked_;
  std::uint64_t next_ticket_ = 0;
  std::unordered_map<std::uint64_t, std::uint64_t> parked_alias_;  // parked ticket -> req id
  std::unordered_map<std::string, Micros> last_acquire_;           // client -> when
  BrokerMetrics delegated_activity_;  // of the delegations that ended
  bool flush_scheduled_ = false;
  bool shutting_down_ = false;
  BrokerMetrics metrics_;
};

// The Prometheus text of `m`, with the locks held and requests queued now.
std::string metrics_exposition(const BrokerMetrics& m, std::size_t held, std::size_t queued,
                               bool delegated = false);

}  // namespace gate
