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
#include <unordered_map>
#include <vector>

#include "lock/lock_table.h"
#include "store/lock_store.h"

namespace gate {

struct HttpAnswer {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
};

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
};

class BrokerService {
 public:
  using Reply = std::function<void(HttpAnswer)>;
  using Clock = std::function<Micros()>;

  BrokerService(boost::asio::io_context& ioc, LockTable& table, LockStore* store,
                Clock clock = wall_clock_micros);

  // Handles one request; calls reply exactly once (always from a later turn of the
  // event loop, after the change is saved). Returns a non-zero ticket when the
  // request waits: pass it to client_gone() if the client disconnects first.
  std::uint64_t handle(const std::string& method, const std::string& target,
                       const std::string& body, Reply reply);
  void client_gone(std::uint64_t ticket);

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
  // Fences set aside for one delegation.
  static constexpr std::uint64_t kDelegationFences = std::uint64_t{1} << 32;

  void count_bad_request() { ++metrics_.bad_requests; }
  BrokerMetrics& metrics() { return metrics_; }
  std::string metrics_text() const;

 private:
  struct Waiter {
    Reply reply;
    Micros since = 0;
  };

  void acquire(const std::string& body, Reply& reply, std::uint64_t* ticket);
  // ---- delegation of the whole lock space to one client (broker_delegation.cc) ----
  struct Delegation {
    std::uint64_t id = 0;         // its first fence: never used twice
    std::uint64_t fence_end = 0;  // one past its last fence
    std::string client;           // "" when restored after a restart
    std::int64_t lease_ms = 0;
    Micros expires_at = 0;
    Micros since = 0;
    bool recalling = false;
    std::optional<Reply> recall_waiter;  // the delegate's pending GET .../recall
    std::uint64_t recall_ticket = 0;
    TableState reported;  // its last report: what `status` shows
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
  // after a refusal (answered).
  Delegation* delegation_state(const std::string& body, Reply& reply, TableState* state);
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
  // `undo` runs instead of the answer when the change cannot be saved (a grant the
  // client is told failed must not stay held).
  // A request refused for what it is (counted in /metrics as a bad request).
  void bad_request(Reply& reply, int status, const std::string& message);
  void answer(Reply reply, HttpAnswer a, std::function<void()> undo = nullptr,
              std::uint64_t ticket = 0);
  void after_change();
  void process_events();
  void arm_timer();
  void record_wait(Micros waited);
  std::function<void()> undo_grant(const Lock& l);

  boost::asio::io_context& ioc_;
  LockTable& table_;
  LockStore* store_;
  Clock clock_;
  boost::asio::steady_timer timer_;
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
  std::vector<Parked> parked_;
  std::uint64_t next_ticket_ = 0;
  std::unordered_map<std::uint64_t, std::uint64_t> parked_alias_;  // parked ticket -> req id
  std::unordered_map<std::string, Micros> last_acquire_;           // client -> when
  bool flush_scheduled_ = false;
  bool shutting_down_ = false;
  BrokerMetrics metrics_;
};

HttpAnswer json_answer(int status, const std::string& body);
HttpAnswer error_answer(int status, const std::string& message);

}  // namespace gate
