// gate's etcd client (lib/etcd) against a real 3-member etcd cluster on loopback:
// keys, guarded transactions, leases, watches across a member's death and a
// compaction, members and quorum lost and regained, and answers that are not etcd's.
#include <catch2/catch.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <thread>

#include "etcd/etcd_client.h"
#include "etcd/etcd_watch.h"
#include "etcd/txn_batcher.h"
#include "support/etcd_cluster.h"

using namespace gate;
using namespace gate::etcd;
using namespace std::chrono_literals;
namespace json = boost::json;
namespace fs = std::filesystem;

namespace {

// The updates a watch delivered, for the test thread to look at.
struct Seen {
  std::mutex mu;
  std::vector<WatchEvent> events;
  std::vector<WatchUpdate> compactions;
  void add(const WatchUpdate& u) {
    std::lock_guard lock(mu);
    if (u.compacted) compactions.push_back(u);
    events.insert(events.end(), u.events.begin(), u.events.end());
  }
  std::size_t count() {
    std::lock_guard lock(mu);
    return events.size();
  }
};

}  // namespace

TEST_CASE("the etcd client reads writes and runs guarded transactions on a real cluster", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  EtcdClient c(cluster.endpoints());

  Result<std::int64_t> r1 = c.put("/t/a", "one");
  REQUIRE(r1.ok());
  Result<std::int64_t> r2 = c.put("/t/b", std::string("two\0bytes\xff", 10));
  REQUIRE(r2.ok());
  CHECK(*r2 > *r1);

  Result<RangeResult> all = c.range(range_request("/t/", prefix_end("/t/")));
  REQUIRE(all.ok());
  REQUIRE(all->kvs.size() == 2);
  CHECK(all->kvs[0].key == "/t/a");
  CHECK(all->kvs[0].value == "one");
  CHECK(all->kvs[1].value == std::string("two\0bytes\xff", 10));  // bytes, not text
  CHECK(all->kvs[1].create_revision == *r2);
  CHECK(all->count == 2);

  // Create-if-absent: the compare holds once.
  auto create = [&](const std::string& key) {
    return c.txn({compare(key, "CREATE", "EQUAL", 0)}, {json::object{{"request_put", put_request(key, "x")}}},
                 {json::object{{"request_range", range_request(key)}}}, Retry::Idempotent);
  };
  Result<TxnResult> first = create("/t/c");
  REQUIRE(first.ok());
  CHECK(first->succeeded);
  Result<TxnResult> second = create("/t/c");
  REQUIRE(second.ok());
  CHECK_FALSE(second->succeeded);
  REQUIRE(second->responses.size() == 1);  // the failure branch's range
  Result<RangeResult> existing = decode_range(second->responses[0].as_object().at("response_range").as_object());
  REQUIRE(existing.ok());
  REQUIRE(existing->kvs.size() == 1);
  CHECK(existing->kvs[0].create_revision == first->revision);

  Result<std::int64_t> deleted = c.delete_range("/t/", prefix_end("/t/"));
  REQUIRE(deleted.ok());
  CHECK(*deleted == 3);
  Result<RangeResult> none = c.range(range_request("/t/", prefix_end("/t/")));
  REQUIRE(none.ok());
  CHECK(none->kvs.empty());  // (the gateway leaves an empty kvs out)
}

