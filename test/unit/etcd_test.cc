// The pieces of gate's etcd client that need no etcd: base64 as the gateway writes
// it, the --store syntax, key ranges, requests and the decoding of answers.
#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>

#include "core/base64.h"
#include "etcd/etcd_client.h"

using namespace gate;
using namespace gate::etcd;
namespace json = boost::json;

TEST_CASE("base64 round-trips every byte and refuses what is not base64", "[etcd]") {
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("/gate/v1/q") == "L2dhdGUvdjEvcQ==");
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  for (std::size_t n = 0; n <= all.size(); n += 37) CHECK(base64_decode(base64_encode(all.substr(0, n))) == all.substr(0, n));
  CHECK_FALSE(base64_decode("Zg=").has_value());   // length
  CHECK_FALSE(base64_decode("Z*==").has_value());  // alphabet
  CHECK_FALSE(base64_decode("Z=g=").has_value());  // padding inside
  CHECK_FALSE(base64_decode("Zg==Zm8=").has_value());
}

TEST_CASE("an etcd store is named as etcd://HOST:PORT with more members after commas", "[etcd]") {
  auto one = parse_store("etcd://127.0.0.1:23790");
  REQUIRE(one.ok());
  REQUIRE(one->size() == 1);
  CHECK((*one)[0].host == "127.0.0.1");
  CHECK((*one)[0].port == "23790");
  auto three = parse_store("etcd://a:1,b:2,[::1]:3");
  REQUIRE(three.ok());
  REQUIRE(three->size() == 3);
  CHECK((*three)[2].host == "::1");
  for (const char* bad : {"http://a:1", "etcd://", "etcd://a", "etcd://a:", "etcd://:1", "etcd://a:1,", "etcd://a:x"}) {
    INFO(bad);
    auto r = parse_store(bad);
    CHECK_FALSE(r.ok());
    CHECK_FALSE(r.message().empty());
  }
}

TEST_CASE("a prefix's range ends at the next key that does not start with it", "[etcd]") {
  CHECK(prefix_end("/q/") == "/q0");
  CHECK(prefix_end("a\xff") == "b");
  CHECK(prefix_end(std::string("\xff\xff", 2)) == std::string(1, '\0'));
}

TEST_CASE("requests are written as the gateway wants and answers read as it writes them", "[etcd]") {
  json::object c = compare("k", "CREATE", "EQUAL", 0);
  CHECK(c.at("key") == "aw==");
  CHECK(c.at("create_revision") == "0");
  CHECK(put_request("k", "v", 42).at("lease") == "42");
  CHECK_FALSE(put_request("k", "v").contains("lease"));
  // int64 as strings, defaults left out.
  json::object answer = json::parse(R"({"header":{"revision":"9"},"kvs":[{"key":"aw==","create_revision":"5",
      "mod_revision":"8","version":"2","value":"dg=="},{"key":"bA==","create_revision":"6","mod_revision":"6",
      "version":"1"}],"count":"2"})").as_object();
  Result<RangeResult> r = decode_range(answer);
  REQUIRE(r.ok());
  CHECK(r->revision == 9);
  CHECK(r->count == 2);
  REQUIRE(r->kvs.size() == 2);
  CHECK(r->kvs[0].key == "k");
  CHECK(r->kvs[0].value == "v");
  CHECK(r->kvs[0].create_revision == 5);
  CHECK(r->kvs[1].value.empty());
  CHECK(r->kvs[1].lease == 0);
  CHECK(decode_range(json::object{})->kvs.empty());
  CHECK(json_int(json::object{{"n", "x"}}, "n") == 0);
}

// ---- the lock space as etcd keeps it (etcd/etcd_space.h) ----
#include <random>

#include "etcd/etcd_space.h"
#include "lock/lock_table.h"

namespace {

Entry entry(std::int64_t rev, const std::string& owner, LockMode mode, bool held = false,
            const std::string& lock_key = "f", const std::string& session = "") {
  Entry e;
  e.key = queue_key(lock_key, "r" + std::to_string(rev));
  e.create_revision = e.mod_revision = rev;
  e.lock_key = lock_key;
  e.mode = mode;
  e.owner = owner;
  e.session = session;
  e.held = held;
  e.hold_count = held ? 1 : 0;
  return e;
}

constexpr auto R = LockMode::Read;
constexpr auto W = LockMode::Write;

}  // namespace

