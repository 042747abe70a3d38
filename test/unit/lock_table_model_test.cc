// Randomized check of the lock engine against a small, naive reference model.
// After every step: (a) no key has a writer together with another holder; (b) the
// grants (per key, in order), time-outs, deadlocks and immediate answers are the
// ones the model computes; (c) nothing stays queued that could be granted.
#include <catch2/catch.hpp>

#include <algorithm>
#include <deque>
#include <map>
#include <random>
#include <set>

#include "lock/lock_table.h"

using namespace gate;

namespace {

constexpr Micros kMs = 1000;

struct Model {
  struct Held {
    std::string id, owner;
    LockMode mode;
    int count;
    Micros acquired, lease_end;
  };
  struct Req {
    std::uint64_t id;
    std::string key, owner;
    LockMode mode;
    std::optional<Micros> deadline;
  };
  std::int64_t lease_ms = 1000, cap_ms = 4000;
  std::map<std::string, std::vector<Held>> held;
  std::map<std::string, std::deque<Req>> queue;

  Micros end_of(const Held& h) const { return std::min(h.lease_end, h.acquired + cap_ms * kMs); }

  Held* holder(const std::string& key, const std::string& owner) {
    for (auto& h : held[key])
      if (h.owner == owner) return &h;
    return nullptr;
  }

  bool grantable(const std::string& key, const Req& r) {
    for (auto& h : held[key]) {
      if (h.owner == r.owner) continue;
      if (r.mode == LockMode::Write || h.mode == LockMode::Write) return false;
    }
    return true;
  }

  // Grants from the front of the key's queue; returns the ids granted in order.
  std::vector<std::uint64_t> pump(const std::string& key, Micros now,
                                  std::map<std::uint64_t, std::string>* ids) {
    std::vector<std::uint64_t> out;
    auto& q = queue[key];
    while (!q.empty() && grantable(key, q.front())) {
      Req r = q.front();
      q.pop_front();
      if (Held* h = holder(key, r.owner)) {
        h->count++;
        if (r.mode == LockMode::Write) h->mode = LockMode::Write;
        h->lease_end = std::max(h->lease_end, now + lease_ms * kMs);
      } else {
        held[key].push_back({(*ids)[r.id], r.owner, r.mode, 1, now, now + lease_ms * kMs});
      }
      out.push_back(r.id);
    }
    return out;
  }

  std::vector<const Req*> waiting_of(const std::string& owner) const {
    std::vector<const Req*> out;
    for (auto& [k, q] : queue)
      for (auto& r : q)
        if (r.owner == owner) out.push_back(&r);
    return out;
  }

  bool reaches(const Req& r, const std::string& self, std::set<std::uint64_t>& seen) const {
    auto hit = held.find(r.key);
    if (hit != held.end())
      for (auto& h : hit->second) {
        if (h.owner == r.owner) continue;
        if (r.mode == LockMode::Read && h.mode == LockMode::Read) continue;
        if (h.owner == self) return true;
        for (auto* w : waiting_of(h.owner))
          if (seen.insert(w->id).second && reaches(*w, self, seen)) return true;
      }
    for (auto& q : queue.at(r.key)) {
      if (q.id >= r.id) break;
      if (r.mode == LockMode::Read && q.mode == LockMode::Read) continue;
      if (seen.insert(q.id).second && reaches(q, self, seen)) return true;
      if (q.owner != self)
        for (auto* w : waiting_of(q.owner))
          if (seen.insert(w->id).second && reaches(*w, self, seen)) return true;
    }
    return false;
  }
};

}  // namespace