TEST_CASE("batched transactions each hold or fail on their own compares and answer as if sent alone", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  TxnBatcher batcher(32, 1);
  constexpr int kThreads = 12, kEach = 30;
  // Each thread makes its keys once (create-if-absent), then tries again: the second
  // try's compare fails and its failure branch reads the first one's key.
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      EtcdClient c(cluster.endpoints());
      while (!go) std::this_thread::yield();
      for (int i = 0; i < kEach; ++i) {
        const std::string key = "/b/" + std::to_string(t) + "/" + std::to_string(i);
        auto attempt = [&] {
          return batcher.txn(c, "group-" + std::to_string(t), Share::Decides, {compare(key, "CREATE", "EQUAL", 0)},
                             {txn_put(key, std::to_string(t))}, {txn_range(key)}, Retry::Idempotent);
        };
        Result<TxnResult> made = attempt();
        Result<TxnResult> again = attempt();
        if (!made.ok() || !made->succeeded || !again.ok() || again->succeeded || again->responses.size() != 1) {
          ++wrong;
          continue;
        }
        Result<RangeResult> seen = decode_range(again->responses[0].as_object().at("response_range").as_object());
        if (!seen.ok() || seen->kvs.size() != 1 || seen->kvs[0].value != std::to_string(t) ||
            seen->kvs[0].create_revision != made->revision || again->revision < made->revision)
          ++wrong;
      }
    });
  go = true;
  for (auto& th : threads) th.join();
  CHECK(wrong == 0);
  CHECK(batcher.transactions() == 2 * kThreads * kEach);
  // Twelve threads at once share calls to etcd.
  CHECK(batcher.batches() < batcher.transactions());
  INFO("batches " << batcher.batches() << " for " << batcher.transactions() << " transactions");

  // Two decisions of one group never share a batch (two writes of one key would make
  // etcd refuse it: the batch would go again one by one, and count more calls); its
  // appends do, each making its own key.
  for (Share share : {Share::Decides, Share::Alone, Share::Append}) {
    TxnBatcher one_group(32, 1);
    threads.clear();
    std::atomic<int> refused{0};
    for (int t = 0; t < 6; ++t)
      threads.emplace_back([&, t] {
        EtcdClient c(cluster.endpoints());
        for (int i = 0; i < 20; ++i) {
          const std::string key = share == Share::Append ? "/b/same/" + std::to_string(t) + "-" + std::to_string(i) : "/b/same";
          if (Result<TxnResult> r = one_group.txn(c, "same", share, {}, {txn_put(key, "v")}, {}, Retry::Idempotent);
              !r.ok() || !r->succeeded)
            ++refused;
        }
      });
    for (auto& th : threads) th.join();
    INFO("share " << static_cast<int>(share) << ": batches " << one_group.batches() << " for "
                  << one_group.transactions());
    CHECK(refused == 0);
    CHECK(one_group.transactions() == 120);
    if (share == Share::Append)
      CHECK(one_group.batches() < one_group.transactions());
    else
      CHECK(one_group.batches() == one_group.transactions());
  }
}

