// EtcdService's lent keys (docs/etcd-store.md, "lending quiet keys"): a key whose
// queue was empty when this broker took it is lent to this broker by a lend entry,
// and its locks are kept in the broker's own table while nobody else asks; whatever
// would wait, and anyone else's entry behind the lend, hands the key back to etcd
// first (an adoption: the lent locks become ordinary entries in the lend's place).
// All on the io thread, but for the adoption's and the version's writes, and the
// recall keys of other brokers' lends.
#include <sys/stat.h>

#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include "broker/etcd_service_impl.h"
#include "core/log.h"
#include "core/token.h"

namespace gate {

using namespace etcd_parts;

namespace {

// How long a retired lend's key is remembered (a stale view of it is then refused).
constexpr Micros kRetiredUs = 60'000'000;
// A lend under which nothing is held goes after this long.
constexpr Micros kIdleLendUs = 2'000'000;
// At most this many locks under one lend (an adoption writes each in one transaction).
constexpr std::size_t kMaxLentLocks = 64;
// An adoption etcd did not answer is tried again after this long.
constexpr Micros kAdoptRetryUs = 250'000;

}  // namespace

bool EtcdService::lends_trusted() const {
  // A lend lives as long as this broker's session: granting under it is safe while
  // the session surely lives (a keep-alive etcd answered, sent within TTL / 2), and
  // only while the mirror follows etcd (it shows who else asks for a lent key).
  // (The keeper sends a keep-alive every TTL / 4 of the lease it keeps, which may be one
  // taken up with a TTL of its own, and learns one interval later that the mirror
  // reached its last probe: two intervals and a margin.)
  const std::int64_t now = steady_ns();
  const std::int64_t every = std::chrono::nanoseconds(keeper_every()).count();
  return now - alive_sent_at_.load() < lease_ttl_s_.load() * 500'000'000 &&
         now - mirror_fresh_at_.load() < 2 * every + 500'000'000;
}

void EtcdService::register_lend(const Entry& lend, std::uint64_t version) {
  // (A lend adopted or lost already, seen in an older view, or one of an ended session.)
  if (retired_.count(lend.key) || lend.etcd_lease != lease_.load()) return;
  doubtful_.erase(lend.key);  // (taken up)
  if (auto it = lent_.find(lend.lock_key); it != lent_.end()) {
    // Made by a late acquire once the key's lend was gone in etcd, before this broker
    // heard so: its turn comes after that adoption.
    if (it->second.lend.key != lend.key && it->second.adopting) it->second.next_lend = {lend, version};
    return;
  }
  lent_[lend.lock_key].lend = lend;
  lent_table_.merge_versions({{lend.lock_key, version}});
  lent_changed(lend.lock_key);
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
  // (etcd allows 128 writes a transaction: an adoption writes each lent lock.)
  if (lent_table_.holders(w.params.key) >= kMaxLentLocks) {
    *why = "it has as many lent locks as an adoption can carry";
    return false;
  }
  // Anyone else's entry behind the lend (the mirror's view): it is handed back, and
  // this request goes behind it.
  if (mirror_->queue(w.params.key).size() > 1) {
    *why = "someone else asks for it";
    return false;
  }
  AcquireParams p = w.params;
  p.timeout_ms = 0;  // what would wait goes etcd's way
  lending_ = l.lend.lock_id;
  const AcquireResult r = lent_table_.acquire(p, wall_clock_micros());
  lent_changed(p.key);
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
  if (l.in_flight) return;
  if (!l.adopting) {
    log(LogLevel::Debug, "broker", "handing '", key, "' back to etcd: ", why);
    // (Frozen from now on: a try again writes the same entries, so that it can tell
    // whether an earlier one was applied.)
    for (const Lock& lock : lent_table_.locks(key)) l.adoption.push_back(adopted_entry(lock, l.lend));
  }
  l.adopting = l.in_flight = true;
  run_job([this, key, lend = l.lend, entries = l.adoption](EtcdClient& c) mutable {
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
  const std::vector<std::uint64_t> acquires = std::move(it->second.acquires);
  it->second.acquires.clear();
  if (a.kind == Adoption::Kind::Failed) {
    // Applied or not, etcd cannot say: the key stays frozen (nothing granted under the
    // lend) and the adoption is tried again; what waited for it hears why.
    log(LogLevel::Warn, "broker", "could not hand '", key, "' back to etcd (trying again): ", a.error);
    it->second.in_flight = false;
    arm_timer(wall_clock_micros() + kAdoptRetryUs);
  } else {
    ++adoptions_;
    const Micros now = wall_clock_micros();
    retired_[it->second.lend.key] = now;
    if (!it->second.used_up) recalled_[key] = now;  // (nobody else asked)
    for (auto& turn : it->second.version_turns) boost::asio::post(ioc_, std::move(turn));
    const auto next_lend = std::move(it->second.next_lend);
    lent_.erase(it);
    lent_table_.take_key(key);
    lent_changed();
    if (next_lend) register_lend(next_lend->first, next_lend->second);
    // (Until the mirror shows them, a release or heartbeat finds them here.)
    for (const Entry& e : a.entries) remember(e);
    log(LogLevel::Debug, "broker", "'", key, "' handed back to etcd with ", a.entries.size(), " lent lock(s)");
  }
  for (auto& f : after) f(a.error);
  if (a.error.empty()) return begin_acquires_in_order(key, acquires);
  for (std::uint64_t t : acquires) acquired(t, Outcome{Outcome::Kind::Unavailable, {}, 0, a.error});
}

void EtcdService::lost_lend(const std::string& key, const std::string& why) {
  auto it = lent_.find(key);
  if (it == lent_.end()) return;
  auto after = std::move(it->second.after);
  const std::vector<std::uint64_t> acquires = std::move(it->second.acquires);
  retired_[it->second.lend.key] = wall_clock_micros();
  for (auto& turn : it->second.version_turns) boost::asio::post(ioc_, std::move(turn));
  const auto next_lend = std::move(it->second.next_lend);
  lent_.erase(it);
  const std::vector<Lock> gone = lent_table_.take_key(key);
  lent_changed();
  log(LogLevel::Warn, "broker", "the lend of '", key, "' ended: ", why, "; its ", gone.size(), " lent lock(s) are gone");
  if (next_lend) register_lend(next_lend->first, next_lend->second);
  for (auto& f : after) f("");  // (etcd's way now: there they are gone too)
  begin_acquires_in_order(key, acquires);
}

void EtcdService::release_lent(const ReleaseParams& p, Reply reply) {
  const Lock* l = lent_table_.find_lock(p.lock_id);
  if (!l) return release_lock(p, std::move(reply));  // handed back to etcd meanwhile
  if (l->owner != p.owner)
    return answer(std::move(reply), error_answer(403, BrokerService::refusal_text(OpStatus::Forbidden, p.lock_id)));
  auto finish = [this](const ReleaseParams& p, Reply reply) {
    const Lock* l = lent_table_.find_lock(p.lock_id);
    // (Handed back meanwhile, or being handed back: etcd's way, after.)
    if (!l) return release_lock(p, std::move(reply));
    if (auto it = lent_.find(l->key); it != lent_.end() && it->second.adopting)
      return it->second.after.push_back([this, p, reply = std::move(reply)](const std::string& error) mutable {
        if (error.empty()) release_lock(std::move(p), std::move(reply));
        else answer(std::move(reply), status_answer(503, "unavailable", error));
      });
    const std::string key = l->key;
    const OpStatus st = lent_table_.release(p.lock_id, p.owner, wall_clock_micros(), p.changed);
    lent_changed(key);
    if (st != OpStatus::Ok)
      return answer(std::move(reply),
                    error_answer(st == OpStatus::NotFound ? 404 : 403, BrokerService::refusal_text(st, p.lock_id)));
    metrics_.count_release(p.stale);
    answer(std::move(reply), status_answer(200, "released"));
  };
  if (!p.changed || l->mode != LockMode::Write) return finish(p, std::move(reply));
  // A change: the key's version is written to etcd (where it outlives this broker)
  // before the answer, while the lock is still held, while the lend lives, and one
  // write of the key's at a time (so versions land in fence order).
  const std::string key = l->key;
  Lent& lent = lent_.at(key);
  if (lent.writing_version)
    return lent.version_turns.push_back([this, p, reply]() mutable { release_lent(p, std::move(reply)); });
  lent.writing_version = true;
  run_job([this, p, finish, reply = std::move(reply), key, fence = l->fence, lend = lent.lend](EtcdClient& c) mutable {
    Result<etcd::TxnResult> r =
        txn(c, key, {etcd::compare(lend.key, "MOD", "EQUAL", lend.mod_revision)},
            {etcd::txn_put(etcd::version_key(key), std::to_string(fence))}, {}, Retry::Idempotent);
    boost::asio::post(ioc_, [this, p = std::move(p), finish, reply = std::move(reply), key, ok = r.ok(),
                             written = r.ok() && r->succeeded, why = r.ok() ? std::string() : r.message()]() mutable {
      if (auto it = lent_.find(key); it != lent_.end()) {
        it->second.writing_version = false;
        if (!it->second.version_turns.empty()) {
          auto next = std::move(it->second.version_turns.front());
          it->second.version_turns.pop_front();
          boost::asio::post(ioc_, std::move(next));
        }
      }
      if (!ok) return answer(std::move(reply), status_answer(503, "unavailable", "etcd: " + why));
      // The lend gone, the write was not made: once this broker knows why (handed back:
      // etcd's way, which writes the version with the release; ended with the session:
      // the lock is gone), the release is answered.
      auto it = lent_.find(key);
      if (!written && it != lent_.end() && !it->second.adopting)
        return answer(std::move(reply), status_answer(503, "unavailable", "the lend of '" + key + "' ended; try again"));
      finish(p, std::move(reply));
    });
  });
}

Status EtcdService::recall(EtcdClient& c, const std::vector<Entry>& lends, std::chrono::milliseconds limit) {
  const Session s = session();
  if (!s.lease) return Status::failure("this broker has no etcd session (taking a new one)");
  const std::string asker = s.id + "-" + random_token().substr(0, 12);
  // (At most 100 writes a transaction: etcd takes 128.)
  std::vector<json::array> puts(1), deletes(1);
  std::int64_t seen = 0;
  for (const Entry& l : lends) {
    if (puts.back().size() == 100) {
      puts.emplace_back();
      deletes.emplace_back();
    }
    const std::string key = etcd::recall_key(l.lock_key, asker);
    puts.back().push_back(etcd::txn_put(key, l.key, s.lease));
    deletes.back().push_back(etcd::txn_delete(key));
    seen = std::max(seen, l.mod_revision);
  }
  for (const json::array& some : puts)
    if (Result<etcd::TxnResult> r = c.txn({}, some, {}, Retry::Idempotent); !r.ok())
      return Status::failure("etcd: " + r.message());
  const auto until = std::chrono::steady_clock::now() + limit;
  mirror_->wait_for(seen, limit);  // (the lends as read, in the mirror, before it looks for their going)
  auto handed_back = [&] {
    for (const Entry& l : lends)
      if (mirror_->entry(l.key)) return false;
    return true;
  };
  while (!handed_back()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left <= std::chrono::milliseconds(0)) break;
    mirror_->wait_for(mirror_->revision() + 1, std::min(left, std::chrono::milliseconds(50)));
  }
  const bool done = handed_back();
  // (An adoption deletes them; a lend that ended otherwise, with its broker, did not.)
  for (const json::array& some : deletes)
    if (Result<etcd::TxnResult> r = c.txn({}, some, {}, Retry::Idempotent); !r.ok())
      log(LogLevel::Warn, "broker", "could not remove a recall key (it ends with this broker's session): ", r.message());
  if (!done)
    return Status::failure("the broker '" + lends.front().lock_key + "' is lent to did not hand it back within " +
                           std::to_string(limit.count()) + " ms");
  return {};
}

void EtcdService::lent_changed(const std::string& key) {
  if (std::vector<JournalEntry> j = lent_table_.take_journal(); !j.empty() && lent_store_)
    if (Status s = lent_store_->apply(j); !s.ok()) {
      // (etcd has the truth once the key is handed back; the journal's rows of its
      // lend are then the last run's of a lend that is gone: left out at a start.)
      log(LogLevel::Error, "broker", "cannot journal the lent locks in lent.db (", s.message(),
          "): the key goes back to etcd");
      if (auto it = lent_.find(key); it != lent_.end() && !it->second.adopting)
        adopt(key, "its journal could not be written", {});
    }
  for (const Event& e : lent_table_.take_events()) {
    if (e.kind != Event::Kind::Dropped) continue;
    ++(e.reason == "hold cap reached" ? metrics_.cap_expiries : metrics_.lease_expiries);
    log(LogLevel::Info, "broker", "dropped ", to_string(e.lock.mode), " lock on '", e.lock.key, "' of ", e.lock.owner,
        ": ", e.reason);
  }
}

Status EtcdService::hand_back_last_run() {
  const std::string path = opts_.state_dir + "/lent.db";
  std::unique_ptr<LockStore> store;
  LockStore::Snapshot saved;
  struct stat st {};
  if (opts_.lend || ::stat(path.c_str(), &st) == 0) {  // (a broker that never lent has none)
    Result<std::unique_ptr<LockStore>> opened = LockStore::open(path, LockStore::Sync::Normal);
    if (!opened.ok()) return Status::failure("cannot open " + path + ": " + opened.message());
    store = std::move(*opened);
    Result<LockStore::Snapshot> loaded = store->load();
    if (!loaded.ok()) return Status::failure("cannot read " + path + ": " + loaded.message());
    saved = std::move(*loaded);
  }
  const std::string me = broker_id();
  std::size_t kept = 0, lost = 0;
  for (const auto& [key, q] : mirror_->snapshot())
    for (const Entry& lend : q) {
      if (!lend.lend || lend.broker != me) continue;
      std::vector<Entry> entries;
      for (const Lock& l : saved.locks)
        if (l.key == lend.lock_key && l.lock_id.starts_with(lend.lock_id + ".")) entries.push_back(adopted_entry(l, lend));
      Adoption a = adopt_job(*keeper_client_, lend, std::move(entries), wall_clock_micros());
      if (a.kind == Adoption::Kind::Failed)
        return Status::failure("cannot hand the last run's lend of '" + lend.lock_key + "' back to etcd: " + a.error);
      kept += a.entries.size();
    }
  // (Journaled locks whose lend is gone ended with the last run's session.)
  std::vector<JournalEntry> clear;
  for (const Lock& l : saved.locks) clear.push_back(JournalEntry{JournalEntry::Kind::DeleteLock, {}, {}, l.lock_id});
  lost = saved.locks.size() - kept;
  if (store && !clear.empty())
    if (Status s = store->apply(clear); !s.ok()) return Status::failure("cannot empty " + path + ": " + s.message());
  if (kept || lost)
    log(LogLevel::Info, "broker", "the last run's lent locks: ", kept, " handed back to etcd with their lends, ", lost,
        " ended with its session");
  if (opts_.lend) {
    lent_store_ = std::move(store);
    lent_table_.keep_journal(true);
  }
  return {};
}

void EtcdService::lend_evaluate(Micros now, const std::function<void(Micros)>& soon) {
  lent_table_.expire(now);
  lent_changed();
  if (std::optional<Micros> at = lent_table_.next_deadline()) soon(*at);
  for (auto it = retired_.begin(); it != retired_.end();) it = now - it->second > kRetiredUs ? retired_.erase(it) : std::next(it);
  if (recalled_.size() > 1024)
    for (auto it = recalled_.begin(); it != recalled_.end();) it = now - it->second > 2'000'000 ? recalled_.erase(it) : std::next(it);
  const std::int64_t lease = lease_.load();
  std::vector<std::string> asked, lost;
  std::vector<std::string> idle;
  std::vector<std::string> retry;
  for (auto& [key, l] : lent_) {
    if (l.adopting) {
      if (!l.in_flight) retry.push_back(key);
      continue;
    }
    if (l.lend.etcd_lease != lease) {
      lost.push_back(key);
      continue;
    }
    const etcd::SpaceMirror::KeyView v = mirror_->view(key);
    if (!find_entry(v.queue, l.lend.key)) {
      if (v.revision >= l.lend.mod_revision) lost.push_back(key);
      continue;
    }
    if (v.queue.size() > 1 || mirror_->recalled(key)) {
      asked.push_back(key);  // someone else's entry behind the lend, or a recall key
      continue;
    }
    // A lend nobody holds a lock under goes after kIdleLendUs (lends do not pile up,
    // and another broker's first acquire of the key is not a recall).
    if (lent_table_.holders(key)) {
      l.idle_since = 0;
    } else if (!l.idle_since) {
      l.idle_since = now;
      soon(now + kIdleLendUs);
    } else if (now - l.idle_since >= kIdleLendUs) {
      l.used_up = true;  // (nobody asked: lent again at the next acquire)
      idle.push_back(key);
    } else {
      soon(l.idle_since + kIdleLendUs);
    }
  }
  for (const std::string& key : lost) lost_lend(key, "its lend entry is gone (this broker's etcd session ended)");
  for (const std::string& key : asked) adopt(key, "someone else asks for it", {});
  for (const std::string& key : idle) adopt(key, "nobody has held it for 2 s", {});
  for (const std::string& key : retry) adopt(key, "", {});
}

}  // namespace gate
