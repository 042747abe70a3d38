// `gate broker --store etcd://...`: two real brokers on a real 3-member etcd cluster on
// loopback serve one lock space (issue 11). The contract of shared/docs/locking.md
// across brokers: FIFO with readers batched, fences that grow across brokers, release
// and heartbeat on either broker, leases, deadlocks across brokers, a broker killed
// while it holds locks, a restart that keeps a waiter's place, and no quorum.
//
// Waiting acquires run on their own threads with their own clients and report
// through futures; "queued" is seen by polling a broker's status, with a bound.
#include <catch2/catch.hpp>

#include <boost/json.hpp>

#include <chrono>
#include <atomic>
#include <future>
#include <map>
#include <mutex>
#include <sstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <signal.h>

#include "client/broker_client.h"
#include "core/process.h"
#include "core/token.h"
#include "etcd/etcd_space.h"
#include "support/etcd_cluster.h"
#include "support/test_support.h"

using namespace gate;
using namespace std::chrono_literals;
namespace json = boost::json;
using test::BrokerProcess;
using Clock = std::chrono::steady_clock;

namespace {

std::unique_ptr<BrokerProcess> etcd_broker(const test::EtcdCluster& cluster, std::vector<std::string> more = {},
                                           const std::string& state_dir = "") {
  BrokerProcess::Options o;
  o.state_dir = state_dir;
  o.extra_args = {"--store", cluster.spec()};
  o.extra_args.insert(o.extra_args.end(), more.begin(), more.end());
  return std::make_unique<BrokerProcess>(o);
}

// A broker that lends quiet keys to itself (docs/etcd-store.md, "lending quiet keys").
std::unique_ptr<BrokerProcess> lending_broker(const test::EtcdCluster& cluster, std::vector<std::string> more = {}) {
  more.insert(more.begin(), {"--etcd-lend", "on"});
  return etcd_broker(cluster, more);
}

// A counter or gauge of a broker's /metrics.
long metric(const BrokerEndpoint& ep, const std::string& name) {
  const std::string text = BrokerClient(ep).request("GET", "/metrics", "").body;
  const auto at = text.find("\n" + name + " ");
  if (at == std::string::npos) FAIL("no metric " << name << " in:\n" << text);
  return std::stol(text.substr(at + name.size() + 2));
}

AcquireRequest req(const std::string& key, LockMode mode, const std::string& owner,
                   std::optional<std::int64_t> timeout_ms = std::nullopt) {
  AcquireRequest r;
  r.key = key;
  r.mode = mode;
  r.owner = owner;
  r.timeout_ms = timeout_ms;
  return r;
}

// An acquire waiting on its own thread and client.
struct Pending {
  std::unique_ptr<BrokerClient> client;
  std::future<CallResult> result;
  bool ready(std::chrono::milliseconds wait = 0ms) { return result.wait_for(wait) == std::future_status::ready; }
};

Pending acquire_async(const BrokerEndpoint& ep, AcquireRequest r) {
  Pending p;
  p.client = std::make_unique<BrokerClient>(ep);
  BrokerClient* c = p.client.get();
  p.result = std::async(std::launch::async, [c, r] { return c->acquire(r); });
  return p;
}

json::object status_of(const BrokerEndpoint& ep, const std::string& key = "") {
  BrokerClient c(ep);
  HttpReply r = c.status(key);
  if (r.status != 200) FAIL("status answered " << r.status << ": " << r.body << r.error);
  return json::parse(r.body).as_object();
}

std::size_t queued(const BrokerEndpoint& ep, const std::string& key) {
  return status_of(ep, key).at("queue").as_array().size();
}
std::size_t held(const BrokerEndpoint& ep, const std::string& key) {
  return status_of(ep, key).at("locks").as_array().size();
}

bool queue_reaches(const BrokerEndpoint& ep, const std::string& key, std::size_t n) {
  return test::eventually([&] { return queued(ep, key) == n; });
}

std::string key_for(const std::string& what) { return "src/" + what + "-" + random_token().substr(0, 8) + ".c"; }

}  // namespace

TEST_CASE("two brokers on one etcd cluster keep one FIFO queue per key with fences that grow across them",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  const std::string k = key_for("fifo");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  CallResult a = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(a.status == CallStatus::Ok);
  REQUIRE(a.lock.fence > 0);
  // The other broker shows the holder: one space.
  REQUIRE(test::eventually([&] { return held(b2->endpoint(), k) == 1; }));

  Pending b = acquire_async(b2->endpoint(), req(k, LockMode::Write, "B"));
  REQUIRE(queue_reaches(b1->endpoint(), k, 1));
  Pending c = acquire_async(b1->endpoint(), req(k, LockMode::Read, "C"));
  REQUIRE(queue_reaches(b2->endpoint(), k, 2));
  Pending d = acquire_async(b2->endpoint(), req(k, LockMode::Read, "D"));
  REQUIRE(queue_reaches(b1->endpoint(), k, 3));
  CHECK_FALSE(b.ready());

  // Released on the broker that did not grant it: B (queued first, on broker 2) is next.
  REQUIRE(c2.release(a.lock.lock_id, "A", /*changed=*/true).status == CallStatus::Ok);
  REQUIRE(b.ready(10s));
  CallResult gb = b.result.get();
  REQUIRE(gb.status == CallStatus::Ok);
  CHECK(gb.lock.fence > a.lock.fence);
  CHECK(gb.lock.version == a.lock.fence);  // A's release changed the content
  // The readers queued behind the writer wait, on both brokers.
  CHECK_FALSE(c.ready(300ms));
  CHECK_FALSE(d.ready());

  REQUIRE(c1.release(gb.lock.lock_id, "B").status == CallStatus::Ok);
  REQUIRE(c.ready(10s));
  REQUIRE(d.ready(10s));
  CallResult gc = c.result.get(), gd = d.result.get();
  REQUIRE(gc.status == CallStatus::Ok);
  REQUIRE(gd.status == CallStatus::Ok);
  CHECK(gc.lock.fence > gb.lock.fence);
  CHECK(gd.lock.fence > gc.lock.fence);  // grant order is queue order
  REQUIRE(test::eventually([&] { return held(b1->endpoint(), k) == 2 && held(b2->endpoint(), k) == 2; }));

  // Re-entry on the other broker keeps the lock (and its fence); two releases end it.
  CallResult again = c2.acquire(req(k, LockMode::Read, "C"));
  REQUIRE(again.status == CallStatus::Ok);
  CHECK(again.lock.lock_id == gc.lock.lock_id);
  CHECK(again.lock.hold_count == 2);
  CHECK(again.lock.fence == gc.lock.fence);
  REQUIRE(c1.release(gc.lock.lock_id, "C").status == CallStatus::Ok);
  REQUIRE(c2.release(gc.lock.lock_id, "C").status == CallStatus::Ok);
  REQUIRE(c2.release(gd.lock.lock_id, "D").status == CallStatus::Ok);
  REQUIRE(test::eventually([&] { return held(b1->endpoint(), k) == 0 && queued(b1->endpoint(), k) == 0; }));
  CHECK(status_of(b2->endpoint(), k).at("versions").at(k).as_int64() == static_cast<std::int64_t>(a.lock.fence));
}

