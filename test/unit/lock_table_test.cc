// The lock engine, rule by rule, as ../shared/docs/locking.md states them.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>

#include "lock/lock_table.h"

using namespace gate;

namespace {

constexpr Micros kStart = 1'800'000'000'000'000;  // some wall-clock time
constexpr Micros ms(std::int64_t n) { return n * 1000; }

struct Fixture {
  explicit Fixture(LockTableOptions o = {}) : table(o, [this] { return "L" + std::to_string(++ids); }) {}
  int ids = 0;
  LockTable table;
  Micros now = kStart;

  AcquireResult acq(const std::string& key, LockMode mode, const std::string& owner,
                    std::optional<std::int64_t> timeout = std::nullopt,
                    const std::string& session = "") {
    AcquireParams p;
    p.key = key;
    p.mode = mode;
    p.owner = owner;
    p.session = session;
    p.timeout_ms = timeout;
    return table.acquire(p, now);
  }
  // The ids of queued requests granted since the last call, in grant order.
  std::vector<std::uint64_t> granted() {
    std::vector<std::uint64_t> out;
    for (auto& e : table.take_events())
      if (e.kind == Event::Kind::Granted) out.push_back(e.req_id);
    return out;
  }
};

// A write lock on "k" as the store would hand it back after a restart.
Lock saved_write_lock(const std::string& owner, std::int64_t lease_ms, std::uint64_t fence) {
  Lock l;
  l.lock_id = "held";
  l.key = "k";
  l.mode = LockMode::Write;
  l.owner = owner;
  l.session = "owner:" + owner;
  l.acquired_at = kStart;
  l.lease_ms = lease_ms;
  l.lease_expires_at = kStart + ms(lease_ms);
  l.hold_count = 1;
  l.fence = fence;
  return l;
}

// A queued write request on "k" as the store would hand it back after a restart.
QueuedRequest saved_write_request(std::uint64_t req_id, const std::string& owner,
                                  const std::string& request_id) {
  QueuedRequest q;
  q.req_id = req_id;
  q.key = "k";
  q.mode = LockMode::Write;
  q.owner = owner;
  q.session = "owner:" + owner;
  q.request_id = request_id;
  q.lease_ms = 30'000;
  return q;
}

using Kind = AcquireResult::Kind;
const auto R = LockMode::Read;
const auto W = LockMode::Write;

}  // namespace

TEST_CASE("a write on a free key is granted at once", "[lock]") {
  Fixture f;
  auto r = f.acq("a", W, "o1");
  REQUIRE(r.kind == Kind::Granted);
  CHECK(r.lock.hold_count == 1);
  CHECK(r.lock.mode == W);
  CHECK(r.lock.fence == 1);
}

TEST_CASE("a writer waits for a held write and is granted on release", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  auto b = f.acq("k", W, "B");
  REQUIRE(b.kind == Kind::Queued);
  CHECK(f.granted().empty());
  REQUIRE(f.table.release(a.lock.lock_id, "A", f.now) == OpStatus::Ok);
  CHECK(f.granted() == std::vector<std::uint64_t>{b.req_id});
}

TEST_CASE("a reader queued behind a writer waits for it", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  auto b = f.acq("k", W, "B");
  auto c = f.acq("k", R, "C");
  REQUIRE(b.kind == Kind::Queued);
  REQUIRE(c.kind == Kind::Queued);
  f.table.release(a.lock.lock_id, "A", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{b.req_id});  // B first, C still waits
  auto b_lock = f.table.locks("k").at(0);
  f.table.release(b_lock.lock_id, "B", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{c.req_id});
}

TEST_CASE("readers share a key", "[lock]") {
  Fixture f;
  CHECK(f.acq("k", R, "A").kind == Kind::Granted);
  CHECK(f.acq("k", R, "B").kind == Kind::Granted);
  CHECK(f.table.locks("k").size() == 2);
}

TEST_CASE("a reader does not jump a queued writer", "[lock]") {
  Fixture f;
  auto a = f.acq("k", R, "A");
  auto w = f.acq("k", W, "W");
  REQUIRE(w.kind == Kind::Queued);
  auto c = f.acq("k", R, "C");
  CHECK(c.kind == Kind::Queued);
}