TEST_CASE("the engine matches the reference model over random operations", "[lock][model]") {
  const std::vector<std::string> keys = {"a", "b", "c"};
  const std::vector<std::string> owners = {"o1", "o2", "o3", "o4", "o5"};
  for (unsigned seed = 1; seed <= 40; ++seed) {
    CAPTURE(seed);
    std::mt19937 rng(seed);
    auto pick = [&](std::size_t n) { return std::uniform_int_distribution<std::size_t>(0, n - 1)(rng); };
    LockTableOptions opts;
    opts.default_lease_ms = 1000;
    opts.max_hold_ms = 4000;
    int next_id = 0;
    LockTable table(opts, [&] { return "L" + std::to_string(++next_id); });
    Model model;
    std::map<std::uint64_t, std::string> lock_ids;  // req id -> lock id the engine gave
    Micros now = 1'800'000'000'000'000;

    auto check_events = [&](std::map<std::string, std::vector<std::uint64_t>> want,
                            std::set<std::uint64_t> want_timeouts) {
      std::map<std::string, std::vector<std::uint64_t>> got;
      std::set<std::uint64_t> got_timeouts;
      for (auto& e : table.take_events()) {
        if (e.kind == Event::Kind::Granted) got[e.lock.key].push_back(e.req_id);
        if (e.kind == Event::Kind::TimedOut) got_timeouts.insert(e.req_id);
      }
      for (auto it = want.begin(); it != want.end();)
        it = it->second.empty() ? want.erase(it) : std::next(it);
      REQUIRE(got == want);
      REQUIRE(got_timeouts == want_timeouts);
    };

    for (int step = 0; step < 400; ++step) {
      CAPTURE(step);
      const int op = static_cast<int>(pick(10));
      if (op <= 4) {  // acquire
        const std::string key = keys[pick(keys.size())];
        const std::string owner = owners[pick(owners.size())];
        const LockMode mode = pick(2) ? LockMode::Write : LockMode::Read;
        std::optional<std::int64_t> timeout;
        if (auto t = pick(4); t == 0) timeout = 0;
        else if (t == 1) timeout = 500;
        AcquireParams p{key, mode, owner, "", "", timeout, std::nullopt, std::nullopt};
        const std::uint64_t id = table.next_req_id();
        const int id_before = next_id;
        AcquireResult r = table.acquire(p, now);
        // Model: re-entrancy first.
        Model::Held* h = model.holder(key, owner);
        bool upgrade_waits = false;
        if (h && (h->mode == LockMode::Write || mode == LockMode::Read)) {
          h->count++;
          h->lease_end = std::max(h->lease_end, now + model.lease_ms * kMs);
          REQUIRE(r.kind == AcquireResult::Kind::Granted);
          REQUIRE(r.lock.hold_count == h->count);
        } else if (h && model.held[key].size() == 1) {
          h->count++;
          h->mode = LockMode::Write;
          h->lease_end = std::max(h->lease_end, now + model.lease_ms * kMs);
          REQUIRE(r.kind == AcquireResult::Kind::Granted);
          REQUIRE(r.lock.mode == LockMode::Write);
        } else {
          upgrade_waits = h != nullptr;
          Model::Req req{id, key, owner, mode, std::nullopt};
          model.queue[key].push_back(req);
          lock_ids[id] = "L" + std::to_string(id_before + 1);
          auto granted = model.pump(key, now, &lock_ids);
          if (!granted.empty()) {
            REQUIRE(granted == std::vector<std::uint64_t>{id});
            REQUIRE(r.kind == AcquireResult::Kind::Granted);
            if (!upgrade_waits) REQUIRE(r.lock.lock_id == lock_ids[id]);
          } else if (timeout && *timeout == 0) {
            model.queue[key].pop_back();
            REQUIRE(r.kind == AcquireResult::Kind::Timeout);
          } else {
            std::set<std::uint64_t> seen{id};
            if (model.reaches(model.queue[key].back(), owner, seen)) {
              model.queue[key].pop_back();
              REQUIRE(r.kind == AcquireResult::Kind::Deadlock);
            } else {
              REQUIRE(r.kind == AcquireResult::Kind::Queued);
              REQUIRE(r.req_id == id);
              if (timeout) model.queue[key].back().deadline = now + *timeout * kMs;
            }
          }
        }
        check_events({}, {});
      } else if (op <= 6) {  // release a random held lock
        std::vector<std::pair<std::string, Model::Held*>> all;
        for (auto& [k, hs] : model.held)
          for (auto& x : hs) all.push_back({k, &x});
        if (all.empty()) continue;
        auto [key, h] = all[pick(all.size())];
        const Lock* engine_lock = nullptr;
        for (auto& l : table.locks(key))
          if (l.owner == h->owner) engine_lock = table.find_lock(l.lock_id);
        REQUIRE(engine_lock);
        const std::string lock_id = engine_lock->lock_id;
        REQUIRE(table.release(lock_id, h->owner, now) == OpStatus::Ok);
        std::map<std::string, std::vector<std::uint64_t>> want;
        if (--h->count == 0) {
          auto& hs = model.held[key];
          hs.erase(std::find_if(hs.begin(), hs.end(), [&](auto& x) { return &x == h; }));
          want[key] = model.pump(key, now, &lock_ids);
        }
        check_events(want, {});
      } else if (op == 7) {  // cancel a random queued request
        std::vector<std::uint64_t> ids;
        for (auto& [k, q] : model.queue)
          for (auto& r : q) ids.push_back(r.id);
        if (ids.empty()) continue;
        const std::uint64_t id = ids[pick(ids.size())];
        std::string key;
        for (auto& [k, q] : model.queue)
          for (auto it = q.begin(); it != q.end(); ++it)
            if (it->id == id) {
              key = k;
              q.erase(it);
              break;
            }
        REQUIRE(table.cancel(id, now));
        check_events({{key, model.pump(key, now, &lock_ids)}}, {});
      } else if (op == 8) {  // heartbeat a random held lock
        for (auto& l : table.locks()) {
          if (pick(2)) continue;
          Lock out;
          REQUIRE(table.heartbeat(l.lock_id, l.owner, std::nullopt, now, &out) == OpStatus::Ok);
          model.holder(l.key, l.owner)->lease_end = now + model.lease_ms * kMs;
        }
        check_events({}, {});
      } else {  // time passes
        now += static_cast<Micros>(pick(700)) * kMs;
        table.expire(now);
        std::set<std::uint64_t> timeouts;
        std::set<std::string> touched;
        for (auto& [k, hs] : model.held) {
          auto before = hs.size();
          hs.erase(std::remove_if(hs.begin(), hs.end(), [&](auto& x) { return model.end_of(x) <= now; }),
                   hs.end());
          if (hs.size() != before) touched.insert(k);
        }
        for (auto& [k, q] : model.queue)
          for (auto it = q.begin(); it != q.end();) {
            if (it->deadline && *it->deadline <= now) {
              timeouts.insert(it->id);
              touched.insert(k);
              it = q.erase(it);
            } else {
              ++it;
            }
          }
        std::map<std::string, std::vector<std::uint64_t>> want;
        for (auto& k : touched) want[k] = model.pump(k, now, &lock_ids);
        check_events(want, timeouts);
      }

      // (a) and (c), and the engine's state equals the model's.
      for (const auto& key : keys) {
        auto locks = table.locks(key);
        int writers = 0;
        for (auto& l : locks) writers += l.mode == LockMode::Write;
        REQUIRE((writers == 0 || locks.size() == 1));
        REQUIRE(locks.size() == model.held[key].size());
        auto q = table.queue(key);
        REQUIRE(q.size() == model.queue[key].size());
        if (!q.empty()) {
          const auto& front = model.queue[key].front();
          REQUIRE_FALSE(model.grantable(key, front));
        }
      }
    }
  }
}
