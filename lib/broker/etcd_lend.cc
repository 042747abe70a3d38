// EtcdService's lent keys (docs/etcd-store.md, "lending quiet keys"): a key whose
// queue was empty when this broker took it is lent to this broker by a lend entry,
// and its locks are kept in the broker's own table while nobody else asks; whatever
// would wait, and anyone else's entry behind the lend, hands the key back to etcd
// first (an adoption: the lent locks become ordinary entries in the lend's place).
// All on the io thread, but for the adoption's and the version's writes.
#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include "broker/etcd_service_impl.h"
#include "core/log.h"

namespace gate {

using namespace etcd_parts;

namespace {

// How long a retired lend's key is remembered (a stale view of it is then refused).
constexpr Micros kRetiredUs = 60'000'000;

}  // namespace

bool EtcdService::lends_trusted() const {
  // A lend lives as long as this broker's session: granting under it is safe while
  // the session surely lives (a keep-alive etcd answered, sent within TTL / 2), and
  // only while the mirror follows etcd (it shows who else asks for a lent key).
  const std::int64_t now = steady_ns();
  return now - alive_sent_at_.load() < opts_.session_ttl_s * 500'000'000 &&
         now - mirror_fresh_at_.load() < 1'500'000'000;
}

void EtcdService::register_lend(const Entry& lend, std::uint64_t version) {
  // (A lend adopted or lost already, seen in an older view, or one of an ended session.)
  if (lent_.count(lend.lock_key) || retired_.count(lend.key) || lend.etcd_lease != lease_.load()) return;
  lent_[lend.lock_key].lend = lend;
  lent_table_.merge_versions({{lend.lock_key, version}});
  log(LogLevel::Debug, "broker", "'", lend.lock_key, "' lent to this broker (", lend.key, ")");
}

bool EtcdService::serve_lent(std::uint64_t ticket, std::string* why) {
  auto it = waiters_.find(ticket);
  Waiter& w = *it->second;
  Lent& l = lent_.at(w.params.key);
  // (The lend's fences used up: the next grant recalls it.)
  if (l.next >= static_cast<std::uint64_t>(etcd::kSlotFences)) {
    *why = "its fences are used up";
    l.used_up = true;
    return false;
  }
  if (!lends_trusted()) {
    *why = "this broker's session is in doubt";
    return false;
  }
  AcquireParams p = w.params;
  p.timeout_ms = 0;  // what would wait goes etcd's way
  lending_ = l.lend.lock_id;
  const AcquireResult r = lent_table_.acquire(p, wall_clock_micros());
  drain_lent_events();
  if (r.kind == AcquireResult::Kind::Granted) {
    record_grant(w.since, false);
    answer(std::move(w.reply), granted_answer(r.lock, lent_table_.version_of(p.key)));
    waiters_.erase(it);
    if (std::optional<Micros> at = lent_table_.next_deadline()) arm_timer(*at);
    return true;
  }
  if (w.params.timeout_ms && *w.params.timeout_ms <= 0) {
    // A try: the lent locks are every lock of the key, so it would wait in etcd too.
    ++metrics_.timeouts;
    answer(std::move(w.reply), status_answer(408, "timeout"));
    waiters_.erase(it);
    return true;
  }
  *why = "a request would wait";
  return false;
}

void EtcdService::adopt(const std::string& key, const char* why, std::function<void(const std::string& error)> then) {
  Lent& l = lent_.at(key);
  if (then) l.after.push_back(std::move(then));
  if (l.adopting) return;
  l.adopting = true;
  log(LogLevel::Debug, "broker", "handing '", key, "' back to etcd: ", why);
  std::vector<Entry> entries;
  for (const Lock& lock : lent_table_.locks(key)) entries.push_back(adopted_entry(lock, l.lend));
  run_job([this, key, lend = l.lend, entries = std::move(entries)](EtcdClient& c) mutable {
    Adoption a = adopt_job(c, lend, std::move(entries), wall_clock_micros());
    boost::asio::post(ioc_, [this, key, a = std::move(a)]() mutable { adopted(key, std::move(a)); });
  });
}

void EtcdService::adopted(const std::string& key, Adoption a) {
  auto it = lent_.find(key);
  if (it == lent_.end()) return;
  if (a.kind == Adoption::Kind::Lost) return lost_lend(key, "its lend entry is gone (this broker's etcd session ended)");
  auto after = std::move(it->second.after);
  it->second.after.clear();
  if (a.kind == Adoption::Kind::Failed) {
    log(LogLevel::Warn, "broker", "could not hand '", key, "' back to etcd: ", a.error);
    it->second.adopting = false;
  } else {
    ++adoptions_;
    const Micros now = wall_clock_micros();
    retired_[it->second.lend.key] = now;
    if (!it->second.used_up) recalled_[key] = now;  // (nobody else asked)
    lent_.erase(it);
    lent_table_.take_key(key);
    // (Until the mirror shows them, a release or heartbeat finds them here.)
    for (const Entry& e : a.entries) remember(e);
    log(LogLevel::Debug, "broker", "'", key, "' handed back to etcd with ", a.entries.size(), " lent lock(s)");
  }
  for (auto& f : after) f(a.error);
}

void EtcdService::lost_lend(const std::string& key, const std::string& why) {
  auto it = lent_.find(key);
  if (it == lent_.end()) return;
  auto after = std::move(it->second.after);
  retired_[it->second.lend.key] = wall_clock_micros();
  lent_.erase(it);
  const std::vector<Lock> gone = lent_table_.take_key(key);
  log(LogLevel::Warn, "broker", "the lend of '", key, "' ended: ", why, "; its ", gone.size(), " lent lock(s) are gone");
  for (auto& f : after) f("");  // (etcd's way now: there they are gone too)
}

void EtcdService::release_lent(const ReleaseParams& p, Reply reply) {
  const Lock* l = lent_table_.find_lock(p.lock_id);
  if (!l) return release_lock(p, std::move(reply));  // handed back to etcd meanwhile
  if (l->owner != p.owner)
    return answer(std::move(reply), error_answer(403, BrokerService::refusal_text(OpStatus::Forbidden, p.lock_id)));
  auto finish = [this](const ReleaseParams& p, Reply reply) {
    if (!lent_table_.find_lock(p.lock_id)) return release_lock(p, std::move(reply));
    const OpStatus st = lent_table_.release(p.lock_id, p.owner, wall_clock_micros(), p.changed);
    drain_lent_events();
    if (st != OpStatus::Ok)
      return answer(std::move(reply),
                    error_answer(st == OpStatus::NotFound ? 404 : 403, BrokerService::refusal_text(st, p.lock_id)));
    metrics_.count_release(p.stale);
    answer(std::move(reply), status_answer(200, "released"));
  };
  if (!p.changed || l->mode != LockMode::Write) return finish(p, std::move(reply));
  // A change: the key's version is written to etcd (where it outlives this broker)
  // before the answer, while the lock is still held (so versions only grow).
  run_job([this, p, finish, reply = std::move(reply), key = l->key, fence = l->fence](EtcdClient& c) mutable {
    Result<etcd::TxnResult> r =
        txn(c, key, {}, {etcd::txn_put(etcd::version_key(key), std::to_string(fence))}, {}, Retry::Idempotent);
    boost::asio::post(ioc_, [this, p = std::move(p), finish, reply = std::move(reply), ok = r.ok(),
                             why = r.ok() ? std::string() : r.message()]() mutable {
      if (!ok) return answer(std::move(reply), status_answer(503, "unavailable", "etcd: " + why));
      finish(p, std::move(reply));
    });
  });
}

void EtcdService::drain_lent_events() {
  for (const Event& e : lent_table_.take_events()) {
    if (e.kind != Event::Kind::Dropped) continue;
    ++(e.reason == "hold cap reached" ? metrics_.cap_expiries : metrics_.lease_expiries);
    log(LogLevel::Info, "broker", "dropped ", to_string(e.lock.mode), " lock on '", e.lock.key, "' of ", e.lock.owner,
        ": ", e.reason);
  }
}

void EtcdService::lend_evaluate(Micros now, const std::function<void(Micros)>& soon) {
  lent_table_.expire(now);
  drain_lent_events();
  if (std::optional<Micros> at = lent_table_.next_deadline()) soon(*at);
  for (auto it = retired_.begin(); it != retired_.end();) it = now - it->second > kRetiredUs ? retired_.erase(it) : std::next(it);
  if (recalled_.size() > 1024)
    for (auto it = recalled_.begin(); it != recalled_.end();) it = now - it->second > 2'000'000 ? recalled_.erase(it) : std::next(it);
  const std::int64_t lease = lease_.load();
  std::vector<std::string> asked, lost;
  for (const auto& [key, l] : lent_) {
    if (l.adopting) continue;
    if (l.lend.etcd_lease != lease) {
      lost.push_back(key);
      continue;
    }
    const etcd::SpaceMirror::KeyView v = mirror_->view(key);
    if (!find_entry(v.queue, l.lend.key)) {
      if (v.revision >= l.lend.mod_revision) lost.push_back(key);
    } else if (v.queue.size() > 1) {
      asked.push_back(key);  // someone else's entry behind the lend
    }
  }
  for (const std::string& key : lost) lost_lend(key, "its lend entry is gone (this broker's etcd session ended)");
  for (const std::string& key : asked) adopt(key, "someone else asks for it", {});
}

}  // namespace gate
