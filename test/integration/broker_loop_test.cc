// BrokerLoop against a real broker process: many calls in flight on one thread,
// FIFO answers to waiting acquires, abort, time limits, a dead broker, stop.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <vector>

#include "client/broker_client.h"
#include "client/broker_loop.h"
#include "support/test_support.h"

using namespace gate;
using namespace std::chrono_literals;

namespace {

// The answers a test's calls got, in the order they came, and a way to await them.
struct Answers {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::pair<int, CallResult>> got;  // (the call's tag, its answer)
  bool all_on_loop_thread = true;

  BrokerLoop::Answer for_tag(BrokerLoop& loop, int tag) {
    return [this, &loop, tag](const HttpReply& r) {
      std::lock_guard lock(m);
      all_on_loop_thread = all_on_loop_thread && loop.on_loop_thread();
      got.emplace_back(tag, wire::to_result(r));
      cv.notify_all();
    };
  }
  bool await(std::size_t n, std::chrono::milliseconds limit = 20s) {
    std::unique_lock lock(m);
    return cv.wait_for(lock, limit, [&] { return got.size() >= n; });
  }
  std::pair<int, CallResult> at(std::size_t i) {
    std::lock_guard lock(m);
    return got.at(i);
  }
};

AcquireRequest write_lock(const std::string& key, const std::string& owner,
                          std::optional<std::int64_t> timeout_ms = std::nullopt) {
  AcquireRequest req;
  req.key = key;
  req.owner = owner;
  req.timeout_ms = timeout_ms;
  req.session = owner;  // each its own session: no deadlock between them
  return req;
}

// A broker with "k" write-held by "holder": an acquire of "k" by anyone else waits.
struct HeldKey {
  test::BrokerProcess broker;
  BrokerClient holder{broker.endpoint()};
  HeldKey() { REQUIRE(holder.acquire(write_lock("k", "holder", 0)).status == CallStatus::Ok); }
  // Whether `owner` is queued for "k" at the broker.
  bool queued(const std::string& owner) {
    return holder.status("k").body.find("\"" + owner + "\"") != std::string::npos;
  }
};

}  // namespace

TEST_CASE("one loop thread carries many waiting acquires and answers them in FIFO order",
          "[broker][loop]") {
  test::BrokerProcess broker;
  BrokerLoop loop(broker.endpoint());
  loop.start();
  Answers answers;
  constexpr int kWaiters = 40;
  loop.call(wire::acquire(write_lock("k", "o0"), 10s), answers.for_tag(loop, 0));
  REQUIRE(answers.await(1));
  REQUIRE(answers.at(0).second.status == CallStatus::Ok);
  for (int i = 1; i <= kWaiters; ++i) {
    loop.call(wire::acquire(write_lock("k", "o" + std::to_string(i)), 10s), answers.for_tag(loop, i));
    // Queued one after the other, so that the broker's FIFO order is the tags' order.
    REQUIRE(test::eventually([&] {
      BrokerClient c(broker.endpoint());
      return c.status("k").body.find("\"o" + std::to_string(i) + "\"") != std::string::npos;
    }));
  }
  CHECK(loop.connections() >= kWaiters);  // each wait has its own connection
  BrokerClient client(broker.endpoint());
  for (int i = 0; i < kWaiters; ++i) {
    const auto [tag, granted] = answers.at(i);
    REQUIRE(client.release(granted.lock.lock_id, "o" + std::to_string(tag)).status == CallStatus::Ok);
    REQUIRE(answers.await(i + 2));
    CHECK(answers.at(i + 1).first == i + 1);  // the next in line, no other
    CHECK(answers.at(i + 1).second.status == CallStatus::Ok);
  }
  std::lock_guard lock(answers.m);
  CHECK(answers.all_on_loop_thread);
}

TEST_CASE("short calls reuse kept-alive connections", "[broker][loop]") {
  test::BrokerProcess broker;
  BrokerLoop loop(broker.endpoint());
  loop.start();
  Answers answers;
  for (int i = 0; i < 200; ++i) {
    loop.call(wire::acquire(write_lock("f" + std::to_string(i), "o"), 10s), answers.for_tag(loop, i));
    REQUIRE(answers.await(static_cast<std::size_t>(i + 1)));
  }
  CHECK(loop.connections() == 1);
  for (int i = 0; i < 200; ++i) CHECK(answers.at(static_cast<std::size_t>(i)).second.status == CallStatus::Ok);
}

TEST_CASE("abort ends a waiting acquire at once and the broker drops it from the queue",
          "[broker][loop]") {
  HeldKey held;
  test::BrokerProcess& broker = held.broker;
  BrokerLoop loop(broker.endpoint());
  loop.start();
  Answers answers;
  const auto id = loop.call(wire::acquire(write_lock("k", "waiter"), 10s), answers.for_tag(loop, 1));
  REQUIRE(test::eventually([&] { return held.queued("waiter"); }));
  loop.abort(id);
  REQUIRE(answers.await(1, 5s));
  CHECK(answers.at(0).second.status == CallStatus::Unavailable);
  CHECK(answers.at(0).second.error == "aborted");
  CHECK(test::eventually([&] { return !held.queued("waiter"); }));
  loop.abort(id);  // answered already: nothing happens
  CHECK_FALSE(answers.await(2, 100ms));
}