TEST_CASE("the etcd key layout keeps any lock key apart from the slashes of etcd's keys", "[etcd]") {
  for (const std::string& k : {std::string("src/main.c"), std::string("."), std::string("a/b/\xff\x01 c", 9)}) {
    CHECK(unhex(hex(k)) == k);
    CHECK(queue_key(k, "b1-7").rfind(queue_prefix(k), 0) == 0);
    CHECK(lock_key_of(queue_key(k, "b1-7")) == k);
    CHECK(queue_prefix(k).find('/', all_queues_prefix().size()) == queue_prefix(k).size() - 1);
  }
  CHECK_FALSE(lock_key_of(version_key("x")).has_value());
  CHECK_FALSE(lock_key_of(all_queues_prefix() + "zz/r").has_value());  // not hex
  CHECK_FALSE(lock_key_of(queue_prefix("f")).has_value());              // no request
  CHECK_FALSE(unhex("abc").has_value());
}

TEST_CASE("a queue entry survives its trip through etcd and a damaged one is refused", "[etcd]") {
  Entry e = entry(42, "o1", W, true, "src/a.c", "m:7");
  e.broker = "b1";
  e.request_id = "req";
  e.lock_id = "L1";
  e.hold_count = 2;
  e.acquired_at = 1000;
  e.lease_expires_at = 31000;
  e.lease_ms = 30;
  e.max_hold_ms = 5;
  e.slot = 3;
  KeyValue kv{e.key, encode_entry(e), 42, 43, 1, 0};
  Result<Entry> back = decode_entry(kv);
  REQUIRE(back.ok());
  CHECK(back->lock_key == "src/a.c");
  CHECK(back->mode == W);
  CHECK(back->session == "m:7");
  CHECK(back->held);
  CHECK(back->hold_count == 2);
  CHECK(back->lease_expires_at == 31000);
  CHECK(back->max_hold_ms == 5);
  CHECK(back->mod_revision == 43);
  // (the slot tells apart one batch's entries; a lend's grants take the fences between)
  CHECK(back->fence() == (42 * kFenceSlots + 3) * kSlotFences);
  e.slot = 0;
  CHECK(decode_entry(KeyValue{e.key, encode_entry(e), 42, 43, 1, 0})->fence() == 42 * kFenceSlots * kSlotFences);
  CHECK(back->ends_at() == 6000);  // the cap comes first

  auto refused = [&](std::string key, std::string value) {
    Result<Entry> r = decode_entry(KeyValue{std::move(key), std::move(value), 1, 1, 1, 0});
    return r.ok() ? std::string() : r.message();
  };
  CHECK(refused(kv.key, "not json").find("not JSON") != std::string::npos);
  CHECK(refused(version_key("x"), kv.value).find("not a queue key") != std::string::npos);
  CHECK(refused(kv.key, R"({"m":"both","o":"o"})").find("mode 'both'") != std::string::npos);
  CHECK(refused(kv.key, R"({"m":"r"})").find("no owner") != std::string::npos);
  CHECK(refused(kv.key, R"({"m":"r","o":"o","n":-1})").find("hold count") != std::string::npos);
  CHECK(refused(kv.key, R"({"m":"r","o":"o","sl":64})").find("slot 64") != std::string::npos);
  // A waiting entry: no hold count.
  Result<Entry> waiting = decode_entry(KeyValue{kv.key, R"({"m":"r","o":"o"})", 7, 7, 1, 0});
  REQUIRE(waiting.ok());
  CHECK_FALSE(waiting->held);
  CHECK(waiting->lock_key == "src/a.c");
}