TEST_CASE("a batch waits behind a stuck call and sends appends first so a failed decision reads them", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  const int leader = cluster.leader();
  REQUIRE(leader >= 0);
  const int follower = (leader + 1) % cluster.size();
  TxnBatcher batcher(32, 4, 60s);  // (a second batch goes only past a stuck one: not here)
  REQUIRE(EtcdClient(cluster.endpoints()).put("/g/held", "h").ok());

  // The first call goes to a member that answers nothing until it is resumed.
  cluster.pause(follower);
  struct Resume {  // (even when a check below fails)
    test::EtcdCluster& c;
    int i;
    ~Resume() { c.resume(i); }
  } resume{cluster, follower};
  Result<TxnResult> stuck = Status::failure("not sent"), decided = stuck, appended = stuck;
  std::thread first([&] {
    EtcdClient to_paused({cluster.endpoint(follower)}, 30s);
    stuck = batcher.txn(to_paused, "other", Share::Decides, {}, {txn_put("/o/x", "x")}, {}, Retry::Idempotent);
  });
  REQUIRE(test::eventually([&] { return batcher.batches() == 1; }));
  // Queued behind it, in this order: a decision on /g/ whose compare fails, then an
  // append to /g/.
  std::thread decide([&] {
    EtcdClient c(cluster.endpoints());
    decided = batcher.txn(c, "g", Share::Decides, {compare("/g/held", "MOD", "EQUAL", 1)}, {txn_delete("/g/held")},
                          {txn_range("/g/", prefix_end("/g/"))}, Retry::Idempotent);
  });
  REQUIRE(test::eventually([&] { return batcher.waiting() == 1; }));
  std::thread append([&] {
    EtcdClient c(cluster.endpoints());
    appended = batcher.txn(c, "g", Share::Append, {compare("/g/new", "CREATE", "EQUAL", 0)}, {txn_put("/g/new", "n")},
                           {}, Retry::Idempotent);
  });
  REQUIRE(test::eventually([&] { return batcher.waiting() == 2; }));
  CHECK(batcher.batches() == 1);  // nothing went past the call out
  cluster.resume(follower);
  first.join();
  decide.join();
  append.join();
  REQUIRE(stuck.ok());
  REQUIRE(decided.ok());
  REQUIRE(appended.ok());
  CHECK(batcher.batches() == 2);  // the two waiting went together
  CHECK(appended->succeeded);
  CHECK_FALSE(decided->succeeded);
  CHECK(decided->revision == appended->revision);
  // The failed decision's read is its queue as of the batch's revision: the append in it.
  REQUIRE(decided->responses.size() == 1);
  Result<RangeResult> seen = decode_range(decided->responses[0].as_object().at("response_range").as_object());
  REQUIRE(seen.ok());
  std::vector<std::string> keys;
  for (const KeyValue& kv : seen->kvs) keys.push_back(kv.key);
  CHECK(keys == std::vector<std::string>{"/g/held", "/g/new"});
}

TEST_CASE("leader_first puts the member that leads first and keeps the others", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  const std::vector<Endpoint> given = cluster.endpoints();
  const std::vector<Endpoint> ordered = leader_first(given, 2s);
  REQUIRE(ordered.size() == given.size());
  const int leader = cluster.leader();
  REQUIRE(leader >= 0);
  CHECK(ordered.front().str() == given[static_cast<std::size_t>(leader)].str());
  for (const Endpoint& e : given)
    CHECK(std::count_if(ordered.begin(), ordered.end(), [&](const Endpoint& o) { return o.str() == e.str(); }) == 1);
  // A member that does not answer is left where it was.
  cluster.kill(leader == 0 ? 1 : 0);
  CHECK(leader_first(given, 500ms).front().str() == given[static_cast<std::size_t>(leader)].str());
}

TEST_CASE("a lease's keys live while it is kept alive and vanish when it is not", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  EtcdClient c(cluster.endpoints());
  Result<std::int64_t> lease = c.lease_grant(2);
  REQUIRE(lease.ok());
  REQUIRE(c.put("/l/kept", "v", *lease).ok());
  // Kept alive across three TTLs: the key stays.
  const auto until = std::chrono::steady_clock::now() + 4500ms;
  while (std::chrono::steady_clock::now() < until) {
    Result<std::int64_t> ttl = c.lease_keepalive(*lease);
    REQUIRE(ttl.ok());
    CHECK(*ttl >= 1);
    std::this_thread::sleep_for(500ms);  // the keep-alive period under test
  }
  REQUIRE(c.range(range_request("/l/kept"))->kvs.size() == 1);
  // Left alone: gone within the TTL and a second.
  const auto left = std::chrono::steady_clock::now();
  CHECK(test::eventually([&] { return c.range(range_request("/l/kept"))->kvs.empty(); }, 4s));
  CHECK(std::chrono::steady_clock::now() - left < 3500ms);
  Result<std::int64_t> gone = c.lease_keepalive(*lease);
  REQUIRE(gone.ok());
  CHECK(*gone == 0);  // a lease etcd no longer has
  CHECK(*c.lease_ttl(*lease) == -1);

  Result<std::int64_t> other = c.lease_grant(30);
  REQUIRE(other.ok());
  REQUIRE(c.put("/l/revoked", "v", *other).ok());
  REQUIRE(c.lease_revoke(*other).ok());
  CHECK(c.range(range_request("/l/revoked"))->kvs.empty());
}