TEST_CASE("consecutive readers behind a writer are granted together", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  auto r1 = f.acq("k", R, "R1");
  auto r2 = f.acq("k", R, "R2");
  auto w = f.acq("k", W, "W");
  auto r3 = f.acq("k", R, "R3");
  f.table.release(a.lock.lock_id, "A", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{r1.req_id, r2.req_id});
  for (auto& l : f.table.locks("k")) f.table.release(l.lock_id, l.owner, f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{w.req_id});
  for (auto& l : f.table.locks("k")) f.table.release(l.lock_id, l.owner, f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{r3.req_id});
}

TEST_CASE("a writer waits for all readers", "[lock]") {
  Fixture f;
  auto r1 = f.acq("k", R, "R1");
  auto r2 = f.acq("k", R, "R2");
  auto w = f.acq("k", W, "W");
  REQUIRE(w.kind == Kind::Queued);
  f.table.release(r1.lock.lock_id, "R1", f.now);
  CHECK(f.granted().empty());
  f.table.release(r2.lock.lock_id, "R2", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{w.req_id});
}

TEST_CASE("keys are independent", "[lock]") {
  Fixture f;
  f.acq("a", W, "A");
  CHECK(f.acq("b", W, "B").kind == Kind::Granted);
}

TEST_CASE("re-entrant write: any request of the holder is granted and counted", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  f.acq("k", W, "Q");  // someone queued does not matter
  auto again = f.acq("k", R, "A");
  REQUIRE(again.kind == Kind::Granted);
  CHECK(again.lock.lock_id == a.lock.lock_id);
  CHECK(again.lock.mode == W);
  CHECK(again.lock.hold_count == 2);
  CHECK(again.lock.fence == a.lock.fence);
  f.table.release(a.lock.lock_id, "A", f.now);
  CHECK(f.granted().empty());  // still held once
  f.table.release(a.lock.lock_id, "A", f.now);
  CHECK(f.granted().size() == 1);
}

TEST_CASE("re-entrant read is granted even behind a queued writer", "[lock]") {
  Fixture f;
  auto a = f.acq("k", R, "A");
  auto w = f.acq("k", W, "W");
  REQUIRE(w.kind == Kind::Queued);
  auto again = f.acq("k", R, "A");
  CHECK(again.kind == Kind::Granted);
  CHECK(again.lock.hold_count == 2);
}

TEST_CASE("upgrade by the only reader is granted at once", "[lock]") {
  Fixture f;
  auto a = f.acq("k", R, "A");
  auto up = f.acq("k", W, "A");
  REQUIRE(up.kind == Kind::Granted);
  CHECK(up.lock.mode == W);
  CHECK(up.lock.hold_count == 2);
  CHECK(up.lock.lock_id == a.lock.lock_id);
}

TEST_CASE("upgrade with another reader waits until it is the only holder", "[lock]") {
  Fixture f;
  auto a = f.acq("k", R, "A");
  auto b = f.acq("k", R, "B");
  auto up = f.acq("k", W, "A");
  REQUIRE(up.kind == Kind::Queued);
  f.table.release(b.lock.lock_id, "B", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{up.req_id});
  auto l = *f.table.find_lock(a.lock.lock_id);
  CHECK(l.mode == W);
  CHECK(l.hold_count == 2);
}

TEST_CASE("two readers that both upgrade: the second gets deadlock", "[lock][deadlock]") {
  Fixture f;
  f.acq("k", R, "A");
  f.acq("k", R, "B");
  CHECK(f.acq("k", W, "A").kind == Kind::Queued);
  auto second = f.acq("k", W, "B");
  CHECK(second.kind == Kind::Deadlock);
  CHECK_FALSE(second.error.empty());
  CHECK(f.table.queue("k").size() == 1);
}

TEST_CASE("a session that holds a read and asks a write on the same key is a deadlock",
          "[lock][deadlock]") {
  Fixture f;  // cat f >> f: two handles (owners) of one process (session)
  f.acq("f", R, "h1", std::nullopt, "m:42");
  auto r = f.acq("f", W, "h2", std::nullopt, "m:42");
  CHECK(r.kind == Kind::Deadlock);
  CHECK(f.table.queue().empty());
}

