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

  void count_bad_request() { ++metrics_.bad_requests; }
  BrokerMetrics& metrics() { return metrics_; }
  std::string metrics_text() const;

 private:
  struct Waiter {
    Reply reply;
    Micros since = 0;
  };

  void acquire(const std::string& body, Reply& reply, std::uint64_t* ticket);
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
  bool flush_scheduled_ = false;
  bool shutting_down_ = false;
  BrokerMetrics metrics_;
};

HttpAnswer json_answer(int status, const std::string& body);
HttpAnswer error_answer(int status, const std::string& message);

}  // namespace gate