TEST_CASE("a watch delivers every change once and in order across the death of its member", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  // (killing a member may kill the leader: the next puts wait for an election, which
  // takes seconds on a loaded machine)
  EtcdClient c(cluster.endpoints(), 15s);
  const std::int64_t start = *c.put("/w/start", "") + 1;
  Seen seen;
  std::atomic<int> problems{0};
  // The watch asks the members in order: the first one serves it.
  EtcdWatch watch(cluster.endpoints(), "/w/", prefix_end("/w/"), start, [&](const WatchUpdate& u) { seen.add(u); },
                  [&](const std::string&) { ++problems; });
  for (int i = 0; i < 20; ++i) REQUIRE(c.put("/w/k" + std::to_string(i % 5), std::to_string(i)).ok());
  REQUIRE(test::eventually([&] { return seen.count() == 20; }));
  cluster.kill(0);
  for (int i = 20; i < 40; ++i) REQUIRE(c.put("/w/k" + std::to_string(i % 5), std::to_string(i)).ok());
  REQUIRE(c.delete_range("/w/k0").ok());
  REQUIRE(test::eventually([&] { return seen.count() == 41; }, 20s));
  CHECK(problems >= 1);  // it noticed and moved on
  std::lock_guard lock(seen.mu);
  for (int i = 0; i < 40; ++i) {
    INFO("event " << i);
    CHECK(seen.events[static_cast<std::size_t>(i)].kv.value == std::to_string(i));
    CHECK_FALSE(seen.events[static_cast<std::size_t>(i)].deleted);
  }
  CHECK(seen.events[40].deleted);
  CHECK(seen.events[40].kv.key == "/w/k0");
  for (std::size_t i = 1; i < seen.events.size(); ++i)
    CHECK(seen.events[i].kv.mod_revision > seen.events[i - 1].kv.mod_revision);
}

TEST_CASE("a watch from a compacted revision ends and says where history starts", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster(1);
  EtcdClient c(cluster.endpoints());
  const std::int64_t first = *c.put("/c/a", "1");
  std::int64_t last = 0;
  for (int i = 0; i < 5; ++i) last = *c.put("/c/a", std::to_string(i));
  REQUIRE(c.compact(last).ok());
  Seen seen;
  EtcdWatch watch(cluster.endpoints(), "/c/", prefix_end("/c/"), first, [&](const WatchUpdate& u) { seen.add(u); });
  REQUIRE(test::eventually([&] { return !watch.running(); }));
  std::lock_guard lock(seen.mu);
  REQUIRE(seen.compactions.size() == 1);
  CHECK(seen.compactions[0].compact_revision == last);
  CHECK(seen.events.empty());
}

TEST_CASE("the client goes round dead members and says clearly when no member answers", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  // A patient client for what must work, and one with a short deadline for what fails.
  // (The first member may lead: killing it costs an election, seconds on a busy machine.)
  EtcdClient patient(cluster.endpoints(), 20s);
  EtcdClient c(cluster.endpoints(), 4s);
  REQUIRE(c.put("/m/a", "1").ok());
  cluster.kill(0);  // the one both clients use first
  Result<std::int64_t> again = patient.put("/m/a", "2");
  INFO(again.message());
  CHECK(again.ok());
  CHECK(patient.current().port != cluster.endpoint(0).port);

  SECTION("quorum lost: a clear failure within the deadline; back when a member returns") {
    cluster.kill(1);
    const auto t0 = std::chrono::steady_clock::now();
    Result<std::int64_t> lost = c.put("/m/a", "3");
    const auto took = std::chrono::steady_clock::now() - t0;
    INFO(lost.message());
    CHECK_FALSE(lost.ok());
    CHECK(took < 6s);
    CHECK((lost.message().find("no etcd member answered") != std::string::npos ||
           lost.message().find("etcd at 127.0.0.1:") != std::string::npos));
    cluster.start(1);
    REQUIRE(cluster.wait_healthy(30s));
    CHECK(patient.put("/m/a", "4").ok());
    CHECK(patient.range(range_request("/m/a"))->kvs.at(0).value == "4");
  }
  SECTION("every member gone: the call fails at its deadline and names the last error") {
    cluster.kill(1);
    cluster.kill(2);
    const auto t0 = std::chrono::steady_clock::now();
    Result<RangeResult> r = c.range(range_request("/m/a"));
    CHECK_FALSE(r.ok());
    CHECK(std::chrono::steady_clock::now() - t0 < 6s);
    CHECK(r.message().find("no etcd member answered /v3/kv/range within 4000 ms") != std::string::npos);
    CHECK(r.message().find("cannot connect") != std::string::npos);
  }
}