TEST_CASE("a two-session cycle is a deadlock", "[lock][deadlock]") {
  Fixture f;
  f.acq("a", W, "a1", std::nullopt, "S");
  f.acq("b", W, "b1", std::nullopt, "T");
  CHECK(f.acq("b", W, "a2", std::nullopt, "S").kind == Kind::Queued);
  CHECK(f.acq("a", W, "b2", std::nullopt, "T").kind == Kind::Deadlock);
}

TEST_CASE("waiting behind a queued request of one's own session is not a deadlock",
          "[lock][deadlock]") {
  Fixture f;
  f.acq("k", W, "x", std::nullopt, "other");
  CHECK(f.acq("k", W, "t1", std::nullopt, "S").kind == Kind::Queued);
  CHECK(f.acq("k", W, "t2", std::nullopt, "S").kind == Kind::Queued);
}

TEST_CASE("a chain through a third session is a deadlock", "[lock][deadlock]") {
  Fixture f;
  f.acq("a", W, "s1", std::nullopt, "S");
  f.acq("b", W, "t1", std::nullopt, "T");
  f.acq("c", W, "u1", std::nullopt, "U");
  CHECK(f.acq("b", W, "s2", std::nullopt, "S").kind == Kind::Queued);  // S waits T
  CHECK(f.acq("c", W, "t2", std::nullopt, "T").kind == Kind::Queued);  // T waits U
  CHECK(f.acq("a", W, "u2", std::nullopt, "U").kind == Kind::Deadlock);  // U would wait S
}

TEST_CASE("try-lock answers timeout at once and leaves no queue entry", "[lock]") {
  Fixture f;
  f.acq("k", W, "A");
  auto r = f.acq("k", W, "B", 0);
  CHECK(r.kind == Kind::Timeout);
  CHECK(f.table.queue().empty());
  CHECK(f.acq("free", W, "B", 0).kind == Kind::Granted);
}

TEST_CASE("a queued request times out at its deadline and those behind it move on", "[lock]") {
  Fixture f;
  f.acq("k", R, "A");
  auto w = f.acq("k", W, "W", 100);
  auto r = f.acq("k", R, "C");
  REQUIRE(r.kind == Kind::Queued);
  f.now += ms(99);
  f.table.expire(f.now);
  CHECK(f.table.take_events().empty());
  f.now += ms(1);
  f.table.expire(f.now);
  auto events = f.table.take_events();
  REQUIRE(events.size() == 2);
  CHECK(events[0].kind == Event::Kind::TimedOut);
  CHECK(events[0].req_id == w.req_id);
  CHECK(events[1].kind == Event::Kind::Granted);
  CHECK(events[1].req_id == r.req_id);
}

TEST_CASE("cancelling a queued request re-evaluates the queue", "[lock]") {
  Fixture f;
  f.acq("k", R, "A");
  auto w = f.acq("k", W, "W");
  auto r = f.acq("k", R, "C");
  REQUIRE(f.table.cancel(w.req_id, f.now));
  CHECK(f.granted() == std::vector<std::uint64_t>{r.req_id});
  CHECK_FALSE(f.table.cancel(w.req_id, f.now));
}

TEST_CASE("a lock whose lease ran out is dropped and the queue moves on", "[lock][lease]") {
  LockTableOptions o;
  o.default_lease_ms = 1000;
  Fixture f(o);
  auto a = f.acq("k", W, "A");
  f.acq("k", W, "A");  // hold_count 2 does not matter
  auto b = f.acq("k", W, "B");
  CHECK(f.table.next_deadline() == a.lock.lease_expires_at);
  f.now += ms(1000);
  f.table.expire(f.now);
  auto events = f.table.take_events();
  REQUIRE(events.size() == 2);
  CHECK(events[0].kind == Event::Kind::Dropped);
  CHECK(events[0].reason == "lease expired");
  CHECK(events[1].req_id == b.req_id);
  CHECK(f.table.release(a.lock.lock_id, "A", f.now) == OpStatus::NotFound);
}