TEST_CASE("a lend entry is one write holder that never ends by time and an adopted lock keeps its place",
          "[etcd]") {
  Entry lend = entry(10, "broker:b1", W, true, "src/a.c");
  lend.lend = true;
  lend.slot = 2;
  lend.lease_expires_at = 5;  // (ignored: a lend has no lease)
  Result<Entry> back = decode_entry(KeyValue{lend.key, encode_entry(lend), 10, 10, 1, 0});
  REQUIRE(back.ok());
  CHECK(back->lend);
  CHECK(back->ends_at() == std::numeric_limits<Micros>::max());
  CHECK(expired({*back}, std::numeric_limits<Micros>::max() - 1).empty());
  // Readers and writers of other owners wait behind it; a later entry's fence is above
  // every fence the lend can give (its own + 1 ... + kSlotFences - 1).
  Entry r = entry(11, "o2", R), w = entry(12, "o3", W);
  CHECK(standings({*back, r, w}) == std::vector{Standing::Held, Standing::Waiting, Standing::Waiting});
  CHECK(back->fence() + kSlotFences - 1 < r.fence());
  // Its lent locks, adopted after r came, take the lend's place by their own fences.
  Entry adopted = entry(13, "o1", R, true, "src/a.c");
  adopted.fixed_fence = back->fence() + 7;
  Result<Entry> kept = decode_entry(KeyValue{adopted.key, encode_entry(adopted), 13, 13, 1, 0});
  REQUIRE(kept.ok());
  CHECK(kept->fence() == back->fence() + 7);
  Queue q{r, w, *kept};
  std::sort(q.begin(), q.end(), queue_order);
  CHECK(q.front().owner == "o1");
  // A reader batches with the adopted reader; the writer waits for both.
  CHECK(standings(q) == std::vector{Standing::Held, Standing::Grantable, Standing::Waiting});

  auto refused = [&](std::string value) {
    Result<Entry> x = decode_entry(KeyValue{lend.key, std::move(value), 1, 1, 1, 0});
    return x.ok() ? std::string() : x.message();
  };
  CHECK(refused(R"({"m":"r","o":"broker:b1","n":1,"ln":true})").find("lend entry") != std::string::npos);
  CHECK(refused(R"({"m":"w","o":"broker:b1","ln":true})").find("lend entry") != std::string::npos);
  CHECK(refused(R"({"m":"w","o":"broker:b1","n":1,"ln":true,"f":9})").find("lend entry") != std::string::npos);
  CHECK(refused(R"({"m":"w","o":"o","f":0})").find("fence 0") != std::string::npos);
  CHECK(refused(R"({"m":"w","o":"o","f":"7"})").find("fence") != std::string::npos);
  CHECK(refused(R"({"m":"w","o":"o","f":2048})").find("fence 2048") != std::string::npos);  // an entry's own
  CHECK(refused(R"({"m":"w","o":"broker:b1","n":1,"ln":1})").find("lend 1") != std::string::npos);
}

TEST_CASE("entries one batch made are queued by their slots and have fences of their own", "[etcd]") {
  // Two waiting writes made in one transaction share create revision 9.
  Entry a = entry(9, "a", W), b = entry(9, "b", W), c = entry(8, "c", W);
  a.slot = 5;
  b.slot = 2;
  CHECK(a.fence() != b.fence());
  CHECK(queue_order(b, a));
  CHECK_FALSE(queue_order(a, b));
  CHECK(queue_order(c, b));  // an older revision first, whatever the slots
  Queue q{a, b, c};
  std::sort(q.begin(), q.end(), queue_order);
  CHECK(q[0].owner == "c");
  CHECK(q[1].owner == "b");
  CHECK(standings(q) == std::vector{Standing::Grantable, Standing::Waiting, Standing::Waiting});
}

TEST_CASE("entries in create-revision order are held by the contract's FIFO rule", "[etcd]") {
  using S = Standing;
  // Readers batch; a reader behind a queued writer waits for it.
  CHECK(standings({entry(1, "a", R), entry(2, "b", R)}) == std::vector{S::Grantable, S::Grantable});
  CHECK(standings({entry(1, "a", R, true), entry(2, "b", W), entry(3, "c", R)}) ==
        std::vector{S::Held, S::Waiting, S::Waiting});
  CHECK(standings({entry(1, "a", W, true), entry(2, "b", R)}) == std::vector{S::Held, S::Waiting});
  CHECK(standings({entry(1, "a", W), entry(2, "b", W)}) == std::vector{S::Grantable, S::Waiting});
  // An upgrade waits for the other readers, not for its owner's own read.
  Entry up = entry(3, "a", W);
  up.upgrade = true;
  CHECK(standings({entry(1, "a", R, true), up}) == std::vector{S::Held, S::Grantable});
  CHECK(standings({entry(1, "a", R, true), entry(2, "b", R, true), up}) ==
        std::vector{S::Held, S::Held, S::Waiting});

  std::vector<Entry> q{entry(1, "a", R, true), entry(2, "b", R)};
  CHECK(reentry(q, "a", R) == Reentry::Again);
  CHECK(reentry(q, "a", W) == Reentry::UpgradeNow);  // the only holder
  CHECK(reentry(q, "b", W) == Reentry::None);
  q[1].held = true;
  q[1].hold_count = 1;
  CHECK(reentry(q, "a", W) == Reentry::Upgrade);
  Entry ua = entry(3, "a", W);
  ua.upgrade = true;
  q.push_back(ua);
  CHECK(reentry(q, "b", W) == Reentry::Deadlock);  // both hold read, both upgrade
}

