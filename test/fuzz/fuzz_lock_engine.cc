// The lock engine (lock/lock_table.h) driven by a sequence of operations read from
// the input: acquire (key, owner, session, mode, time-out), release, heartbeat,
// cancel, time passing, and a restart (restore from what the journal saved). After
// every step, the invariants of locking.md hold:
//   - a key held for writing has one holder; hold counts are at least 1;
//   - fences only grow, and a restart never hands one out again;
//   - the front of a key's queue is never grantable (FIFO: nothing waits for nothing);
//   - every answer and event names a lock or request the engine has (or had).
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "lock/lock_table.h"

namespace {

using namespace gate;

struct Input {
  const std::uint8_t* p;
  std::size_t n;
  bool empty() const { return n == 0; }
  unsigned next(unsigned range) {
    if (!n) return 0;
    --n;
    return *p++ % range;
  }
};

// What a store would hold: the journal applied to maps (LockStore::apply's effect).
struct Saved {
  std::map<std::string, Lock> locks;
  std::map<std::uint64_t, QueuedRequest> queue;
  std::map<std::string, std::uint64_t> versions;
  std::uint64_t floor = 1;
  void apply(const std::vector<JournalEntry>& journal) {
    for (const auto& e : journal) switch (e.kind) {
        case JournalEntry::Kind::PutLock: locks[e.lock.lock_id] = e.lock; break;
        case JournalEntry::Kind::DeleteLock: locks.erase(e.lock_id); break;
        case JournalEntry::Kind::PutRequest: queue[e.request.req_id] = e.request; break;
        case JournalEntry::Kind::DeleteRequest: queue.erase(e.req_id); break;
        case JournalEntry::Kind::Counters: floor = std::max(floor, e.fence_floor); break;
        case JournalEntry::Kind::PutVersion: versions[e.key] = e.version; break;
        case JournalEntry::Kind::SetCounter: break;  // the broker's, not the engine's
      }
  }
};

bool grantable(const std::vector<Lock>& holders, const QueuedRequest& r) {
  for (const Lock& l : holders) {
    if (l.owner == r.owner) continue;
    if (r.mode == LockMode::Write || l.mode == LockMode::Write) return false;
  }
  return true;
}

void check(const LockTable& t, std::uint64_t highest_fence) {
  std::map<std::string, std::vector<Lock>> by_key;
  for (Lock& l : t.locks()) {
    if (l.hold_count < 1 || l.fence == 0 || l.fence > highest_fence) std::abort();
    by_key[l.key].push_back(std::move(l));
  }
  for (const auto& [key, ls] : by_key) {
    std::set<std::string> owners;
    for (const Lock& l : ls) {
      if (l.mode == LockMode::Write && ls.size() != 1) std::abort();
      if (!owners.insert(l.owner).second) std::abort();  // one lock per owner and key
    }
  }
  std::set<std::string> seen;
  for (const QueuedRequest& r : t.queue()) {
    if (!seen.insert(r.key).second) continue;  // only each key's front
    if (!r.orphan && grantable(by_key[r.key], r)) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const char* keys[] = {"a", "b", "c"};
  static const char* owners[] = {"o1", "o2", "o3", "o4"};
  Input in{data, size};
  LockTableOptions options;
  options.default_lease_ms = 1000;
  options.max_hold_ms = 4000;
  options.restore_grace_ms = 2000;
  int ids = 0;
  auto new_id = [&ids] { return "L" + std::to_string(++ids); };
  auto table = std::make_unique<LockTable>(options, new_id);
  Saved saved;
  Micros now = 1'800'000'000'000'000;
  std::uint64_t highest = 0;  // the highest fence answered so far
  std::set<std::uint64_t> queued;
  // A new lock (not a re-entry) carries a fence above every one answered before.
  auto note = [&](const Lock& l) {
    if (l.hold_count == 1 && l.fence <= highest) std::abort();
    highest = std::max(highest, l.fence);
  };
  for (int step = 0; step < 200 && !in.empty(); ++step) {
    switch (in.next(8)) {
      case 0:
      case 1:
      case 2: {
        AcquireParams p;
        p.key = keys[in.next(3)];
        p.owner = owners[in.next(4)];
        p.session = in.next(2) ? "" : "s" + std::to_string(in.next(2));
        p.mode = in.next(2) ? LockMode::Write : LockMode::Read;
        if (unsigned t = in.next(3); t == 0) p.timeout_ms = 0;
        else if (t == 1) p.timeout_ms = in.next(8) * 200;
        AcquireResult r = table->acquire(p, now);
        if (r.kind == AcquireResult::Kind::Granted) note(r.lock);
        if (r.kind == AcquireResult::Kind::Queued) queued.insert(r.req_id);
        break;
      }
      case 3: {
        auto ls = table->locks();
        if (ls.empty()) break;
        const Lock& l = ls[in.next(static_cast<unsigned>(ls.size()))];
        const bool wrong_owner = in.next(8) == 0;
        const OpStatus s = table->release(l.lock_id, wrong_owner ? "intruder" : l.owner, now, in.next(2));
        // NotFound: its lease ran out before the call.
        if (s == (wrong_owner ? OpStatus::Ok : OpStatus::Forbidden)) std::abort();
        break;
      }
      case 4: {
        auto ls = table->locks();
        if (ls.empty()) break;
        const Lock& l = ls[in.next(static_cast<unsigned>(ls.size()))];
        Lock out;
        if (table->heartbeat(l.lock_id, l.owner, std::nullopt, now, &out) == OpStatus::Forbidden) std::abort();
        break;
      }
      case 5: {
        if (queued.empty()) break;
        auto it = std::next(queued.begin(), in.next(static_cast<unsigned>(queued.size())));
        table->cancel(*it, now);
        queued.erase(it);
        break;
      }
      case 6:
        now += static_cast<Micros>(in.next(16)) * 150'000;
        table->expire(now);
        break;
      case 7: {  // a restart from what was saved
        std::vector<Lock> locks;
        std::vector<QueuedRequest> queue;
        for (auto& [id, l] : saved.locks) locks.push_back(l);
        for (auto& [id, r] : saved.queue) queue.push_back(r);
        std::unordered_map<std::string, std::uint64_t> versions(saved.versions.begin(), saved.versions.end());
        table = std::make_unique<LockTable>(options, new_id);
        table->restore(std::move(locks), std::move(queue), saved.floor, now, std::move(versions));
        queued.clear();
        for (const auto& r : table->queue()) queued.insert(r.req_id);
        break;
      }
    }
    for (const Event& e : table->take_events()) {
      if (e.kind == Event::Kind::Granted) {
        note(e.lock);
        queued.erase(e.req_id);
      }
      if (e.kind == Event::Kind::TimedOut) queued.erase(e.req_id);
    }
    saved.apply(table->take_journal());
    if (saved.floor <= highest) std::abort();  // a fence answered above the saved floor
    check(*table, highest);
  }
  return 0;
}