TEST_CASE("heartbeats keep a lock past its first lease", "[lock][lease]") {
  LockTableOptions o;
  o.default_lease_ms = 1000;
  Fixture f(o);
  auto a = f.acq("k", W, "A");
  for (int i = 0; i < 5; ++i) {
    f.now += ms(600);
    Lock l;
    REQUIRE(f.table.heartbeat(a.lock.lock_id, "A", std::nullopt, f.now, &l) == OpStatus::Ok);
    CHECK(l.lease_expires_at == f.now + ms(1000));
  }
  CHECK(f.table.lock_count() == 1);
}

TEST_CASE("the hold cap drops a lock whatever its heartbeats", "[lock][cap]") {
  LockTableOptions o;
  o.default_lease_ms = 1000;
  o.max_hold_ms = 2500;
  Fixture f(o);
  auto a = f.acq("k", W, "A");
  CHECK(a.lock.max_hold_ms == 2500);
  Lock l;
  for (int i = 0; i < 4; ++i) {
    f.now += ms(600);
    REQUIRE(f.table.heartbeat(a.lock.lock_id, "A", std::nullopt, f.now, &l) == OpStatus::Ok);
  }
  f.now = kStart + ms(2500);
  f.table.expire(f.now);
  auto events = f.table.take_events();
  REQUIRE(events.size() == 1);
  CHECK(events[0].reason == "hold cap reached");
  CHECK(f.table.heartbeat(a.lock.lock_id, "A", std::nullopt, f.now, &l) == OpStatus::NotFound);
}

TEST_CASE("a client may ask for a shorter hold cap but not a longer one", "[lock][cap]") {
  LockTableOptions o;
  o.max_hold_ms = 5000;
  Fixture f(o);
  AcquireParams p;
  p.key = "k";
  p.owner = "A";
  p.max_hold_ms = 100;
  CHECK(f.table.acquire(p, f.now).lock.max_hold_ms == 100);
  p.key = "j";
  p.max_hold_ms = 999'999;
  CHECK(f.table.acquire(p, f.now).lock.max_hold_ms == 5000);
}

TEST_CASE("release and heartbeat check the owner", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  Lock l;
  CHECK(f.table.release(a.lock.lock_id, "B", f.now) == OpStatus::Forbidden);
  CHECK(f.table.heartbeat(a.lock.lock_id, "B", std::nullopt, f.now, &l) == OpStatus::Forbidden);
  CHECK(f.table.release("nope", "A", f.now) == OpStatus::NotFound);
}

TEST_CASE("fences strictly increase across grants", "[lock]") {
  Fixture f;
  std::uint64_t last = 0;
  for (int i = 0; i < 10; ++i) {
    auto r = f.acq("k" + std::to_string(i % 3), W, "o" + std::to_string(i));
    if (r.kind != Kind::Granted) continue;
    CHECK(r.lock.fence > last);
    last = r.lock.fence;
    f.table.release(r.lock.lock_id, r.lock.owner, f.now);
  }
}

TEST_CASE("a repeated request_id re-attaches to its place in the queue", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  AcquireParams p;
  p.key = "k";
  p.owner = "B";
  p.request_id = "rid-1";
  auto b = f.table.acquire(p, f.now);
  auto c = f.acq("k", W, "C");
  auto again = f.table.acquire(p, f.now);
  REQUIRE(again.kind == Kind::Queued);
  CHECK(again.req_id == b.req_id);
  CHECK(again.replaced_req_id == b.req_id);
  f.table.release(a.lock.lock_id, "A", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{b.req_id});
  (void)c;
}