TEST_CASE("a held entry ends at its lease or its hold cap", "[etcd]") {
  Entry a = entry(1, "a", R, true), b = entry(2, "b", R, true), c = entry(3, "c", W);
  a.acquired_at = b.acquired_at = 0;
  a.lease_expires_at = 5000;
  b.lease_expires_at = 9000;
  b.max_hold_ms = 2;  // 2000 us
  const Queue q{a, b, c};
  CHECK(expired(q, 1000).empty());
  REQUIRE(expired(q, 2000).size() == 1);
  CHECK(expired(q, 2000)[0]->owner == "b");
  CHECK(expired(q, 5000).size() == 2);
}

TEST_CASE("a wait that would reach its own session's lock is a deadlock across keys", "[etcd]") {
  SECTION("cat f >> f: one session holds f for reading and asks to write it") {
    Space s{{"f", {entry(1, "o1", R, true, "f", "s"), entry(2, "o2", W, false, "f", "s")}}};
    auto d = deadlock(s, s["f"][1]);
    REQUIRE(d.has_value());
    CHECK(d->find("session s would wait for 'f', which it holds itself (read)") != std::string::npos);
  }
  SECTION("two sessions each holding what the other waits for") {
    Space s{{"a", {entry(1, "x", W, true, "a", "s1"), entry(4, "y2", W, false, "a", "s2")}},
            {"b", {entry(2, "y", W, true, "b", "s2"), entry(3, "x2", W, false, "b", "s1")}}};
    CHECK(deadlock(s, s["a"][1]).has_value());
    CHECK(deadlock(s, s["b"][1]).has_value());
  }
  SECTION("a chain that ends at someone else's lock is only a wait") {
    Space s{{"a", {entry(1, "x", W, true, "a", "s1"), entry(3, "y2", W, false, "a", "s2")}},
            {"b", {entry(2, "y", W, true, "b", "s2")}}};
    CHECK_FALSE(deadlock(s, s["a"][1]).has_value());
  }
}

namespace {

// The etcd way, played out in memory as brokers would: entries appended in revision
// order, grantable ones marked held, an upgrade merged into its owner's read.
struct SpaceModel {
  Space space;
  std::int64_t rev = 0;