TEST_CASE("answers that are not etcd's give clear errors and no crash", "[etcd]") {
  // A loopback HTTP server that answers etcd's routes with files of our choosing.
  test::TempDir dir("gate-etcd-bad");
  fs::create_directories(dir.path() + "/www/v3/kv");
  std::ofstream(dir.path() + "/www/v3/kv/range") << "<html>not etcd</html>";
  std::ofstream(dir.path() + "/www/v3/kv/put") << R"({"header":{"revision":"7"}})";
  std::ofstream(dir.path() + "/www/v3/kv/txn") << R"({"kvs":"not an array"})";
  fs::create_directories(dir.path() + "/www/v3/lease");
  std::ofstream(dir.path() + "/www/v3/lease/grant") << R"({"header":{}})";
  test::Child server = test::Child::spawn(
      {GATE_TEST_MIRROR, dir.path() + "/www", dir.path() + "/port", dir.path() + "/requests.log"});
  REQUIRE(test::eventually([&] { return fs::exists(dir.path() + "/port"); }));
  const std::string port = std::to_string(std::stoi(test::read_file(dir.path() + "/port")));
  EtcdClient c({{"127.0.0.1", port}}, 2s);

  Result<RangeResult> r = c.range(range_request("k"));
  CHECK_FALSE(r.ok());
  CHECK(r.message().find("answered /v3/kv/range with something that is not its JSON: <html>") != std::string::npos);
  Result<std::int64_t> p = c.put("k", "v");  // well formed: accepted
  CHECK(p.ok());
  CHECK(*p == 7);
  Result<std::int64_t> g = c.lease_grant(5);
  CHECK_FALSE(g.ok());
  CHECK(g.message().find("etcd granted no lease") != std::string::npos);
  Result<json::object> missing = c.call("kv/nothing", {}, Retry::Idempotent);
  CHECK_FALSE(missing.ok());
  CHECK(missing.message().find("(HTTP 404)") != std::string::npos);
  CHECK(decode_range(json::object{{"kvs", "not an array"}}).message() == "kvs is not an array");
  CHECK_FALSE(decode_kv(json::object{{"key", "***"}}).ok());
}

// ---- a broker's mirror of the shared lock space (etcd/space_mirror.h) ----
#include "etcd/space_mirror.h"

namespace {

Entry space_entry(const std::string& lock_key, const std::string& request, const std::string& owner, LockMode mode) {
  Entry e;
  e.key = queue_key(lock_key, request);
  e.lock_key = lock_key;
  e.owner = owner;
  e.mode = mode;
  return e;
}

// What the mirror holds for `lock_key`: "owner:mode[:held]" in queue order.
std::string mirrored(const SpaceMirror& m, const std::string& lock_key) {
  std::string out;
  for (const Entry& e : m.queue(lock_key)) out += e.owner + ":" + to_string(e.mode) + (e.held ? ":held " : " ");
  return out;
}

}  // namespace