TEST_CASE("restored queued requests keep their places for the grace period only", "[lock]") {
  LockTableOptions o;
  o.restore_grace_ms = 1000;
  Fixture f(o);
  const Lock held = saved_write_lock("A", 60'000, 7);
  const QueuedRequest q1 = saved_write_request(5, "B", "rid-b");
  const QueuedRequest q2 = saved_write_request(6, "C", "rid-c");
  f.table.restore({held}, {q2, q1}, 8, f.now);
  CHECK(f.table.next_fence() == 8);

  AcquireParams p;
  p.key = "k";
  p.mode = W;
  p.owner = "C";
  p.request_id = "rid-c";
  auto again = f.table.acquire(p, f.now);  // C comes back in time, B does not
  CHECK(again.req_id == 6);
  f.now += ms(1000);
  f.table.expire(f.now);
  auto events = f.table.take_events();
  REQUIRE(events.size() == 1);
  CHECK(events[0].kind == Event::Kind::TimedOut);
  CHECK(events[0].req_id == 5);
  f.table.release("held", "A", f.now);
  CHECK(f.granted() == std::vector<std::uint64_t>{6});
  auto fresh = f.acq("other", W, "D");
  CHECK(fresh.lock.fence == 9);
}

TEST_CASE("every change is journaled for the store", "[lock]") {
  Fixture f;
  auto a = f.acq("k", W, "A");
  auto j = f.table.take_journal();
  REQUIRE_FALSE(j.empty());
  bool put = false;
  for (auto& e : j) put |= e.kind == JournalEntry::Kind::PutLock && e.lock.lock_id == a.lock.lock_id;
  CHECK(put);
  f.table.release(a.lock.lock_id, "A", f.now);
  bool deleted = false;
  for (auto& e : f.table.take_journal())
    deleted |= e.kind == JournalEntry::Kind::DeleteLock && e.lock_id == a.lock.lock_id;
  CHECK(deleted);
}

TEST_CASE("a table that keeps no journal records nothing and serves as before", "[lock]") {
  Fixture f;
  f.table.keep_journal(false);
  auto a = f.acq("k", W, "A");
  REQUIRE(a.kind == AcquireResult::Kind::Granted);
  auto b = f.acq("k", W, "B");  // queued behind A
  REQUIRE(b.kind == AcquireResult::Kind::Queued);
  REQUIRE(f.table.release(a.lock.lock_id, "A", f.now, true) == OpStatus::Ok);
  CHECK(f.granted() == std::vector<std::uint64_t>{b.req_id});
  CHECK(f.table.version_of("k") == a.lock.fence);
  CHECK(f.table.take_journal().empty());
  f.table.keep_journal(true);
  f.acq("j", W, "C");
  CHECK_FALSE(f.table.take_journal().empty());
}

TEST_CASE("a free key is granted at once without a queue entry and a busy one queues as before", "[lock]") {
  Fixture f;
  auto a = f.acq("k", R, "A");
  REQUIRE(a.kind == AcquireResult::Kind::Granted);
  auto b = f.acq("k", R, "B");  // readers share
  REQUIRE(b.kind == AcquireResult::Kind::Granted);
  CHECK(f.table.queue("k").empty());
  CHECK(f.table.take_events().empty());  // a direct grant is the answer, not an event
  auto w = f.acq("k", W, "C");
  REQUIRE(w.kind == AcquireResult::Kind::Queued);
  auto r = f.acq("k", R, "D");  // behind the queued writer, though readers hold it
  REQUIRE(r.kind == AcquireResult::Kind::Queued);
  CHECK(f.table.queue("k").size() == 2);
  CHECK(b.lock.fence == a.lock.fence + 1);
}

TEST_CASE("a restored request granted before its client returns is dropped at the end of the grace period",
          "[lock]") {
  LockTableOptions o;
  o.restore_grace_ms = 1000;
  o.default_lease_ms = 30'000;
  Fixture f(o);
  f.table.restore({saved_write_lock("A", 30'000, 1)}, {saved_write_request(2, "B", "rid-b")}, 2,
                  f.now);
  f.table.release("held", "A", f.now);
  auto locks = f.table.locks("k");
  REQUIRE(locks.size() == 1);
  CHECK(locks[0].owner == "B");
  CHECK(locks[0].lease_expires_at == kStart + ms(1000));
  f.now += ms(1000);
  f.table.expire(f.now);
  CHECK(f.table.locks("k").empty());
}

TEST_CASE("the client that comes back claims its restored grant with a fresh lease", "[lock]") {
  LockTableOptions o;
  o.restore_grace_ms = 1000;
  Fixture f(o);
  // Granted at once: nobody holds k.
  f.table.restore({}, {saved_write_request(2, "B", "rid-b")}, 2, f.now);
  AcquireParams p;
  p.key = "k";
  p.mode = W;
  p.owner = "B";
  p.request_id = "rid-b";
  f.now += ms(500);
  auto r = f.table.acquire(p, f.now);
  REQUIRE(r.kind == Kind::Granted);
  CHECK(r.lock.hold_count == 1);
  CHECK(r.lock.lease_expires_at == f.now + ms(30'000));
}

TEST_CASE("a key's version is the fence of the last write hold that changed it", "[lock][version]") {
  Fixture f;
  CHECK(f.table.version_of("k") == 0);  // never seen to change
  auto w = f.acq("k", W, "A");
  REQUIRE(w.kind == Kind::Granted);
  f.table.release(w.lock.lock_id, "A", f.now);  // unchanged: no new version
  CHECK(f.table.version_of("k") == 0);

  auto w2 = f.acq("k", W, "A");
  f.table.release(w2.lock.lock_id, "A", f.now, /*changed=*/true);
  CHECK(f.table.version_of("k") == w2.lock.fence);
  f.table.take_journal();

  // A reader cannot change content: its "changed" is ignored, and nothing is journaled.
  auto r = f.acq("k", R, "B");
  f.table.release(r.lock.lock_id, "B", f.now, true);
  CHECK(f.table.version_of("k") == w2.lock.fence);
  for (const auto& e : f.table.take_journal()) CHECK(e.kind != JournalEntry::Kind::PutVersion);

  // Re-entrant holds share the fence; the version is set once and never goes back.
  auto w3 = f.acq("k", W, "C");
  auto again = f.acq("k", W, "C");
  REQUIRE(again.lock.lock_id == w3.lock.lock_id);
  f.table.release(w3.lock.lock_id, "C", f.now, true);
  CHECK(f.table.version_of("k") == w3.lock.fence);
  auto journal = f.table.take_journal();
  CHECK(std::count_if(journal.begin(), journal.end(), [&](const JournalEntry& e) {
          return e.kind == JournalEntry::Kind::PutVersion && e.key == "k" &&
                 e.version == w3.lock.fence;
        }) == 1);
  f.table.release(w3.lock.lock_id, "C", f.now, true);
  CHECK(f.table.version_of("k") == w3.lock.fence);
  CHECK(f.table.version_of("other") == 0);
}

TEST_CASE("restored versions stay and later fences are above them", "[lock][version]") {
  Fixture f;
  f.table.restore({}, {}, 1, f.now, {{"a", 500}, {"b", 7}});
  CHECK(f.table.version_of("a") == 500);
  CHECK(f.table.version_of("b") == 7);
  auto w = f.acq("b", W, "A");
  CHECK(w.lock.fence > 500);  // even a counter saved below a version cannot reuse it
  f.table.release(w.lock.lock_id, "A", f.now, true);
  CHECK(f.table.version_of("b") == w.lock.fence);
}

TEST_CASE("restore leaves out saved entries that break the lock rules, and keeps the rest",
          "[lock][restore]") {
  Fixture f;
  Lock a = saved_write_lock("A", 60'000, 7);
  Lock same_owner_key = saved_write_lock("A", 60'000, 8);  // a second lock of A on k
  same_owner_key.lock_id = "twice";
  Lock beside_writer = saved_write_lock("B", 60'000, 9);  // a reader beside A's write lock
  beside_writer.lock_id = "beside";
  beside_writer.mode = LockMode::Read;
  Lock same_id = saved_write_lock("C", 60'000, 10);  // A's lock id again, on another key
  same_id.key = "other";
  Lock huge_lease = saved_write_lock("D", 60'000, 11);
  huge_lease.lock_id = "huge";
  huge_lease.key = "k2";
  huge_lease.lease_ms = INT64_MAX;  // now + lease would overflow
  Lock zero_count = saved_write_lock("E", 60'000, 12);
  zero_count.lock_id = "zero";
  zero_count.key = "k3";
  zero_count.hold_count = 0;
  QueuedRequest dup1 = saved_write_request(5, "F", "");
  QueuedRequest dup2 = saved_write_request(5, "G", "");  // the same request number
  const std::size_t left_out =
      f.table.restore({a, same_owner_key, beside_writer, same_id, huge_lease, zero_count},
                      {dup1, dup2}, 8, f.now, {{"v", UINT64_MAX}});
  CHECK(left_out == 7);
  REQUIRE(f.table.locks().size() == 1);
  CHECK(f.table.locks().front().lock_id == "held");
  CHECK(f.table.queue().size() == 1);
  CHECK(f.table.version_of("v") == 0);
  CHECK(f.table.next_fence() == 13);  // above every saved fence, kept or not
}

TEST_CASE("a delegate's state is taken in: its locks as they were, its waiters re-attach in order",
          "[lock][delegation]") {
  // The delegate: a table of its own, with fences from a block the broker set aside.
  Fixture broker;
  const std::uint64_t block = broker.table.reserve_fence_block(1000);
  CHECK(broker.table.next_fence() == block + 1000);
  Fixture delegate;
  delegate.table.restore({}, {}, block, delegate.now);
  REQUIRE(delegate.acq("k", W, "a").kind == Kind::Granted);
  REQUIRE(delegate.acq("k", R, "b", std::nullopt, "s:b").kind == Kind::Queued);
  TableState state = delegate.table.export_state();
  REQUIRE(state.locks.size() == 1);
  CHECK(state.locks[0].fence == block);
  state.queue[0].request_id = "rb";

  broker.table.take_journal();
  CHECK(broker.table.adopt(state, broker.now) == 0);
  // Journaled like any change: the lock, the queued request.
  const auto journal = broker.table.take_journal();
  CHECK(std::count_if(journal.begin(), journal.end(),
                      [](const JournalEntry& e) { return e.kind == JournalEntry::Kind::PutLock; }) == 1);
  CHECK(std::count_if(journal.begin(), journal.end(),
                      [](const JournalEntry& e) { return e.kind == JournalEntry::Kind::PutRequest; }) == 1);
  // A new client queues behind the delegate's waiter, which re-attaches to its place.
  REQUIRE(broker.acq("k", W, "c").kind == Kind::Queued);
  AcquireParams again;
  again.key = "k";
  again.mode = R;
  again.owner = "b";
  again.session = "s:b";
  again.request_id = "rb";
  AcquireResult reattached = broker.table.acquire(again, broker.now);
  REQUIRE(reattached.kind == Kind::Queued);
  const Lock* held = broker.table.find_lock(state.locks[0].lock_id);
  REQUIRE(held);
  CHECK(broker.table.release(held->lock_id, "a", broker.now, true) == OpStatus::Ok);
  CHECK(broker.granted() == std::vector<std::uint64_t>{reattached.req_id});  // b before c
  CHECK(broker.table.version_of("k") == block);
}

TEST_CASE("a table given a fence source takes each grant's fence from it, per key", "[lock]") {
  Fixture f;
  std::map<std::string, std::uint64_t> next{{"a", 1'000'001}, {"b", 5'000'001}};
  f.table.set_fence_source([&](const std::string& key) { return next.at(key)++; });
  const std::uint64_t floor = f.table.next_fence();
  auto a1 = f.acq("a", LockMode::Read, "o1");
  auto a2 = f.acq("a", LockMode::Read, "o2");
  auto b1 = f.acq("b", LockMode::Write, "o1");
  REQUIRE(a1.kind == AcquireResult::Kind::Granted);
  REQUIRE(a2.kind == AcquireResult::Kind::Granted);
  REQUIRE(b1.kind == AcquireResult::Kind::Granted);
  CHECK(a1.lock.fence == 1'000'001);
  CHECK(a2.lock.fence == 1'000'002);
  CHECK(b1.lock.fence == 5'000'001);
  // A re-entry keeps its fence and takes none; a grant from the queue takes the next.
  CHECK(f.acq("a", LockMode::Read, "o1").lock.fence == 1'000'001);
  auto w = f.acq("a", LockMode::Write, "o3");
  REQUIRE(w.kind == AcquireResult::Kind::Queued);
  REQUIRE(f.table.release(a1.lock.lock_id, "o1", f.now) == OpStatus::Ok);
  REQUIRE(f.table.release(a1.lock.lock_id, "o1", f.now) == OpStatus::Ok);
  REQUIRE(f.table.release(a2.lock.lock_id, "o2", f.now) == OpStatus::Ok);
  REQUIRE(f.granted() == std::vector<std::uint64_t>{w.req_id});
  CHECK(f.table.locks("a").at(0).fence == 1'000'003);
  // The table's own counter and floor are left alone.
  CHECK(f.table.next_fence() == floor);
  std::size_t floors = 0;
  for (const JournalEntry& e : f.table.take_journal()) floors += e.kind == JournalEntry::Kind::Counters;
  CHECK(floors == 0);
}
