#pragma once
// Delegation: the mount's side of the broker's delegation of its lock space
// (docs/delegation.md). While the mount is the broker's only client, the broker lends
// it the whole lock space; the mount then answers its own lock calls in-process, with
// the broker's own request handling (BrokerService) on a table of its own, as the
// BrokerLoop's local route: no round trip for an open, a close or a heartbeat. As soon
// as another client asks the broker for a lock, the broker recalls the space: the mount
// hands back every lock and waiter it has (locks keep their ids and fences, waiters
// their places, re-attaching by request_id) and goes on through the broker, asking for
// the space again once the other client has been quiet for a while.
//
// Threads: calls come in on any thread (FUSE workers, act threads, the loop thread);
// the local engine is guarded by m_ and driven under it (its io_context is polled, never
// run), so answers are delivered on the calling thread, under m_. The delegation's own
// calls to the broker (ask, report, recall poll, hand back) run on the BrokerLoop.
#include <boost/asio/io_context.hpp>
#include <boost/json/object.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "broker/broker_service.h"
#include "client/broker_loop.h"
#include "lock/lock_table.h"

namespace gate::mount {

class Delegation final : public LocalRoute, public std::enable_shared_from_this<Delegation> {
 public:
  // `idle`: whether the mount holds nothing and asks for nothing at the broker now
  // (only then is asking worth it). `lease_ms`: the delegation's lease, renewed by
  // reports at a third of it.
  // `view`: "<host>:<mountpoint>", sent when asking (LockAgentOptions::view).
  Delegation(BrokerLoop& loop, std::string client, std::string view, std::int64_t lease_ms,
             std::function<bool()> idle);
  ~Delegation() override;

  // Asks for the space now, and again whenever idle while it is not delegated.
  void start();
  // Hands the space back if it is out (after the mount gave back its locks, at
  // unmount), waiting at most `limit` for the broker's answer; stops asking.
  void stop(std::chrono::milliseconds limit);
  bool delegated() const;

  // LocalRoute.
  bool handle(std::uint64_t id, const wire::Request& request, Deliver answer) override;
  void cancel(std::uint64_t id) override;
  // While the space is here (state On): a try and a release answered by the engine at
  // once, with no JSON either way. The lock of a grant carries what the agent keeps
  // (id, key, mode, owner, hold count, fence, version, holder), not the times.
  std::optional<CallResult> try_acquire(const AcquireRequest& request) override;
  std::optional<CallResult> release_now(const std::string& lock_id, const std::string& owner,
                                        bool changed, const std::string& stale) override;

  static constexpr std::chrono::milliseconds kAskEvery{1000};
  // The engine's deadlines (leases, the hold cap, waits' time-outs) are met within
  // this; an idle delegate wakes only for what is due (a report, its lease).
  static constexpr std::chrono::milliseconds kTick{20};
  static constexpr std::chrono::milliseconds kReportChanges{500};  // what `gate locks` shows

 private:
  enum class State { Off, Asking, On, Returning, Stopped };
  void ask();
  void on_granted(const std::string& body);
  void poll_recall();
  // `at`: the time it was armed for; a tick armed for another time has been replaced.
  void tick(std::chrono::steady_clock::time_point at);
  // m_ held, state On: makes sure a tick comes by the time something is next due
  // (one timer at a time: armed again only for an earlier time).
  void arm_tick();
  // m_ held: how long after the last report the next one is due with no change to
  // tell (a third of the lease; a second, or less, after a failed one).
  std::chrono::milliseconds keepalive_every() const;
  // `asked_for`: the number of the broker's request for it (0: a report of its own).
  void report(bool keepalive, std::uint64_t asked_for = 0);
  // Stops answering here and hands everything back; the calls waiting here go to the
  // broker once it has taken the state.
  void give_back(const std::string& why);
  void send_back(std::string body);
  void returned();
  // The broker ended the delegation without taking anything back (its lease ran out):
  // every lock of it is gone. Waiters here are answered 503 (they try the broker).
  void lost(const std::string& why);
  void drive();  // m_ held: runs what the local engine has to do now
  // m_ held, state On: the call answered by the local engine.
  void serve(std::uint64_t id, const wire::Request& request, Deliver answer);
  // The calls held while asking go on to the broker (the space was not lent).
  void release_held();
  // m_ held: gives the space back (from the loop) before its fences run out. `lock` is
  // unlocked on return.
  void give_back_if_fences_low(std::unique_lock<std::mutex>& lock);
  // m_ held, after a typed call the engine answered here (and settled: the service
  // flushes within a typed call): marks the state for the next report, then the fence
  // check.
  void served(std::unique_lock<std::mutex>& lock);
  void set_state(State s);  // m_ held

  BrokerLoop& loop_;
  const std::string client_;
  const std::string view_;
  const std::int64_t lease_ms_;
  std::function<bool()> idle_;

  mutable std::mutex m_;
  std::condition_variable changed_;
  State state_ = State::Off;
  std::uint64_t id_ = 0;
  std::uint64_t fence_end_ = 0;
  std::unique_ptr<boost::asio::io_context> ioc_;  // the local engine's, polled under m_
  std::unique_ptr<LockTable> table_;
  std::unique_ptr<BrokerService> service_;
  std::unordered_map<std::uint64_t, std::uint64_t> waiting_;  // call id -> local ticket
  std::vector<std::uint64_t> deferred_;  // releases and heartbeats while handing back
  std::vector<std::uint64_t> resend_;    // calls to send to the broker once it took the state
  // Calls that came while the space was asked for: answered here if it is lent, else
  // sent to the broker. (Sent to the broker at once, an acquire would cross the grant
  // there and recall the space straight away.)
  struct Held {
    std::uint64_t id;
    wire::Request request;
    Deliver answer;
  };
  std::vector<Held> held_;
  bool dirty_ = false;                   // changed since the last report
  // Versions changed here that the broker has not confirmed yet: every report and the
  // hand-back carry them (not every version, which the broker has).
  std::unordered_map<std::string, std::uint64_t> unreported_;
  // m_ held: a report or hand-back: the delegation, the engine's counters and (with
  // `with_state`) the state, with only the versions the broker may not have.
  boost::json::object message(bool with_state);
  // m_ held: delivers what the engine still has to answer, then drops it.
  void close_engine();
  std::chrono::steady_clock::time_point last_report_;
  // When the broker last confirmed the delegation (the grant, or a report answered):
  // a lease later without another, the space counts as lost (a broker started afresh
  // would not know it is lent).
  std::chrono::steady_clock::time_point confirmed_;
  bool report_failed_ = false;
  std::optional<std::chrono::steady_clock::time_point> tick_at_;  // the armed tick
  bool unsupported_ = false;             // an older broker: never ask again
};

}  // namespace gate::mount