TEST_CASE("a broker's mirror follows the shared lock space in create-revision order", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  EtcdClient c(cluster.endpoints(), 15s);
  Entry a = space_entry("src/a.c", "b1-1", "o1", LockMode::Read);
  REQUIRE(c.put(a.key, encode_entry(a)).ok());
  REQUIRE(c.put(all_queues_prefix() + "zz/not-gate", "junk").ok());  // someone else's key
  SpaceMirror m(cluster.endpoints());
  REQUIRE(m.start().ok());
  CHECK(mirrored(m, "src/a.c") == "o1:read ");
  CHECK(m.skipped() == 1);

  // Later entries queue behind, whichever request name they have; a change is seen in
  // place; a delete takes the entry out.
  Entry w = space_entry("src/a.c", "a0-9", "o2", LockMode::Write);
  const std::int64_t r1 = *c.put(w.key, encode_entry(w));
  REQUIRE(m.wait_for(r1, 10s));
  CHECK(mirrored(m, "src/a.c") == "o1:read o2:write ");
  a.held = true;
  a.hold_count = 1;
  const std::int64_t r2 = *c.put(a.key, encode_entry(a));
  REQUIRE(m.wait_for(r2, 10s));
  CHECK(mirrored(m, "src/a.c") == "o1:read:held o2:write ");
  CHECK(standings(m.queue("src/a.c")) == std::vector{Standing::Held, Standing::Waiting});
  REQUIRE(c.delete_range(a.key).ok());
  const std::int64_t r3 = *c.put(queue_key("other", "x"), encode_entry(space_entry("other", "x", "o3", LockMode::Read)));
  REQUIRE(m.wait_for(r3, 10s));
  CHECK(mirrored(m, "src/a.c") == "o2:write ");
  CHECK(standings(m.queue("src/a.c")) == std::vector{Standing::Grantable});
  CHECK(m.snapshot().size() == 2);
}

