#pragma once
// BrokerLoop: one thread that has many broker calls in flight at once. Each call goes
// out on an idle keep-alive connection (or a new one, connected without blocking);
// poll() watches them all, and a call's answer is handed to its callback on the loop
// thread, exactly once. Functions can be posted to the loop, now or at a time, and
// run on the same thread, so state that only the loop touches needs no lock.
//
// - A waiting acquire is just a call whose answer comes late: a thousand waits cost a
//   thousand idle sockets, not a thousand threads.
// - abort(id) closes the call's connection at once (the broker then drops a queued
//   acquire) and answers it with status 0, error "aborted".
// - Time limits: connecting, sending and each answer must progress within io_timeout,
//   except the answer of a call marked wait_forever (a waiting acquire).
// - Retries: a call that finds its kept-alive connection closed before any answer is
//   sent once more on a fresh one, as BrokerClient does. Nothing else retries.
// - Callbacks and posted functions must not block: they run on the loop thread,
//   which every other call waits for.
#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "client/broker_wire.h"

namespace gate {

// Somewhere other than the broker that may answer a BrokerLoop's calls in-process: a
// delegation of the broker's lock space (mount/delegation.h).
class LocalRoute {
 public:
  using Deliver = std::function<void(HttpReply)>;
  virtual ~LocalRoute() = default;
  // Takes the call (true) and then calls `answer` exactly once: before handle()
  // returns, or later from any thread that calls into the route; or false: not here
  // (the call goes to the broker, `answer` is never called).
  virtual bool handle(std::uint64_t id, const wire::Request& request, Deliver answer) = 0;
  // The call `id` is no longer wanted (its answer is given by the loop).
  virtual void cancel(std::uint64_t id) = 0;
  // A try (timeout 0) or a release answered here and now, without JSON and without a
  // call id: nullopt when the route does not answer it so (then it is a call as above).
  virtual std::optional<CallResult> try_acquire(const AcquireRequest&) { return std::nullopt; }
  virtual std::optional<CallResult> release_now(const std::string& /*lock_id*/, const std::string& /*owner*/,
                                                bool /*changed*/, const std::string& /*stale*/) {
    return std::nullopt;
  }
};

class BrokerLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using CallId = std::uint64_t;
  using Answer = std::function<void(const HttpReply&)>;

  explicit BrokerLoop(BrokerEndpoint endpoint,
                      std::chrono::milliseconds io_timeout = std::chrono::seconds(10));
  ~BrokerLoop();
  BrokerLoop(const BrokerLoop&) = delete;
  BrokerLoop& operator=(const BrokerLoop&) = delete;

  // Starts the thread (with every signal blocked). Calls made before wait for it.
  void start();
  // Blocks until nothing is in flight or posted (timers not counted), at most `limit`;
  // true when drained. Not from the loop thread.
  bool drain(std::chrono::milliseconds limit);
  // Answers every call in flight and every later one with status 0, error "stopped",
  // drops timers, runs what is posted, and joins the thread. Idempotent.
  void stop();

  // Thread-safe. `answer` runs on the loop thread, exactly once (after stop(), at once
  // on the calling thread, with error "stopped").
  CallId call(wire::Request request, Answer answer);
  // On the calling thread, for at most `patience`: sends the request (on an idle
  // connection or a new one) and waits for its answer, which it returns. An answer that
  // takes longer is left to the loop thread, which hands it to `late`; then nullopt.
  // `late` is never called when an answer is returned. `id`: for abort().
  std::optional<HttpReply> call_briefly(wire::Request request, std::chrono::microseconds patience,
                                        Answer late, CallId* id = nullptr);
  // Thread-safe; nothing happens when the call has already been answered.
  void abort(CallId id);
  // Thread-safe: runs `fn` on the loop thread, soon or at `when` (after stop(): post
  // runs it at once on the calling thread; timers are dropped).
  void post(std::function<void()> fn);
  void post_at(Clock::time_point when, std::function<void()> fn);