  void settle() {
    for (bool moved = true; moved;) {
      moved = false;
      for (auto& [key, q] : space) {
        const auto st = standings(q);
        for (std::size_t i = 0; i < q.size(); ++i) {
          if (st[i] != Standing::Grantable) continue;
          moved = true;
          if (const Entry* target = upgrade_target(q, i)) {
            Entry& mine = q[static_cast<std::size_t>(target - q.data())];
            mine.mode = W;
            ++mine.hold_count;
            q.erase(q.begin() + static_cast<long>(i));
          } else {
            q[i].held = true;
            q[i].upgrade = false;
            q[i].hold_count = 1;
          }
          break;
        }
        if (moved) break;
      }
    }
  }
  AcquireResult::Kind acquire(const std::string& key, const std::string& owner, const std::string& session,
                              LockMode mode) {
    Queue& q = space[key];
    const Reentry r = reentry(q, owner, mode);
    if (r == Reentry::Deadlock) return AcquireResult::Kind::Deadlock;
    if (r == Reentry::Again || r == Reentry::UpgradeNow) {
      for (Entry& e : q)
        if (e.held && e.owner == owner) {
          ++e.hold_count;
          if (mode == W) e.mode = W;
        }
      return AcquireResult::Kind::Granted;
    }
    Entry e = entry(++rev, owner, mode, false, key, session);
    e.upgrade = r == Reentry::Upgrade;
    q.push_back(e);
    if (standings(q).back() != Standing::Grantable && deadlock(space, q.back())) {
      q.pop_back();
      return AcquireResult::Kind::Deadlock;
    }
    const bool now = standings(q).back() == Standing::Grantable;
    settle();
    return now ? AcquireResult::Kind::Granted : AcquireResult::Kind::Queued;
  }
  void release(const std::string& key, const std::string& owner) {
    Queue& q = space[key];
    for (std::size_t i = 0; i < q.size(); ++i)
      if (q[i].held && q[i].owner == owner && --q[i].hold_count == 0) {
        q.erase(q.begin() + static_cast<long>(i));
        break;
      }
    settle();
  }
  // "owner:mode:count" held, then "owner:mode" waiting, in order.
  std::string picture(const std::string& key) {
    std::string held, waiting;
    for (const Entry& e : space[key]) {
      if (e.held) held += e.owner + ":" + to_string(e.mode) + ":" + std::to_string(e.hold_count) + " ";
      else waiting += e.owner + ":" + to_string(e.mode) + " ";
    }
    return held + "| " + waiting;
  }
};

std::string table_picture(const LockTable& t, const std::string& key) {
  std::map<std::uint64_t, std::string> held;  // by fence: grant order
  for (const Lock& l : t.locks(key))
    held[l.fence] = l.owner + ":" + to_string(l.mode) + ":" + std::to_string(l.hold_count) + " ";
  std::string out;
  for (const auto& [fence, text] : held) out += text;
  out += "| ";
  for (const QueuedRequest& r : t.queue(key)) out += r.owner + ":" + to_string(r.mode) + " ";
  return out;
}

}  // namespace

TEST_CASE("the etcd space decides as the broker's own lock table does, over random histories", "[etcd]") {
  std::mt19937 rng(20261130);
  const std::vector<std::pair<std::string, std::string>> owners = {
      {"a1", "sa"}, {"a2", "sa"}, {"b1", "sb"}, {"c1", "sc"}, {"d1", "sd"}};
  const std::vector<std::string> keys = {"f", "g"};
  for (int history = 0; history < 1000; ++history) {
    int ids = 0;
    LockTable table(LockTableOptions{}, [&] { return "L" + std::to_string(++ids); });
    SpaceModel model;
    std::map<std::string, bool> waiting;  // an owner with a queued request waits (a blocked open)
    std::map<std::pair<std::string, std::string>, std::string> lock_ids;
    std::string history_text;  // what happened, for a failure's message
    for (int step = 0; step < 40; ++step) {
      const auto& [owner, session] = owners[rng() % owners.size()];
      const std::string& key = keys[rng() % keys.size()];
      const bool holds = lock_ids.count({owner, key}) > 0;
      INFO("history " << history << " step " << step << " " << owner << " on " << key);
      if (holds && rng() % 3 == 0) {
        REQUIRE(table.release(lock_ids[{owner, key}], owner, 1000) == OpStatus::Ok);
        if (!table.find_lock(lock_ids[{owner, key}])) lock_ids.erase({owner, key});
        model.release(key, owner);
        history_text += owner + " releases " + key + "; ";
      } else {
        if (waiting[owner]) continue;
        const LockMode mode = rng() % 2 ? R : W;
        AcquireParams p;
        p.key = key;
        p.mode = mode;
        p.owner = owner;
        p.session = session;
        const AcquireResult got = table.acquire(p, 1000);
        const AcquireResult::Kind want = model.acquire(key, owner, session, mode);
        history_text += owner + "(" + session + ") asks " + to_string(mode) + " " + key + ": " +
                        std::to_string(static_cast<int>(got.kind)) + "; ";
        INFO(history_text);
        REQUIRE(got.kind == want);
        if (got.kind == AcquireResult::Kind::Granted) lock_ids[{owner, key}] = got.lock.lock_id;
        if (got.kind == AcquireResult::Kind::Queued) waiting[owner] = true;
      }
      for (const Event& ev : table.take_events())
        if (ev.kind == Event::Kind::Granted) {
          lock_ids[{ev.lock.owner, ev.lock.key}] = ev.lock.lock_id;
          waiting[ev.lock.owner] = false;
        }
      INFO(history_text);
      for (const auto& k : keys) REQUIRE(model.picture(k) == table_picture(table, k));
    }
  }
}