TEST_CASE("a mirror indexes what ends and what waits as entries come change and go", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  EtcdClient c(cluster.endpoints(), 15s);
  SpaceMirror m(cluster.endpoints());
  REQUIRE(m.start().ok());
  auto held = [](const std::string& key, const std::string& req, const std::string& owner, Micros ends) {
    Entry e = space_entry(key, req, owner, LockMode::Write);
    e.held = true;
    e.hold_count = 1;
    e.lock_id = "id-" + req;
    e.lease_expires_at = ends;
    return e;
  };
  auto names = [](const std::vector<Entry>& es) {
    std::string out;
    for (const Entry& e : es) out += e.owner + " ";
    return out;
  };
  const Entry h1 = held("k1", "r1", "h1", 1'000), h2 = held("k2", "r2", "h2", 5'000);
  const Entry w1 = space_entry("k1", "r3", "w1", LockMode::Write);
  std::int64_t rev = 0;
  for (const Entry& e : {h1, h2, w1}) rev = *c.put(e.key, encode_entry(e));
  REQUIRE(m.wait_for(rev, 10s));
  SpaceMirror::Due d = m.due(2'000, "");
  CHECK(names(d.ended) == "h1 ");
  CHECK(d.next_end == 5'000);
  CHECK(names(d.waiting) == "w1 ");
  CHECK(m.due(2'000, "another broker").waiting.empty());  // (a broker sweeps its own)
  CHECK(m.contested("").size() == 1);  // k1 only: nothing waits on k2
  CHECK(m.contested("").at("k1").size() == 2);
  CHECK(m.contested("k2").size() == 2);  // and the queue asked for
  CHECK(m.counts() == std::pair<std::size_t, std::size_t>{2, 1});
  CHECK(m.entry(w1.key).has_value());

  // A heartbeat moves an end; a grant turns a waiter into a holder; a delete ends all.
  Entry renewed = h1;
  renewed.lease_expires_at = 9'000;
  REQUIRE(c.put(h1.key, encode_entry(renewed)).ok());
  REQUIRE(c.delete_range(h2.key).ok());
  Entry granted = w1;
  granted.held = true;
  granted.hold_count = 1;
  granted.lock_id = "id-r3";
  granted.lease_expires_at = 3'000;
  rev = *c.put(w1.key, encode_entry(granted));
  REQUIRE(m.wait_for(rev, 10s));
  d = m.due(4'000, "");
  CHECK(names(d.ended) == "w1 ");
  CHECK(d.next_end == 9'000);
  CHECK(d.waiting.empty());
  CHECK(m.contested("").empty());
  CHECK(m.find_lock("id-r3").has_value());
  CHECK_FALSE(m.find_lock("id-r2").has_value());
  // A value that is not an entry over a held one takes it out of every index; a new
  // lock id replaces the old one.
  rev = *c.put(w1.key, "not an entry");
  Entry again = renewed;
  again.lock_id = "id-new";
  rev = std::max(rev, *c.put(h1.key, encode_entry(again)));
  REQUIRE(m.wait_for(rev, 10s));
  CHECK(m.due(4'000, "").ended.empty());
  CHECK(m.counts() == std::pair<std::size_t, std::size_t>{1, 0});
  CHECK_FALSE(m.find_lock("id-r3").has_value());
  CHECK_FALSE(m.find_lock("id-r1").has_value());
  CHECK(m.find_lock("id-new").has_value());
  REQUIRE(c.delete_range(all_queues_prefix(), prefix_end(all_queues_prefix())).ok());
  rev = *c.put("/gate/v1/b/x", "probe");
  REQUIRE(m.wait_for(rev, 10s));
  d = m.due(1'000'000, "");
  CHECK(d.ended.empty());
  CHECK_FALSE(d.next_end.has_value());
  CHECK_FALSE(m.find_lock("id-r1").has_value());
  // A lend entry ends with its broker, never by time: nothing due, no time to wake at,
  // and it is not a waiter either.
  Entry lend = held("k3", "b1-lend-1", "broker:b1", 0);
  lend.lend = true;
  rev = *c.put(lend.key, encode_entry(lend));
  REQUIRE(m.wait_for(rev, 10s));
  d = m.due(std::numeric_limits<Micros>::max() - 1, "");
  CHECK(d.ended.empty());
  CHECK_FALSE(d.next_end.has_value());
  CHECK(d.waiting.empty());
  CHECK(m.entry(lend.key).has_value());
  REQUIRE(c.delete_range(lend.key).ok());
}

TEST_CASE("a mirror whose watch missed compacted history reads the space again", "[etcd]") {
  REQUIRE(test::etcd_installed());
  test::EtcdCluster cluster;
  // The mirror knows one member; the writer the two others.
  SpaceMirror m({cluster.endpoint(0)});
  REQUIRE(m.start().ok());
  EtcdClient c({cluster.endpoint(1), cluster.endpoint(2)}, 15s);
  cluster.kill(0);
  std::int64_t last = 0;
  for (int i = 0; i < 5; ++i) {
    Entry e = space_entry("k", "r" + std::to_string(i), "o" + std::to_string(i), LockMode::Read);
    last = *c.put(e.key, encode_entry(e));
  }
  REQUIRE(c.delete_range(queue_key("k", "r0")).ok());
  last = *c.put(queue_key("k", "r1"), encode_entry(space_entry("k", "r1", "o1", LockMode::Write)));
  REQUIRE(c.compact(last).ok());
  cluster.start(0);  // back, behind: the watch's next revision is gone
  REQUIRE(m.wait_for(last, 30s));
  CHECK(test::eventually([&] { return m.resyncs() == 1; }, 10s));
  CHECK(mirrored(m, "k") == "o1:write o2:read o3:read o4:read ");
  // And it follows again after the read.
  const std::int64_t after = *c.put(queue_key("k", "r5"), encode_entry(space_entry("k", "r5", "o5", LockMode::Read)));
  REQUIRE(m.wait_for(after, 20s));
  CHECK(mirrored(m, "k") == "o1:write o2:read o3:read o4:read o5:read ");
}
