// LockAgent, the locks that outlive a call: tracked (open handles), heartbeaten, and
// given back (releases, and what is on its way back). The jobs that take locks are in
// lock_agent.cc.
#include <algorithm>

#include "core/log.h"
#include "mount/lock_agent.h"

namespace gate::mount {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

}  // namespace

std::string LockAgent::release_of(const std::string& key, pid_t pid) {
  return key + '\0' + std::to_string(pid);
}

bool LockAgent::release_pending(const std::string& key, pid_t pid) const {
  if (releases_out_.count(release_of(key, pid))) return true;
  auto [begin, end] = by_key_.equal_range(key);
  return std::any_of(begin, end, [pid](const auto& e) { return e.second->lock.pid == pid; });
}

bool LockAgent::any_release_out(const std::string& key) const {
  std::lock_guard guard(track_m_);
  return releases_out_.count(key) > 0;
}

std::uint64_t LockAgent::release_epoch() const {
  std::lock_guard guard(track_m_);
  return release_epoch_;
}

void LockAgent::send_release(const HeldLock& lock, std::function<void()> then) {
  {
    std::lock_guard guard(track_m_);
    ++releases_out_[lock.key];
    ++releases_out_[release_of(lock.key, lock.pid)];
  }
  auto came_back = [this, lock, then = std::move(then)](const CallResult& r) {
    if (r.status == CallStatus::Unavailable) {
      log(LogLevel::Warn, "mount", "could not release the lock on ", lock.key, " (", lock.lock_id,
          "): broker at ", loop_.endpoint().describe(), " is unreachable (", r.error,
          "); it frees the lock when the lease runs out");
    } else if (r.status != CallStatus::Ok) {
      log(LogLevel::Debug, "mount", "release of ", lock.key, " (", lock.lock_id, "): ",
          to_string(r.status), " ", r.error);
    }
    if (then) then();
    {
      std::lock_guard guard(track_m_);
      for (const std::string& k : {lock.key, release_of(lock.key, lock.pid)})
        if (auto it = releases_out_.find(k); it != releases_out_.end() && --it->second <= 0)
          releases_out_.erase(it);
      ++release_epoch_;
    }
    // Jobs parked for it live on the broker thread.
    if (loop_.on_loop_thread()) releases_came_back(lock.key);
    else if (parked_ > 0) loop_.post([this, key = lock.key] { releases_came_back(key); });
  };
  // With the lock space here (a delegation), the engine answers in-process, typed.
  if (auto here = loop_.release_locally(lock.lock_id, lock.owner, lock.changed, lock.stale))
    return came_back(*here);
  wire::Request request = wire::release(lock.lock_id, lock.owner, lock.changed, lock.stale);
  auto from_reply = [came_back = std::move(came_back)](const HttpReply& reply) {
    came_back(wire::to_result(reply));
  };
  // Never waits on the broker thread; elsewhere briefly, like a try.
  if (loop_.on_loop_thread()) {
    loop_.call(std::move(request), std::move(from_reply));
    return;
  }
  if (auto reply = loop_.call_briefly(std::move(request), kTryPatience, from_reply)) from_reply(*reply);
}

void LockAgent::release(const HeldLock& lock) { send_release(lock); }

void LockAgent::release(const std::vector<HeldLock>& locks) {
  // Reverse order of taking; the order does not matter to the broker but reads well.
  for (auto it = locks.rbegin(); it != locks.rend(); ++it) send_release(*it);
}

std::shared_ptr<TrackedLock> LockAgent::track(HeldLock lock, pid_t pid) {
  auto tracked = std::make_shared<TrackedLock>();
  tracked->lock = std::move(lock);
  tracked->lock.pid = pid;
  std::lock_guard guard(track_m_);
  tracked_.emplace(tracked.get(), tracked);
  by_key_.emplace(tracked->lock.key, tracked.get());
  return tracked;
}

bool LockAgent::release_tracked(const std::shared_ptr<TrackedLock>& tracked, bool changed,
                                const std::string& stale) {
  {
    std::lock_guard guard(track_m_);
    // Out of tracked_: no more heartbeats, and stop() will not release it again.
    if (tracked_.erase(tracked.get()) == 0) return false;
    tracked->releasing = true;
  }
  HeldLock lock = tracked->lock;
  lock.changed = changed;
  lock.stale = stale;
  // The handle counts as holding until the broker's answer (release_in_flight).
  send_release(lock, [this, tracked] {
    std::lock_guard guard(track_m_);
    auto [begin, end] = by_key_.equal_range(tracked->lock.key);
    for (auto it = begin; it != end; ++it)
      if (it->second == tracked.get()) {
        by_key_.erase(it);
        break;
      }
  });
  return true;
}

std::optional<std::string> LockAgent::owner_holding(const std::string& key, pid_t pid) const {
  std::optional<std::string> other;
  {
    std::lock_guard guard(track_m_);
    auto [begin, end] = by_key_.equal_range(key);
    for (auto it = begin; it != end; ++it) {
      const TrackedLock* t = it->second;
      if (t->lost || t->releasing) continue;
      if (t->lock.pid == pid) return t->lock.owner;
      if (!other) other = t->lock.owner;
    }
  }
  // Another process's handle counts only when the caller holds that file open too
  // (an inherited descriptor); otherwise the caller waits like anyone else.
  if (other && process_has_open(pid, key)) return other;
  return std::nullopt;
}

void LockAgent::heartbeat_round() {
  if (stopping_) return;
  auto locks = std::make_shared<std::vector<std::shared_ptr<TrackedLock>>>();
  {
    std::lock_guard guard(track_m_);
    locks->reserve(tracked_.size());
    for (auto& [ptr, tracked] : tracked_)
      if (!tracked->lost) locks->push_back(tracked);
  }
  heartbeat_next(std::move(locks), 0);
}

// One heartbeat at a time (thousands of open files must not mean thousands of
// connections); the next round starts a third of a lease after this one ends.
void LockAgent::heartbeat_next(std::shared_ptr<std::vector<std::shared_ptr<TrackedLock>>> locks,
                               std::size_t i) {
  const auto interval = milliseconds(std::max<std::int64_t>(options_.lease_ms / 3, 50));
  if (stopping_) return;
  if (i >= locks->size())
    return loop_.post_at(Clock::now() + interval, [this] { heartbeat_round(); });
  auto t = (*locks)[i];
  loop_.call(wire::heartbeat(t->lock.lock_id, t->lock.owner, options_.lease_ms),
             [this, locks, i, t, interval](const HttpReply& reply) {
               const CallResult r = wire::to_result(reply);
               if (r.status == CallStatus::NotFound || r.status == CallStatus::Forbidden) {
                 t->lost_reason = r.status == CallStatus::NotFound
                                      ? "the broker no longer has it (its lease ran out or it reached "
                                        "the maximum hold time)"
                                      : "the broker says another owner holds it";
                 t->lost = true;
                 log(LogLevel::Warn, "mount", "lost the lock on ", t->lock.key, " (", t->lock.lock_id,
                     "): ", t->lost_reason, "; writes through this open file now fail with EIO");
               } else if (r.status != CallStatus::Ok) {
                 log(LogLevel::Warn, "mount", "could not renew ", locks->size(), " lock(s): broker at ",
                     loop_.endpoint().describe(), " answered ", to_string(r.status), " (", r.error,
                     "); retrying");
                 if (!stopping_) loop_.post_at(Clock::now() + interval, [this] { heartbeat_round(); });
                 return;
               }
               heartbeat_next(locks, i + 1);
             });
}

}  // namespace gate::mount