TEST_CASE("with an etcd store heartbeats and refusals work on either broker and a lapsed lease lets the next in",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  const std::string k = key_for("lease");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  AcquireRequest r = req(k, LockMode::Write, "A");
  r.lease_ms = 1'500;
  CallResult a = c1.acquire(r);
  REQUIRE(a.status == CallStatus::Ok);
  CallResult hb = c2.heartbeat(a.lock.lock_id, "A", 2'000);
  REQUIRE(hb.status == CallStatus::Ok);
  CHECK(hb.lock.lease_expires_at >= a.lock.lease_expires_at);
  CHECK(c2.heartbeat(a.lock.lock_id, "not-A").status == CallStatus::Forbidden);
  CHECK(c1.release(a.lock.lock_id, "not-A").status == CallStatus::Forbidden);
  CHECK(c2.release("no-such-lock", "A").status == CallStatus::NotFound);
  // Writes to the cluster outside gate's keys (a shared cluster) move etcd's revision
  // past anything the mirrors hear of: a lookup is not left waiting for it.
  REQUIRE(etcd::EtcdClient(cluster.endpoints()).put("/not-gate/k", "v").ok());
  CHECK(c2.release("no-such-lock", "A").status == CallStatus::NotFound);
  CHECK(c1.acquire(req(k, LockMode::Read, "T", 0)).status == CallStatus::Timeout);  // a try

  // A stops renewing: the waiter on the other broker gets the key once the lease ends.
  const auto asked = Clock::now();
  Pending b = acquire_async(b2->endpoint(), req(k, LockMode::Write, "B"));
  REQUIRE(b.ready(15s));
  CallResult gb = b.result.get();
  REQUIRE(gb.status == CallStatus::Ok);
  CHECK(gb.lock.fence > a.lock.fence);
  CHECK(Clock::now() - asked >= 1'000ms);  // not before A's renewed lease of 2 s ran out
  CHECK(c1.release(a.lock.lock_id, "A").status == CallStatus::NotFound);
  CHECK(c1.release(gb.lock.lock_id, "B").status == CallStatus::Ok);
}

TEST_CASE("with an etcd store a deadlock across two brokers is refused", "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  const std::string k1 = key_for("one"), k2 = key_for("two");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  CallResult s1 = c1.acquire(req(k1, LockMode::Write, "S1"));
  CallResult s2 = c2.acquire(req(k2, LockMode::Write, "S2"));
  REQUIRE(s1.status == CallStatus::Ok);
  REQUIRE(s2.status == CallStatus::Ok);
  Pending w = acquire_async(b1->endpoint(), req(k2, LockMode::Write, "S1"));
  REQUIRE(queue_reaches(b2->endpoint(), k2, 1));
  CallResult cycle = c2.acquire(req(k1, LockMode::Write, "S2"));
  CHECK(cycle.status == CallStatus::Deadlock);
  CHECK(cycle.error.find("S2") != std::string::npos);
  CHECK(test::eventually([&] { return queued(b1->endpoint(), k1) == 0; }));  // the refused request left no entry

  REQUIRE(c1.release(s2.lock.lock_id, "S2").status == CallStatus::Ok);
  REQUIRE(w.ready(10s));
  CHECK(w.result.get().status == CallStatus::Ok);
}

TEST_CASE("with an etcd store a repeated request_id supersedes the older request and a try never deadlocks",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  const std::string k = key_for("again"), u = key_for("upgrade");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  CallResult h = c2.acquire(req(k, LockMode::Write, "H"));
  REQUIRE(h.status == CallStatus::Ok);
  AcquireRequest x = req(k, LockMode::Write, "X");
  x.request_id = "x-" + random_token().substr(0, 8);
  Pending first = acquire_async(b1->endpoint(), x);
  REQUIRE(queue_reaches(b2->endpoint(), k, 1));
  // The same request again (its client retried), on the same broker and then on the
  // other one: each time the older one is answered, the entry keeps its one place.
  Pending second = acquire_async(b1->endpoint(), x);
  REQUIRE(first.ready(10s));
  CallResult older = first.result.get();
  CHECK(older.status == CallStatus::Timeout);
  CHECK(older.error.find("superseded") != std::string::npos);
  Pending third = acquire_async(b2->endpoint(), x);
  REQUIRE(second.ready(10s));
  CHECK(second.result.get().status == CallStatus::Timeout);
  CHECK(queued(b1->endpoint(), k) == 1);
  REQUIRE(c1.release(h.lock.lock_id, "H").status == CallStatus::Ok);
  REQUIRE(third.ready(10s));
  CallResult gx = third.result.get();
  REQUIRE(gx.status == CallStatus::Ok);
  CHECK(gx.lock.fence > h.lock.fence);
  CHECK(test::eventually([&] { return held(b1->endpoint(), k) == 1; }));
  REQUIRE(c1.release(gx.lock.lock_id, "X").status == CallStatus::Ok);

  // Two readers both asking to upgrade: the waiting one is a deadlock for the other,
  // but a try is only a try (408, as the single broker answers it).
  CallResult ra = c1.acquire(req(u, LockMode::Read, "A"));
  CallResult rb = c2.acquire(req(u, LockMode::Read, "B"));
  REQUIRE(ra.status == CallStatus::Ok);
  REQUIRE(rb.status == CallStatus::Ok);
  Pending up = acquire_async(b1->endpoint(), req(u, LockMode::Write, "A"));
  REQUIRE(queue_reaches(b2->endpoint(), u, 1));
  CHECK(c2.acquire(req(u, LockMode::Write, "B", 0)).status == CallStatus::Timeout);
  CHECK(c2.acquire(req(u, LockMode::Write, "B")).status == CallStatus::Deadlock);
  REQUIRE(c2.release(rb.lock.lock_id, "B").status == CallStatus::Ok);
  REQUIRE(up.ready(10s));
  CallResult ua = up.result.get();
  REQUIRE(ua.status == CallStatus::Ok);
  CHECK(ua.lock.lock_id == ra.lock.lock_id);  // the read became the write
  CHECK(ua.lock.mode == LockMode::Write);
  CHECK(ua.lock.hold_count == 2);
}

TEST_CASE("with an etcd store a killed broker's locks end with its session and a restart keeps a waiter's place",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  // A session of 4 s: long enough for broker 1's restart, short enough for the test.
  auto b1 = etcd_broker(cluster, {"--etcd-session-ttl", "4"});
  auto b2 = etcd_broker(cluster, {"--etcd-session-ttl", "4"});
  const std::string k = key_for("kill"), k2 = key_for("place");
  BrokerClient c2(b2->endpoint());

  SECTION("a waiter on the other broker gets the key within the session's TTL and 1 s") {
    BrokerClient c1(b1->endpoint());
    AcquireRequest r = req(k, LockMode::Write, "H");
    r.lease_ms = 600'000;
    REQUIRE(c1.acquire(r).status == CallStatus::Ok);
    Pending w = acquire_async(b2->endpoint(), req(k, LockMode::Write, "W"));
    REQUIRE(queue_reaches(b2->endpoint(), k, 1));
    const auto killed = Clock::now();
    b1->kill9();
    REQUIRE(w.ready(15s));
    const auto waited = Clock::now() - killed;
    CHECK(w.result.get().status == CallStatus::Ok);
    CHECK(waited <= 5'000ms);
    WARN("granted " << std::chrono::duration_cast<std::chrono::milliseconds>(waited).count()
                    << " ms after the holder's broker was killed (session TTL 4 s)");
  }

  SECTION("a request repeated with its request_id after its broker's restart keeps its place") {
    CallResult h = c2.acquire(req(k2, LockMode::Write, "H"));
    REQUIRE(h.status == CallStatus::Ok);
    AcquireRequest x = req(k2, LockMode::Write, "X");
    x.request_id = "x-" + random_token().substr(0, 8);
    Pending first = acquire_async(b1->endpoint(), x);
    REQUIRE(queue_reaches(b2->endpoint(), k2, 1));
    Pending y = acquire_async(b2->endpoint(), req(k2, LockMode::Write, "Y"));
    REQUIRE(queue_reaches(b2->endpoint(), k2, 2));

    b1->kill9();
    REQUIRE(first.ready(10s));
    CHECK(first.result.get().status == CallStatus::Unavailable);  // its connection dropped
    b1->start();  // same state dir: the same session, while its lease lives
    CHECK(queued(b2->endpoint(), k2) == 2);
    Pending again = acquire_async(b1->endpoint(), x);
    REQUIRE(c2.release(h.lock.lock_id, "H").status == CallStatus::Ok);
    REQUIRE(again.ready(10s));
    CallResult gx = again.result.get();
    REQUIRE(gx.status == CallStatus::Ok);  // before Y, which came after it
    CHECK_FALSE(y.ready(300ms));
    REQUIRE(c2.release(gx.lock.lock_id, "X").status == CallStatus::Ok);
    REQUIRE(y.ready(10s));
    CHECK(y.result.get().status == CallStatus::Ok);
  }
}

TEST_CASE("with an etcd store a broker restarted with a longer session TTL keeps the session it took up alive",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  test::TempDir state{"gate-etcd-ttl"};
  auto b1 = etcd_broker(cluster, {"--etcd-session-ttl", "3"}, state.path());
  auto b2 = etcd_broker(cluster);
  const std::string k = key_for("ttl");
  AcquireRequest r = req(k, LockMode::Write, "H");
  r.lease_ms = 600'000;
  REQUIRE(BrokerClient(b1->endpoint()).acquire(r).status == CallStatus::Ok);
  b1->kill9();
  // The same session, taken up by a broker whose own sessions last 60 s: the lease it
  // takes up has 3 s, and is kept alive as often as that needs (or the lock ends with it).
  auto again = etcd_broker(cluster, {"--etcd-session-ttl", "60"}, state.path());
  INFO(again->log());
  REQUIRE(again->log().find("taking up the etcd session") != std::string::npos);
  BrokerClient c2(b2->endpoint());
  auto held = [&] {
    auto h = c2.holders(k);
    return h && h->size() == 1 && h->front().owner == "H";
  };
  CHECK(held());
  // Three of the lease's TTLs: watched, since nothing is to happen.
  const auto until = Clock::now() + 9s;
  bool kept = true;
  while (kept && Clock::now() < until) {
    kept = held();
    std::this_thread::sleep_for(100ms);
  }
  CHECK(kept);
}

TEST_CASE("with an etcd store a lending broker restarted with a shorter session TTL trusts the session it took up",
          "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  test::TempDir state{"gate-etcd-ttl"};
  auto b1 = etcd_broker(cluster, {"--etcd-lend", "on", "--etcd-session-ttl", "6"}, state.path());
  b1->kill9();
  // Taken up by a broker whose own sessions last 2 s: the lease keeps its 6 s, is kept
  // alive every 1.5 s, and is sure for 3 s after each keep-alive (not the 1 s of 2 s).
  auto again = etcd_broker(cluster, {"--etcd-lend", "on"}, state.path());
  REQUIRE(again->log().find("taking up the etcd session") != std::string::npos);
  BrokerClient c(again->endpoint());
  const std::string k = key_for("sure");
  CallResult g = c.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(g.status == CallStatus::Ok);
  REQUIRE(metric(again->endpoint(), "gate_etcd_lent_keys") == 1);
  // Heartbeats over more than two keep-alive intervals: a heartbeat while the session
  // is in doubt would hand the key back to etcd.
  const auto until = Clock::now() + 4s;
  while (Clock::now() < until) {
    REQUIRE(c.heartbeat(g.lock.lock_id, "A", 10'000).status == CallStatus::Ok);
    std::this_thread::sleep_for(100ms);
  }
  CHECK(metric(again->endpoint(), "gate_etcd_adoptions_total") == 0);
  CHECK(metric(again->endpoint(), "gate_etcd_lent_keys") == 1);
  CHECK(c.release(g.lock.lock_id, "A").status == CallStatus::Ok);
}

TEST_CASE("with an etcd store no quorum means 503 with the reason and the quorum's return means service",
          "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster, {"--etcd-timeout-ms", "1500"});
  const std::string k = key_for("quorum");
  BrokerClient c1(b1->endpoint(), 30s);
  REQUIRE(c1.acquire(req(k, LockMode::Write, "A", 0)).status == CallStatus::Ok);

  cluster.kill(1);
  cluster.kill(2);
  const auto lost = Clock::now();
  CallResult refused = c1.acquire(req(k + ".other", LockMode::Write, "B", 1'000));
  CHECK(refused.status == CallStatus::Unavailable);
  CHECK(refused.error.find("etcd") != std::string::npos);
  CHECK(Clock::now() - lost < 15s);
  REQUIRE(test::eventually([&] { return c1.request("GET", "/v1/health", "").status == 503; }, 15s));

  cluster.start(1);
  cluster.start(2);
  REQUIRE(cluster.wait_healthy());
  REQUIRE(test::eventually([&] { return c1.request("GET", "/v1/health", "").status == 200; }, 20s));
  // Service within seconds: a call in the first moments may still meet a member that is
  // catching up and answer 503 with etcd's words ("no etcd member answered ... within
  // 1500 ms"; about one run in ten here), never hang or answer wrongly.
  std::string last;
  CHECK(test::eventually([&] {
    CallResult back = c1.acquire(req(k + ".other", LockMode::Write, "B", 5'000));
    if (back.status == CallStatus::Unavailable) last = back.error;
    return back.status == CallStatus::Ok;
  }, 20s));
  INFO("last 503: " << last);
  CHECK((last.empty() || last.find("etcd") != std::string::npos));
}

TEST_CASE("gate broker --store says what is wrong with a store it cannot use", "[etcd][broker]") {
  test::TempDir dir;
  RunResult bad = run_command({test::gate_binary(), "broker", "--state-dir", dir.path(), "--port", "0", "--store",
                               "etcd://"});
  CHECK(bad.status == 2);
  CHECK(bad.output.find("--store") != std::string::npos);
  RunResult other = run_command({test::gate_binary(), "broker", "--state-dir", dir.path(), "--port", "0",
                                 "--store", "postgres://x"});
  CHECK(other.status == 2);
  CHECK(other.output.find("sqlite or etcd://") != std::string::npos);
  // Nothing listens on port 1 of loopback.
  const auto t0 = Clock::now();
  RunResult dead = run_command({test::gate_binary(), "broker", "--state-dir", dir.path(), "--port", "0", "--store",
                                "etcd://127.0.0.1:1", "--etcd-timeout-ms", "500"},
                               30s);
  CHECK(dead.status == 1);
  CHECK(dead.output.find("etcd") != std::string::npos);
  CHECK(Clock::now() - t0 < 20s);
  // Something that speaks HTTP but is not etcd (a gate broker): a clear refusal.
  BrokerProcess not_etcd;
  RunResult wrong = run_command({test::gate_binary(), "broker", "--state-dir", dir.path(), "--port", "0", "--store",
                                 "etcd://127.0.0.1:" + std::to_string(not_etcd.endpoint().port), "--etcd-timeout-ms",
                                 "1000"},
                                30s);
  CHECK(wrong.status == 1);
  CHECK(wrong.output.find("etcd") != std::string::npos);
  CHECK(wrong.output.find("404") != std::string::npos);
}

TEST_CASE("gate broker --store refuses a cluster where a broker numbers fences another way", "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  etcd::EtcdClient store(cluster.endpoints(), 15s);
  // A live broker of a gate from before fence formats (its key has none).
  Result<std::int64_t> lease = store.lease_grant(60);
  REQUIRE(lease.ok());
  REQUIRE(store.put(etcd::broker_key("0ld"), R"({"address":"10.0.0.9:7777","version":"0.9.0"})", *lease).ok());
  test::TempDir dir;
  RunResult refused = run_command({test::gate_binary(), "broker", "--state-dir", dir.path(), "--port", "0",
                                   "--store", cluster.spec()},
                                  30s);
  CHECK(refused.status == 1);
  CHECK(refused.output.find("broker 0ld (gate 0.9.0, 10.0.0.9:7777)") != std::string::npos);
  CHECK(refused.output.find("format 0") != std::string::npos);
  // Once it is gone, brokers start; one of this gate's is no obstacle to another, also
  // once its keeper has written its key again (every quarter of the session's TTL).
  REQUIRE(store.lease_revoke(*lease).ok());
  auto b1 = etcd_broker(cluster, {"--etcd-lend", "off"});  // (an entry's own fence, below)
  REQUIRE(test::eventually([&] {
    Result<etcd::RangeResult> r = store.range(etcd::range_request(etcd::broker_key(""), etcd::prefix_end(etcd::broker_key(""))));
    return r.ok() && r->kvs.size() == 1 && r->kvs[0].value.find("alive_at") != std::string::npos;
  }, 10s));
  Result<etcd::RangeResult> keys =
      store.range(etcd::range_request(etcd::broker_key(""), etcd::prefix_end(etcd::broker_key(""))));
  REQUIRE(keys.ok());
  CHECK(keys->kvs.at(0).value.find("\"format\":2") != std::string::npos);
  auto b2 = etcd_broker(cluster);
  const std::string k = key_for("format");
  CallResult a = BrokerClient(b1->endpoint()).acquire(req(k, LockMode::Write, "A"));
  REQUIRE(a.status == CallStatus::Ok);
  CHECK(a.lock.fence % etcd::kSlotFences == 0);  // an entry's own fence: the first of its slot's
}

TEST_CASE("with an etcd store a wait outlives compactions of etcd's history", "[etcd][broker]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster, {"--etcd-session-ttl", "120"});  // (stopped for a while below)
  const std::string k = key_for("compact");
  BrokerClient c1(b1->endpoint());
  etcd::EtcdClient store(cluster.endpoints(), 15s);

  AcquireRequest hr = req(k, LockMode::Write, "H");
  hr.lease_ms = 600'000;  // (the bulk writes below may take long on a loaded machine)
  CallResult h = c1.acquire(hr);
  REQUIRE(h.status == CallStatus::Ok);
  Pending w = acquire_async(b2->endpoint(), req(k, LockMode::Write, "W"));
  REQUIRE(queue_reaches(b1->endpoint(), k, 1));

  // Broker 2 stops reading while history grows (heartbeats, and more than its
  // connection and etcd's buffers hold, under a part of /gate/v1/ that is not gate's)
  // and is compacted away under it.
  ::kill(b2->pid(), SIGSTOP);
  for (int i = 0; i < 300; ++i) REQUIRE(c1.heartbeat(h.lock.lock_id, "H").status == CallStatus::Ok);
  const std::string bulk(16 * 1024, 'x');
  for (int i = 0; i < 3000; ++i) REQUIRE(store.put("/gate/v1/zz-test/" + std::to_string(i % 10), bulk).ok());
  Result<std::int64_t> now = store.put("/gate-test/marker", "x");
  REQUIRE(now.ok());
  REQUIRE(store.compact(*now).ok());
  ::kill(b2->pid(), SIGCONT);
  for (int i = 0; i < 50; ++i) REQUIRE(c1.heartbeat(h.lock.lock_id, "H").status == CallStatus::Ok);
  now = store.put("/gate-test/marker", "y");
  REQUIRE(now.ok());
  REQUIRE(store.compact(*now).ok());
  CHECK_FALSE(w.ready(200ms));

  REQUIRE(c1.release(h.lock.lock_id, "H").status == CallStatus::Ok);
  REQUIRE(w.ready(10s));
  CallResult gw = w.result.get();
  REQUIRE(gw.status == CallStatus::Ok);
  CHECK(gw.lock.fence > h.lock.fence);
  const std::string metrics = BrokerClient(b2->endpoint()).request("GET", "/metrics", "").body;
  const auto at = metrics.find("\ngate_etcd_resyncs_total ");
  REQUIRE(at != std::string::npos);
  // Its watch was cut off by the compaction: it read the space again and went on.
  CHECK(std::stoi(metrics.substr(at + 25)) >= 1);
  REQUIRE(BrokerClient(b2->endpoint()).release(gw.lock.lock_id, "W").status == CallStatus::Ok);
  CHECK(test::eventually([&] { return held(b1->endpoint(), k) == 0 && held(b2->endpoint(), k) == 0; }));
}

namespace {

// One hold as its client saw it: from the grant's answer to the release's request.
struct Hold {
  std::string key;
  std::uint64_t fence = 0;
  Clock::time_point granted, released;
  int client = 0;
};

}  // namespace

TEST_CASE("with an etcd store killing the etcd leader under load never makes two writers or a fence go back",
          "[etcd][broker][jepsen]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  const std::vector<std::string> keys = {key_for("j1"), key_for("j2")};
  constexpr int kClients = 6;

  std::mutex mu;
  std::vector<Hold> holds;
  std::map<std::string, int> refusals;  // what the clients heard besides grants
  std::atomic<bool> stop{false};
  std::vector<std::future<void>> clients;
  for (int i = 0; i < kClients; ++i) {
    const BrokerEndpoint ep = (i % 2 ? b2 : b1)->endpoint();
    clients.push_back(std::async(std::launch::async, [&, i, ep] {
      BrokerClient c(ep, 30s);
      for (int n = 0; !stop; ++n) {
        AcquireRequest r = req(keys[static_cast<std::size_t>((n + i) % 2)], LockMode::Write, "client-" + std::to_string(i), 20'000);
        r.lease_ms = 10'000;
        CallResult g = c.acquire(r);
        if (g.status != CallStatus::Ok) {
          std::lock_guard lock(mu);
          ++refusals[to_string(g.status)];
          continue;
        }
        Hold h{r.key, g.lock.fence, Clock::now(), {}, i};
        h.released = Clock::now();
        // A release that got no answer is sent again (else the next acquire of this
        // owner would be a re-entry): 404 then means the first one was applied.
        CallResult rel = c.release(g.lock.lock_id, r.owner);
        for (int again = 0; rel.status == CallStatus::Unavailable && again < 100; ++again) {
          std::this_thread::sleep_for(100ms);  // pacing while etcd elects a leader
          rel = c.release(g.lock.lock_id, r.owner);
        }
        std::lock_guard lock(mu);
        holds.push_back(h);
        if (rel.status != CallStatus::Ok) ++refusals["release " + std::string(to_string(rel.status))];
      }
    }));
  }
  auto count = [&] {
    std::lock_guard lock(mu);
    return holds.size();
  };
  REQUIRE(test::eventually([&] { return count() >= 100; }, 30s));
  const int leader = cluster.leader();
  REQUIRE(leader >= 0);
  const std::size_t before_kill = count();
  cluster.kill(leader);
  // Service goes on with the two members left (a new leader), then with all three.
  CHECK(test::eventually([&] { return count() >= before_kill + 100; }, 30s));
  cluster.start(leader);
  REQUIRE(cluster.wait_healthy());
  const std::size_t after_restart = count();
  CHECK(test::eventually([&] { return count() >= after_restart + 100; }, 30s));
  stop = true;
  for (auto& f : clients) REQUIRE(f.wait_for(60s) == std::future_status::ready);  // no client stuck

  // The history: per key, holds in grant order never overlap and their fences grow.
  std::lock_guard lock(mu);
  for (const std::string& k : keys) {
    std::vector<Hold> h;
    for (const Hold& x : holds)
      if (x.key == k) h.push_back(x);
    std::sort(h.begin(), h.end(), [](const Hold& a, const Hold& b) { return a.granted < b.granted; });
    for (std::size_t i = 1; i < h.size(); ++i) {
      INFO("key " << k << ", holds " << i - 1 << " (client " << h[i - 1].client << ", fence " << h[i - 1].fence
                  << ") and " << i << " (client " << h[i].client << ", fence " << h[i].fence << ")");
      CHECK(h[i].granted >= h[i - 1].released);
      CHECK(h[i].fence > h[i - 1].fence);
    }
  }
  std::ostringstream seen;
  for (const auto& [what, n] : refusals) seen << what << ": " << n << "; ";
  WARN(holds.size() << " holds by " << kClients << " clients over two brokers across the leader's death; " << seen.str());
}

TEST_CASE("with an etcd store a key another broker had a moment ago is not lent until it is quiet",
          "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = lending_broker(cluster);
  auto b2 = lending_broker(cluster);
  const std::string k = key_for("shared");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());
  // Lent to b2, which nobody else asked for it.
  CallResult there = c2.acquire(req(k, LockMode::Write, "B"));
  REQUIRE(there.status == CallStatus::Ok);
  CHECK(metric(b2->endpoint(), "gate_etcd_lent_keys") == 1);
  REQUIRE(c2.release(there.lock.lock_id, "B").status == CallStatus::Ok);
  // b1 asks it back, and then takes it through etcd: b2 had it a moment ago, so a
  // lend to b1 would only be asked back in turn.
  CallResult here = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(here.status == CallStatus::Ok);
  CHECK(metric(b2->endpoint(), "gate_etcd_adoptions_total") == 1);
  CHECK(metric(b1->endpoint(), "gate_etcd_lent_keys") == 0);
  REQUIRE(c1.release(here.lock.lock_id, "A").status == CallStatus::Ok);
  const auto released = Clock::now();
  CallResult again = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(again.status == CallStatus::Ok);
  if (Clock::now() - released < 1s) CHECK(metric(b1->endpoint(), "gate_etcd_lent_keys") == 0);
  else WARN("the second acquire took a second or more: whether it was lent is not checked");
  REQUIRE(c1.release(again.lock.lock_id, "A").status == CallStatus::Ok);
  // Quiet for 2 s (nobody else's entry there), the key is lent to b1.
  CHECK(test::eventually(
      [&] {
        CallResult g = c1.acquire(req(k, LockMode::Write, "A"));
        const bool lent = g.status == CallStatus::Ok && metric(b1->endpoint(), "gate_etcd_lent_keys") == 1;
        if (g.status == CallStatus::Ok) c1.release(g.lock.lock_id, "A");
        return lent;
      },
      10s));
}

TEST_CASE("with an etcd store a quiet key is lent to its broker: pairs write nothing to etcd, fences and versions "
          "go on", "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = lending_broker(cluster);
  auto b2 = lending_broker(cluster);
  const std::string k = key_for("lent");
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  CallResult first = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(first.status == CallStatus::Ok);
  CHECK(metric(b1->endpoint(), "gate_etcd_lent_keys") == 1);
  CHECK(metric(b1->endpoint(), "gate_etcd_lent_locks") == 1);
  // Its broker shows the lent lock.
  json::array mine = status_of(b1->endpoint(), k).at("locks").as_array();
  REQUIRE(mine.size() == 1);
  CHECK(mine[0].at("lock_id").as_string() == first.lock.lock_id);
  REQUIRE(c1.release(first.lock.lock_id, "A").status == CallStatus::Ok);

  const long txns = metric(b1->endpoint(), "gate_etcd_txns_total");
  std::uint64_t fence = first.lock.fence;
  for (int i = 0; i < 20; ++i) {
    CallResult g = c1.acquire(req(k, i % 2 ? LockMode::Read : LockMode::Write, "A"));
    REQUIRE(g.status == CallStatus::Ok);
    CHECK(g.lock.fence > fence);
    fence = g.lock.fence;
    REQUIRE(c1.release(g.lock.lock_id, "A").status == CallStatus::Ok);
  }
  CHECK(metric(b1->endpoint(), "gate_etcd_txns_total") == txns);  // none of them went to etcd
  // Re-entry, a heartbeat and a refused try under the lend.
  CallResult w = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(w.status == CallStatus::Ok);
  CallResult again = c1.acquire(req(k, LockMode::Read, "A"));
  REQUIRE(again.status == CallStatus::Ok);
  CHECK(again.lock.lock_id == w.lock.lock_id);
  CHECK(again.lock.hold_count == 2);
  CHECK(c1.heartbeat(w.lock.lock_id, "A", 5'000).status == CallStatus::Ok);
  CHECK(c1.heartbeat(w.lock.lock_id, "B").status == CallStatus::Forbidden);
  CHECK(c1.release(w.lock.lock_id, "B").status == CallStatus::Forbidden);
  CHECK(c1.acquire(req(k, LockMode::Read, "B", 0)).status == CallStatus::Timeout);
  REQUIRE(c1.release(w.lock.lock_id, "A").status == CallStatus::Ok);
  // A change is written to etcd (one transaction) before its release is answered.
  REQUIRE(c1.release(w.lock.lock_id, "A", /*changed=*/true).status == CallStatus::Ok);
  CHECK(metric(b1->endpoint(), "gate_etcd_txns_total") == txns + 1);
  CallResult next = c1.acquire(req(k, LockMode::Write, "A"));
  REQUIRE(next.status == CallStatus::Ok);
  CHECK(next.lock.version == w.lock.fence);
  CHECK(metric(b1->endpoint(), "gate_etcd_adoptions_total") == 0);

  // The other broker's status asks for the key back, and shows the lock as it is.
  json::object st = status_of(b2->endpoint(), k);
  REQUIRE(st.at("locks").as_array().size() == 1);
  CHECK(st.at("locks").as_array()[0].at("lock_id").as_string() == next.lock.lock_id);
  CHECK(st.at("locks").as_array()[0].at("fence").to_number<std::uint64_t>() == next.lock.fence);
  CHECK(st.at("versions").at(k).to_number<std::uint64_t>() == w.lock.fence);
  CHECK(metric(b1->endpoint(), "gate_etcd_adoptions_total") == 1);
  REQUIRE(c2.release(next.lock.lock_id, "A").status == CallStatus::Ok);

  // A heartbeat and a release of a lent lock on the other broker: the key is asked back.
  const std::string k2 = key_for("lent-elsewhere");
  CallResult h = c1.acquire(req(k2, LockMode::Write, "H"));
  REQUIRE(h.status == CallStatus::Ok);
  CHECK(metric(b1->endpoint(), "gate_etcd_lent_locks") == 1);
  CallResult hb = c2.heartbeat(h.lock.lock_id, "H", 9'000);
  REQUIRE(hb.status == CallStatus::Ok);
  CHECK(hb.lock.fence == h.lock.fence);
  CHECK(metric(b1->endpoint(), "gate_etcd_lent_locks") == 0);
  REQUIRE(c2.release(h.lock.lock_id, "H").status == CallStatus::Ok);

  // A try on the other broker behind a lend nobody holds anything under: granted.
  const std::string k3 = key_for("idle-lend");
  CallResult once = c1.acquire(req(k3, LockMode::Write, "O"));
  REQUIRE(once.status == CallStatus::Ok);
  REQUIRE(c1.release(once.lock.lock_id, "O").status == CallStatus::Ok);
  CallResult tried = c2.acquire(req(k3, LockMode::Write, "T", 0));
  REQUIRE(tried.status == CallStatus::Ok);
  CHECK(tried.lock.fence > once.lock.fence);
  REQUIRE(c2.release(tried.lock.lock_id, "T").status == CallStatus::Ok);

  // A lend nobody holds anything under ends by itself.
  const std::string k4 = key_for("idle");
  CallResult idle = c1.acquire(req(k4, LockMode::Read, "I"));
  REQUIRE(idle.status == CallStatus::Ok);
  REQUIRE(c1.release(idle.lock.lock_id, "I").status == CallStatus::Ok);
  CHECK(test::eventually([&] { return metric(b1->endpoint(), "gate_etcd_lent_keys") == 0; }, 10s));
  CHECK(test::eventually([&] { return held(b2->endpoint(), k4) == 0; }));
}

TEST_CASE("with an etcd store a lent key is handed back in its place when someone else asks", "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = lending_broker(cluster);
  auto b2 = lending_broker(cluster);
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());

  SECTION("another broker's acquire: the lent lock keeps its id and fence, and FIFO holds") {
    const std::string k = key_for("asked");
    CallResult a = c1.acquire(req(k, LockMode::Write, "A"));
    REQUIRE(a.status == CallStatus::Ok);
    Pending b = acquire_async(b2->endpoint(), req(k, LockMode::Write, "B"));
    // The lend is adopted: broker 2 sees A's own lock, with B behind it.
    REQUIRE(test::eventually([&] {
      json::object st = status_of(b2->endpoint(), k);
      const json::array& locks = st.at("locks").as_array();
      return locks.size() == 1 && locks[0].at("lock_id").as_string() == a.lock.lock_id &&
             locks[0].at("fence").to_number<std::uint64_t>() == a.lock.fence && st.at("queue").as_array().size() == 1;
    }));
    CHECK(metric(b1->endpoint(), "gate_etcd_lent_keys") == 0);
    CHECK(metric(b1->endpoint(), "gate_etcd_adoptions_total") == 1);
    Pending c = acquire_async(b1->endpoint(), req(k, LockMode::Read, "C"));
    REQUIRE(queue_reaches(b2->endpoint(), k, 2));
    CHECK_FALSE(b.ready());
    // Released on the broker that did not lend it.
    REQUIRE(c2.release(a.lock.lock_id, "A", /*changed=*/true).status == CallStatus::Ok);
    REQUIRE(b.ready(10s));
    CallResult gb = b.result.get();
    REQUIRE(gb.status == CallStatus::Ok);
    CHECK(gb.lock.fence > a.lock.fence);
    CHECK(gb.lock.version == a.lock.fence);
    CHECK_FALSE(c.ready(300ms));  // the reader behind the writer waits
    REQUIRE(c1.release(gb.lock.lock_id, "B").status == CallStatus::Ok);
    REQUIRE(c.ready(10s));
    CallResult gc = c.result.get();
    REQUIRE(gc.status == CallStatus::Ok);
    CHECK(gc.lock.fence > gb.lock.fence);
    REQUIRE(c1.release(gc.lock.lock_id, "C").status == CallStatus::Ok);
  }

  SECTION("a wait among the broker's own clients goes etcd's way, behind the lent lock") {
    const std::string k = key_for("local");
    CallResult a = c1.acquire(req(k, LockMode::Read, "A"));
    REQUIRE(a.status == CallStatus::Ok);
    CallResult r = c1.acquire(req(k, LockMode::Read, "R"));  // readers share under the lend
    REQUIRE(r.status == CallStatus::Ok);
    CHECK(metric(b1->endpoint(), "gate_etcd_lent_locks") == 2);
    Pending w = acquire_async(b1->endpoint(), req(k, LockMode::Write, "W"));
    REQUIRE(queue_reaches(b2->endpoint(), k, 1));
    CHECK(held(b2->endpoint(), k) == 2);
    // A reader after the queued writer waits behind it, on the same broker.
    Pending r2 = acquire_async(b1->endpoint(), req(k, LockMode::Read, "R2"));
    REQUIRE(queue_reaches(b2->endpoint(), k, 2));
    REQUIRE(c1.release(a.lock.lock_id, "A").status == CallStatus::Ok);
    CHECK_FALSE(w.ready(300ms));
    REQUIRE(c2.release(r.lock.lock_id, "R").status == CallStatus::Ok);
    REQUIRE(w.ready(10s));
    CallResult gw = w.result.get();
    REQUIRE(gw.status == CallStatus::Ok);
    CHECK(gw.lock.fence > std::max(a.lock.fence, r.lock.fence));
    CHECK_FALSE(r2.ready(300ms));
    REQUIRE(c1.release(gw.lock.lock_id, "W").status == CallStatus::Ok);
    REQUIRE(r2.ready(10s));
    CallResult g2 = r2.result.get();
    REQUIRE(g2.status == CallStatus::Ok);
    CHECK(g2.lock.fence > gw.lock.fence);
  }

  SECTION("a deadlock through two brokers' lends is refused once they are handed back") {
    const std::string k1 = key_for("one"), k2 = key_for("two");
    REQUIRE(c1.acquire(req(k1, LockMode::Write, "S1")).status == CallStatus::Ok);
    CallResult s2 = c2.acquire(req(k2, LockMode::Write, "S2"));
    REQUIRE(s2.status == CallStatus::Ok);
    CHECK(metric(b1->endpoint(), "gate_etcd_lent_keys") == 1);
    CHECK(metric(b2->endpoint(), "gate_etcd_lent_keys") == 1);
    Pending w = acquire_async(b1->endpoint(), req(k2, LockMode::Write, "S1"));
    REQUIRE(queue_reaches(b2->endpoint(), k2, 1));
    Pending cycle = acquire_async(b2->endpoint(), req(k1, LockMode::Write, "S2"));
    REQUIRE(cycle.ready(10s));
    CallResult refused = cycle.result.get();
    CHECK(refused.status == CallStatus::Deadlock);
    CHECK(refused.error.find("S2") != std::string::npos);
    CHECK_FALSE(w.ready());
    REQUIRE(c2.release(s2.lock.lock_id, "S2").status == CallStatus::Ok);
    REQUIRE(w.ready(10s));
    CHECK(w.result.get().status == CallStatus::Ok);
  }
}

TEST_CASE("with an etcd store a lender stopped or killed and started again keeps its lent locks",
          "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = lending_broker(cluster, {"--etcd-session-ttl", "6"});
  auto b2 = lending_broker(cluster);
  const std::string k = key_for("restart");
  CallResult h = BrokerClient(b1->endpoint()).acquire(req(k, LockMode::Write, "H"));
  REQUIRE(h.status == CallStatus::Ok);
  REQUIRE(metric(b1->endpoint(), "gate_etcd_lent_locks") == 1);
  SECTION("stopped: it hands its lent keys back") { CHECK(b1->stop() == 0); }
  SECTION("killed: its journal (lent.db) has them") { b1->kill9(); }
  b1->start();  // the same state directory: the same session, while it lives
  BrokerClient c1(b1->endpoint()), c2(b2->endpoint());
  CHECK(c1.heartbeat(h.lock.lock_id, "H").status == CallStatus::Ok);
  CHECK(c1.acquire(req(k, LockMode::Write, "X", 0)).status == CallStatus::Timeout);  // still held
  REQUIRE(c2.release(h.lock.lock_id, "H").status == CallStatus::Ok);
  CallResult x = c1.acquire(req(k, LockMode::Write, "X", 0));
  REQUIRE(x.status == CallStatus::Ok);
  CHECK(x.lock.fence > h.lock.fence);
}

TEST_CASE("with an etcd store a killed lender's lent locks end with its session", "[etcd][broker][lend]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  auto b1 = lending_broker(cluster, {"--etcd-session-ttl", "3"});
  auto b2 = lending_broker(cluster, {"--etcd-session-ttl", "3"});
  const std::string k = key_for("lender");
  AcquireRequest r = req(k, LockMode::Write, "H");
  r.lease_ms = 600'000;
  CallResult h = BrokerClient(b1->endpoint()).acquire(r);
  REQUIRE(h.status == CallStatus::Ok);
  REQUIRE(metric(b1->endpoint(), "gate_etcd_lent_locks") == 1);
  b1->kill9();
  const auto killed = Clock::now();
  Pending w = acquire_async(b2->endpoint(), req(k, LockMode::Write, "W"));
  REQUIRE(w.ready(15s));
  const auto waited = Clock::now() - killed;
  CallResult g = w.result.get();
  REQUIRE(g.status == CallStatus::Ok);
  CHECK(g.lock.fence > h.lock.fence);
  CHECK(waited <= 4'000ms);
  CHECK(BrokerClient(b2->endpoint()).heartbeat(h.lock.lock_id, "H").status == CallStatus::NotFound);
}
