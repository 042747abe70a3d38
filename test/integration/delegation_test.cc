// The broker's delegation of its lock space to one client, through its HTTP API with
// a real broker process (docs/delegation.md): the test plays the delegate (as a mount
// does) and another client. Waiting calls run on threads of their own and report
// through futures; every wait is bounded.
#include <catch2/catch.hpp>

#include <boost/json.hpp>

#include <chrono>
#include <future>
#include <string>
#include <thread>

#include "client/broker_client.h"
#include "support/test_support.h"

using namespace gate;
using namespace std::chrono_literals;
namespace json = boost::json;
using test::BrokerProcess;

namespace {

json::value parse(const std::string& body) {
  json::error_code ec;
  json::value v = json::parse(body, ec);
  return ec ? json::value() : v;
}

struct Delegate {
  BrokerClient client;
  std::uint64_t id = 0;
  std::uint64_t fence_from = 0;
  explicit Delegate(const BrokerEndpoint& ep) : client(ep) {}

  HttpReply ask(const std::string& name, std::int64_t lease_ms = 5000, const std::string& view = "") {
    json::object body{{"client", name}, {"lease_ms", lease_ms}};
    if (!view.empty()) body["view"] = view;
    HttpReply r = client.request("POST", "/v1/delegation", json::serialize(body));
    if (r.status == 200) {
      json::value v = parse(r.body);
      id = v.at("delegation").to_number<std::uint64_t>();
      fence_from = v.at("fence_from").to_number<std::uint64_t>();
    }
    return r;
  }
  // A state with one write lock on `key` (fence: the first of the block) and one
  // queued read of it.
  std::string state(const std::string& key, bool with_waiter) const {
    json::object lock{{"lock_id", "d-lock-1"}, {"path", key},   {"mode", "write"},
                      {"owner", "d-owner-1"},  {"session", "d:1"}, {"acquired_at_us", 1},
                      {"lease_expires_at_us", 1}, {"lease_ms", 30000}, {"hold_count", 1},
                      {"fence", fence_from},   {"agent", "alpha"}};
    json::array queue;
    if (with_waiter)
      queue.push_back(json::object{{"path", key}, {"mode", "read"}, {"owner", "d-owner-2"},
                                   {"session", "d:2"}, {"request_id", "d-req-2"},
                                   {"requested_at_us", 2}, {"lease_ms", 30000}});
    json::object o{{"delegation", id},
                   {"locks", json::array{lock}},
                   {"queue", std::move(queue)},
                   {"versions", json::object{}},
                   {"next_fence", fence_from + 1}};
    return json::serialize(o);
  }
  HttpReply report(const std::string& body) { return client.request("POST", "/v1/delegation/report", body); }
  HttpReply give_back(const std::string& body) { return client.request("POST", "/v1/delegation/return", body); }
};

AcquireRequest ask_for(const std::string& key, LockMode mode, const std::string& owner,
                       const std::string& session) {
  AcquireRequest r;
  r.key = key;
  r.mode = mode;
  r.owner = owner;
  r.session = session;
  return r;
}

// Another client's waiting acquire of `key`, on a thread of its own.
std::future<CallResult> acquire_async(const BrokerEndpoint& ep, AcquireRequest r) {
  return std::async(std::launch::async, [ep, r] { return BrokerClient(ep).acquire(r); });
}

template <typename T>
bool ready(std::future<T>& f, std::chrono::milliseconds within) {
  return f.wait_for(within) == std::future_status::ready;
}

}  // namespace