TEST_CASE("a dead broker is answered as unavailable, never waited for", "[broker][loop]") {
  HeldKey held;
  test::BrokerProcess& broker = held.broker;
  BrokerLoop loop(broker.endpoint(), 2s);
  loop.start();
  Answers answers;
  loop.call(wire::acquire(write_lock("k", "waiter"), 2s), answers.for_tag(loop, 1));
  REQUIRE(test::eventually([&] { return held.queued("waiter"); }));
  broker.kill9();
  REQUIRE(answers.await(1, 5s));
  CHECK(answers.at(0).second.status == CallStatus::Unavailable);
  loop.call(wire::health(), answers.for_tag(loop, 2));
  REQUIRE(answers.await(2, 5s));
  CHECK(answers.at(1).second.status == CallStatus::Unavailable);
  CHECK(answers.at(1).second.error.find("cannot reach the broker") != std::string::npos);
}

TEST_CASE("a timed call whose answer never comes fails at its time limit", "[broker][loop]") {
  HeldKey held;
  test::BrokerProcess& broker = held.broker;
  BrokerLoop loop(broker.endpoint(), 300ms);
  loop.start();
  Answers answers;
  // The broker holds a 10 s acquire for 10 s; the loop's 300 ms limit ends it first
  // (a call that waits on purpose is sent as wait_forever instead).
  wire::Request r = wire::acquire(write_lock("k", "waiter", 10'000), 60s);
  r.wait_forever = false;
  const auto start = std::chrono::steady_clock::now();
  loop.call(r, answers.for_tag(loop, 1));
  REQUIRE(answers.await(1, 5s));
  CHECK(answers.at(0).second.error.find("timed out") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - start < 5s);
}

TEST_CASE("timers and posted functions run on the loop thread, timers in time order",
          "[broker][loop]") {
  test::BrokerProcess broker;
  BrokerLoop loop(broker.endpoint());
  loop.start();
  std::mutex m;
  std::condition_variable cv;
  std::vector<int> order;
  bool on_loop = true;
  auto note = [&](int n) {
    return [&, n] {
      std::lock_guard lock(m);
      on_loop = on_loop && loop.on_loop_thread();
      order.push_back(n);
      cv.notify_all();
    };
  };
  const auto now = std::chrono::steady_clock::now();
  loop.post_at(now + 200ms, note(3));
  loop.post_at(now + 100ms, note(2));
  loop.post(note(1));
  std::unique_lock lock(m);
  REQUIRE(cv.wait_for(lock, 5s, [&] { return order.size() == 3; }));
  CHECK(order == std::vector<int>{1, 2, 3});
  CHECK(on_loop);
}

TEST_CASE("stop answers the calls in flight and every later one", "[broker][loop]") {
  HeldKey held;
  test::BrokerProcess& broker = held.broker;
  Answers answers;
  {
    BrokerLoop loop(broker.endpoint());
    loop.start();
    loop.call(wire::acquire(write_lock("k", "waiter"), 10s), answers.for_tag(loop, 1));
    REQUIRE(test::eventually([&] { return held.queued("waiter"); }));
    CHECK(loop.drain(100ms) == false);  // a wait is in flight
    loop.stop();
    REQUIRE(answers.await(1, 0ms));
    CHECK(answers.at(0).second.error == "stopped");
    loop.call(wire::health(), answers.for_tag(loop, 2));
  }
  REQUIRE(answers.got.size() == 2);  // a call after stop is answered at once, never sent
  CHECK(answers.got[1].second.error == "stopped");
  CHECK(test::eventually([&] { return !held.queued("waiter"); }));
}

TEST_CASE("kept-alive connections the broker has ended are not used again", "[broker][loop]") {
  test::BrokerProcess broker(test::BrokerProcess::Options{"", false, {"--idle-timeout-ms", "300"}});
  BrokerLoop loop(broker.endpoint());
  loop.start();
  Answers answers;
  // Two calls at once: two connections, both kept alive after their answers.
  loop.call(wire::health(), answers.for_tag(loop, 1));
  loop.call(wire::health(), answers.for_tag(loop, 2));
  REQUIRE(answers.await(2));
  REQUIRE(loop.connections() == 2);
  // The broker ends both once they have been idle for 300 ms (its gauge then counts
  // only the connection that asks).
  BrokerClient metrics(broker.endpoint());
  REQUIRE(test::eventually([&] {
    return metrics.request("GET", "/metrics", "").body.find("gate_connections 1\n") != std::string::npos;
  }));
  // Neither dead connection is written to: the call is answered, on the caller's thread.
  auto reply = loop.call_briefly(wire::health(), std::chrono::seconds(5), [](const HttpReply&) {});
  REQUIRE(reply);
  CHECK(reply->status == 200);
  CHECK(loop.connections() == 1);
}