  // Thread-safe. From now on calls go to `route` first (those not marked to_broker);
  // null: to the broker only.
  void set_route(std::shared_ptr<LocalRoute> route);
  // The local route's typed answer to a try or a release (LocalRoute::try_acquire,
  // release_now), on the caller's thread; nullopt: make it a call.
  std::optional<CallResult> try_acquire_locally(const AcquireRequest& request);
  std::optional<CallResult> release_locally(const std::string& lock_id, const std::string& owner,
                                            bool changed, const std::string& stale);
  // Calls the route took and has not answered, that the route no longer serves: they
  // go to the broker now, under the same ids and with the same answers.
  void resend_to_broker(const std::vector<CallId>& ids);

  bool on_loop_thread() const { return std::this_thread::get_id() == thread_id_; }
  const BrokerEndpoint& endpoint() const { return endpoint_; }
  std::chrono::milliseconds io_timeout() const { return io_timeout_; }
  // Open connections, busy or idle (for tests and `gate mount --debug`).
  std::size_t connections() const;

 private:
  struct Call;
  struct Connection {
    int fd = -1;
    std::string leftover;  // bytes past the last answer
  };
  enum class Outcome { Pending, Answered, Failed };
  void main();
  void wake();
  // `id` 0: a new one.
  std::unique_ptr<Call> make_call(const wire::Request& request, Answer answer, CallId id = 0);
  CallId new_id();
  // The call to the route, if it takes it; `deliver` gets the answer once.
  bool route_call(CallId id, const wire::Request& request, LocalRoute::Deliver deliver);
  std::shared_ptr<LocalRoute> typed_route() const;
  void finish_local(CallId id, HttpReply reply);
  CallId call_to_broker(wire::Request request, Answer answer, CallId id);
  std::optional<HttpReply> brief_to_broker(wire::Request request, std::chrono::microseconds patience,
                                           Answer late, CallId given, CallId* id = nullptr);
  // Gives a call to the loop thread; false when the loop has ended.
  bool hand_over(std::unique_ptr<Call>& c);
  // A call's I/O, on whichever thread has it (no lookups, no callbacks).
  // An idle kept-alive connection, or a new one (always when `fresh`); false: c.result
  // says why not.
  bool open_connection(Call& c, bool fresh = false);
  Outcome step(Call& c, short revents);
  Outcome run(Call& c, short revents);  // step, plus the one retry on a fresh connection
  Outcome failed(Call& c, const std::string& error);
  void close_connection(Connection& conn);
  void park(Connection conn);
  // Loop-thread steps.
  void take_inbox();
  void begin(std::unique_ptr<Call> call);
  void progress(Call& c, short revents);
  void answer(CallId id, HttpReply reply);
  void close_all();

  const BrokerEndpoint endpoint_;
  const std::chrono::milliseconds io_timeout_;
  int wake_fd_ = -1;
  std::thread thread_;
  std::thread::id thread_id_;

  // Shared with other threads (m_).
  mutable std::mutex m_;
  std::condition_variable idle_cv_;  // the loop went idle (drain)
  bool stopping_ = false;
  bool ended_ = false;  // the loop thread has returned
  bool busy_ = false;  // the loop has calls in flight or work in hand
  std::vector<std::unique_ptr<Call>> new_calls_;
  std::vector<CallId> aborts_;
  std::vector<std::function<void()>> posted_;
  std::multimap<Clock::time_point, std::function<void()>> timers_in_;
  CallId next_id_ = 1;
  std::size_t connections_ = 0;

  std::vector<Connection> idle_;  // kept-alive connections, free for the next call
  std::shared_ptr<LocalRoute> route_;
  struct LocalCall {
    wire::Request request;
    LocalRoute::Deliver deliver;
  };
  std::unordered_map<CallId, LocalCall> local_;  // taken by the route, not answered yet

  // The loop thread's own.
  std::unordered_map<CallId, std::unique_ptr<Call>> calls_;
  std::multimap<Clock::time_point, std::function<void()>> timers_;
};

}  // namespace gate