TEST_CASE("delegation: another client's acquire recalls the space and queues behind what came back",
          "[broker][delegation]") {
  BrokerProcess broker;
  Delegate d(broker.endpoint());
  REQUIRE(d.ask("mount-a").status == 200);
  CHECK(d.fence_from > 0);
  // A second delegation is refused while this one is out.
  Delegate other(broker.endpoint());
  CHECK(other.ask("mount-c").status == 409);

  REQUIRE(d.report(d.state("f", true)).status == 200);
  // `gate locks` sees the delegate's lock and waiter from its report.
  BrokerClient viewer(broker.endpoint());
  json::value st = parse(viewer.status().body);
  REQUIRE(st.at("locks").as_array().size() == 1);
  CHECK(st.at("locks").as_array()[0].at("lock_id").as_string() == "d-lock-1");
  CHECK(st.at("locks").as_array()[0].at("delegated").as_bool());
  CHECK(st.at("queue").as_array().size() == 1);
  CHECK(st.at("delegation").at("client").as_string() == "mount-a");

  auto recall = std::async(std::launch::async, [&] {
    BrokerClient c(broker.endpoint());
    return c.request("GET", "/v1/delegation/recall?delegation=" + std::to_string(d.id), "", true);
  });
  // Another client asks for the key: it waits, and the delegate is told to give back.
  auto b = acquire_async(broker.endpoint(), ask_for("f", LockMode::Write, "b-owner", "mount-b:7"));
  REQUIRE(ready(recall, 10s));
  CHECK(parse(recall.get().body).at("recall").as_bool());
  CHECK_FALSE(ready(b, 50ms));

  // The delegate hands back its lock and its waiter; the waiter re-attaches.
  HttpReply back = d.give_back(d.state("f", true));
  REQUIRE(back.status == 200);
  CHECK(parse(back.body).at("left_out").to_number<std::uint64_t>() == 0);
  AcquireRequest again = ask_for("f", LockMode::Read, "d-owner-2", "d:2");
  again.request_id = "d-req-2";
  auto waiter = acquire_async(broker.endpoint(), again);
  CHECK_FALSE(ready(b, 100ms));
  CHECK_FALSE(ready(waiter, 0ms));
  // The delegate's lock is the broker's now: released (with a change) as any other.
  BrokerClient dc(broker.endpoint());
  REQUIRE(dc.release("d-lock-1", "d-owner-1", /*changed=*/true).status == CallStatus::Ok);
  // FIFO across the hand-back: the delegate's waiter came first, then b.
  REQUIRE(ready(waiter, 10s));
  CallResult w = waiter.get();
  REQUIRE(w.status == CallStatus::Ok);
  CHECK(w.lock.version == d.fence_from);  // the version the delegate's change made
  CHECK_FALSE(ready(b, 100ms));
  REQUIRE(dc.release(w.lock.lock_id, "d-owner-2").status == CallStatus::Ok);
  REQUIRE(ready(b, 10s));
  CallResult granted = b.get();
  REQUIRE(granted.status == CallStatus::Ok);
  CHECK(granted.lock.fence > d.fence_from);  // fences grow across the delegation
  // The delegation is over: reports for it are refused.
  CHECK(d.report(d.state("f", false)).status == 404);
}

TEST_CASE("delegation: refused while another client holds or asked for a lock",
          "[broker][delegation]") {
  BrokerProcess broker;
  BrokerClient b(broker.endpoint());
  CallResult held = b.acquire(ask_for("g", LockMode::Write, "b-owner", "mount-b:1"));
  REQUIRE(held.status == CallStatus::Ok);
  Delegate d(broker.endpoint());
  HttpReply r = d.ask("mount-a");
  CHECK(r.status == 409);
  CHECK(r.body.find("held") != std::string::npos);
  REQUIRE(b.release(held.lock.lock_id, "b-owner").status == CallStatus::Ok);
  // Nothing held, but b asked a moment ago.
  r = d.ask("mount-a");
  CHECK(r.status == 409);
  CHECK(r.body.find("mount-b") != std::string::npos);
  // Its own acquires do not count against it.
  BrokerClient a(broker.endpoint());
  CallResult own = a.acquire(ask_for("h", LockMode::Read, "a-owner", "mount-a:3"));
  REQUIRE(a.release(own.lock.lock_id, "a-owner").status == CallStatus::Ok);
  CHECK(test::eventually([&] { return d.ask("mount-a").status == 200; }, 10s));
}

TEST_CASE("delegation: a delegate that stops reporting loses the space one lease later",
          "[broker][delegation]") {
  BrokerProcess broker;
  Delegate d(broker.endpoint());
  REQUIRE(d.ask("mount-a", 500).status == 200);
  REQUIRE(d.report(d.state("f", false)).status == 200);
  const auto t0 = std::chrono::steady_clock::now();
  auto b = acquire_async(broker.endpoint(), ask_for("f", LockMode::Write, "b-owner", "mount-b:7"));
  // The delegate's write lock on f kept b out until the lease ended; then it is gone.
  REQUIRE(ready(b, 10s));
  CHECK(b.get().status == CallStatus::Ok);
  CHECK(std::chrono::steady_clock::now() - t0 >= 400ms);
  CHECK(d.give_back(d.state("f", false)).status == 404);
  CHECK(broker.log().find("stopped reporting") != std::string::npos);
}

TEST_CASE("delegation: a broker restarted while the space is out keeps it out",
          "[broker][delegation]") {
  BrokerProcess broker;
  Delegate d(broker.endpoint());
  REQUIRE(d.ask("mount-a", 20000).status == 200);
  REQUIRE(d.report(d.state("f", false)).status == 200);
  broker.kill9();
  broker.start();
  json::value st = parse(BrokerClient(broker.endpoint()).status().body);
  REQUIRE(st.as_object().contains("delegation"));
  // Restored, not yet heard from: gate locks can tell a delegate that may be gone.
  CHECK(st.at("delegation").at("heard") == false);
  auto b = acquire_async(broker.endpoint(), ask_for("f", LockMode::Write, "b-owner", "mount-b:7"));
  // Not granted beside the delegate's lock: it waits for the hand-back.
  CHECK_FALSE(ready(b, 300ms));
  REQUIRE(d.report(d.state("f", false)).status == 200);
  st = parse(BrokerClient(broker.endpoint()).status().body);
  CHECK(st.at("delegation").at("heard") == true);
  REQUIRE(d.give_back(d.state("f", false)).status == 200);
  CHECK_FALSE(ready(b, 100ms));
  REQUIRE(BrokerClient(broker.endpoint()).release("d-lock-1", "d-owner-1").status == CallStatus::Ok);
  REQUIRE(ready(b, 10s));
  CHECK(b.get().status == CallStatus::Ok);
}

TEST_CASE("delegation: restored after a restart, it ends soon when its view asks again",
          "[broker][delegation]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--restore-grace-ms", "60000"}});
  Delegate a(broker.endpoint());
  REQUIRE(a.ask("mount-a", 20000, "host:/srv/view").status == 200);
  REQUIRE(a.report(a.state("f", false)).status == 200);
  broker.kill9();  // the mount dies with it (a VM killed)
  broker.start();
  // Another view waits its turn, as before.
  Delegate other(broker.endpoint());
  CHECK(other.ask("mount-c", 20000, "host:/srv/other").status == 409);
  // The same view's new process: the old delegation ends once a live delegate would
  // have polled again (0.5 s after the restart), not at the restore grace (60 s here).
  Delegate b(broker.endpoint());
  REQUIRE(test::eventually([&] { return b.ask("mount-b", 20000, "host:/srv/view").status == 200; }, 20s));
  CHECK(b.fence_from > a.fence_from);
  json::value st = parse(BrokerClient(broker.endpoint()).status().body);
  CHECK(st.at("delegation").at("client") == "mount-b");
  CHECK(st.at("delegation").at("heard") == true);
  // The old delegation is over: its hand-back is refused.
  CHECK(a.give_back(a.state("f", false)).status == 404);
  CHECK(broker.log().find("the mount it was lent to is gone") != std::string::npos);
}

TEST_CASE("delegation: a view asking while its live delegation is out is refused",
          "[broker][delegation]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--restore-grace-ms", "60000"}});
  Delegate a(broker.endpoint());
  REQUIRE(a.ask("mount-a", 20000, "host:/srv/view").status == 200);
  Delegate b(broker.endpoint());
  // Heard from since the broker started: only a lease without reports ends it.
  CHECK(b.ask("mount-b", 20000, "host:/srv/view").status == 409);
  // Restarted: the live delegate's recall poll (it polls again at once) is word from
  // it, so the view's other mount is still refused later.
  broker.kill9();
  broker.start();
  const std::string poll = "/v1/delegation/recall?delegation=" + std::to_string(a.id);
  auto polling = std::async(std::launch::async, [ep = broker.endpoint(), poll] {
    return BrokerClient(ep).request("GET", poll, "").status;
  });
  REQUIRE(test::eventually([&] {
    json::value st = parse(BrokerClient(broker.endpoint()).status().body);
    return st.is_object() && st.as_object().contains("delegation") && st.at("delegation").at("heard") == true;
  }));
  // The rule is about time, not an event: well past its 0.5 s, the view's other mount
  // asks.
  std::this_thread::sleep_for(1500ms);
  CHECK(b.ask("mount-b", 20000, "host:/srv/view").status == 409);
  // The poll ends with the delegation handed back.
  REQUIRE(a.give_back(a.state("f", false)).status == 200);
  CHECK(polling.wait_for(10s) == std::future_status::ready);
}

TEST_CASE("delegation: bad reports and hand-backs are refused clearly", "[broker][delegation]") {
  BrokerProcess broker;
  Delegate d(broker.endpoint());
  REQUIRE(d.ask("mount-a").status == 200);
  CHECK(d.report(R"({"delegation":)" + std::to_string(d.id + 1) + R"(,"locks":[],"queue":[]})").status == 404);
  HttpReply r = d.report(R"({"delegation":)" + std::to_string(d.id) + R"(,"locks":[{"path":"x"}],"queue":[]})");
  CHECK(r.status == 400);
  CHECK(r.body.find("lock_id") != std::string::npos);
  CHECK(d.report("not json").status == 400);
  CHECK(d.client.request("POST", "/v1/delegation", R"({"lease_ms":5})").status == 400);
  // Still delegated after all that.
  CHECK(d.report(d.state("f", false)).status == 200);
}

TEST_CASE("delegation: a report and a hand-back far over the usual body limit are taken",
          "[broker][delegation]") {
  BrokerProcess broker;
  Delegate d(broker.endpoint());
  REQUIRE(d.ask("mount-a").status == 200);
  // 5,000 changed versions: about 200 KB, where an acquire's body may have 64 KiB.
  json::value state = parse(d.state("f", false));
  json::object& versions = state.as_object()["versions"].as_object();
  for (int i = 0; i < 5000; ++i) versions["dir/some/file-" + std::to_string(i)] = d.fence_from;
  const std::string big = json::serialize(state);
  REQUIRE(big.size() > 100 * 1024);
  CHECK(d.report(big).status == 200);
  CHECK(d.give_back(big).status == 200);
  CHECK(test::key_version(broker.endpoint(), "dir/some/file-4999") == d.fence_from);
  // Any other body over the limit is still refused.
  BrokerClient c(broker.endpoint());
  CHECK(c.request("POST", "/v1/locks/acquire", std::string(100 * 1024, ' ')).status == 413);
}
