// EtcdService's side of what its mirror shows (etcd_service.h): grants due, entries
// that vanished, locks whose lease or hold cap ended, time-outs, and the lent keys'
// own (etcd_lend.cc); on the io thread.
#include <boost/asio/post.hpp>

#include "broker/etcd_service_impl.h"
#include "broker/lock_json.h"
#include "core/log.h"

namespace gate {

using namespace etcd_parts;

namespace {

constexpr Micros kUnattachedUs = 1'000'000;  // an entry of ours no request waits on lives this long

}  // namespace

void EtcdService::client_gone(std::uint64_t ticket) {
  auto it = waiters_.find(ticket);
  if (it == waiters_.end()) return;
  Waiter& w = *it->second;
  w.gone = true;
  if (w.busy) return;  // its job's result decides (acquired())
  if (w.entry) cancel_entry(*w.entry);
  ++metrics_.disconnects_while_queued;
  log(LogLevel::Debug, "broker", "client of request ", ticket, " went away; leaving the queue");
  waiters_.erase(it);
}

void EtcdService::arm_timer(Micros at) {
  if (timer_at_ && *timer_at_ <= at) return;
  timer_at_ = at;
  const Micros delay = std::max<Micros>(0, at - wall_clock_micros()) + 1;
  timer_.expires_after(std::chrono::microseconds(delay));
  timer_.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    timer_at_.reset();
    evaluate();
  });
}

void EtcdService::evaluate() {
  change_posted_ = false;
  if (shutting_down_ || !mirror_) return;
  const Micros now = wall_clock_micros();
  const std::string me = broker_id();
  std::optional<Micros> next;
  auto soon = [&](Micros at) { next = next ? std::min(*next, at) : at; };

  std::map<std::string, std::uint64_t> attached;  // entry key -> ticket
  std::map<std::string, etcd::SpaceMirror::KeyView> views;  // lock key -> its queue now
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    Waiter& w = *it->second;
    const std::uint64_t ticket = it->first;
    if (w.entry) attached[w.entry->key] = ticket;
    attached[w.made_as] = ticket;
    if (w.busy || !w.entry) {
      ++it;
      continue;
    }
    if (w.deadline && *w.deadline <= now) {
      cancel_entry(*w.entry);
      ++metrics_.timeouts;
      answer(std::move(w.reply), status_answer(408, "timeout"));
      it = waiters_.erase(it);
      continue;
    }
    if (w.deadline) soon(*w.deadline);
    auto v = views.find(w.params.key);  // (its queue only, once for all its waiters)
    if (v == views.end()) v = views.emplace(w.params.key, mirror_->view(w.params.key)).first;
    const etcd::SpaceMirror::KeyView& view = v->second;
    const Entry* e = find_entry(view.queue, w.entry->key);
    if (!e) {
      if (w.seen || view.revision >= w.entry->create_revision) {
        answer(std::move(w.reply),
               status_answer(503, "unavailable",
                             "the request's place in the queue is gone (this broker's etcd session ended)"));
        it = waiters_.erase(it);
        continue;
      }
      ++it;  // the mirror has not seen it yet
      continue;
    }
    w.seen = true;
    if (e->attach != w.entry->attach) {
      if (e->mod_revision < w.entry->mod_revision) {
        ++it;  // the mirror has not seen this request's re-attachment yet
        continue;
      }
      answer(std::move(w.reply), status_answer(408, "timeout", "superseded by a request with the same request_id"));
      it = waiters_.erase(it);
      continue;
    }
    if (e->held) {
      // Granted by a release's hand-off (on this broker or another).
      record_grant(w.since, true);
      log(LogLevel::Info, "broker", "granted ", to_string(e->mode), " '", e->lock_key, "' to ", e->owner,
          " after waiting ", (now - w.since) / 1000, " ms (fence ", e->fence(), ", handed off)");
      answer(std::move(w.reply), granted_answer(to_lock(*e), view.version));
      it = waiters_.erase(it);
      continue;
    }
    if (w.recheck) {
      // Its check saw a lend (a broker's locks nobody else sees): once it is handed
      // back, a cycle through its locks shows.
      if (std::optional<std::string> cycle = cycle_of(*e, &w.recheck)) {
        cancel_entry(*e);
        ++metrics_.deadlocks;
        log(LogLevel::Info, "broker", "deadlock refused: ", *cycle);
        answer(std::move(w.reply), status_answer(409, "deadlock", *cycle));
        it = waiters_.erase(it);
        continue;
      }
    }
    const std::size_t at = static_cast<std::size_t>(e - view.queue.data());
    if (etcd::standings(view.queue)[at] != etcd::Standing::Waiting) {
      w.busy = true;
      run_job([this, ticket, known = *w.entry](EtcdClient& c) {
        Outcome o = grant_job(c, known, wall_clock_micros());
        boost::asio::post(ioc_, [this, ticket, o = std::move(o)]() mutable { acquired(ticket, std::move(o)); });
      });
    }
    ++it;
  }

  // Sweeps: from the mirror's indexes (what ended, what waits, what is in doubt), not
  // a copy of the whole space per change.
  lend_evaluate(now, soon);
  const bool orphans_due = now >= started_at_ + opts_.restore_grace_ms * 1000;
  std::map<std::string, Micros> unattached;  // what is still so now
  auto consider = [&](const Entry& e) {
    if (sweeping_.count(e.key)) return;
    if (e.lend) {
      // A lend ends with its broker (or its session), never by time or a sweep. One of
      // this broker's made by an acquire answered 503 is taken up (it lends nothing,
      // and ends as an idle lend does).
      if (e.broker == me && doubtful_.count(e.key)) register_lend(e, mirror_->version_of(e.lock_key));
      return;
    }
    std::string why;
    if (auto d = doubtful_.find(e.key); d != doubtful_.end() && d->second.first == e.op) {
      why = "its request was answered 503 before etcd said it had been written";
      doubtful_.erase(d);
    } else if (e.held) {
      // Ended by its lease or the hold cap: its own broker deletes it at once, any
      // other one a moment later (whichever comes first; the other's compare fails).
      const Micros end = e.ends_at() + (e.broker == me ? 0 : kForeignSweepDelayUs);
      if (end > now) {
        soon(end);
        return;
      }
      why = e.max_hold_ms && e.acquired_at + *e.max_hold_ms * 1000 <= e.lease_expires_at ? "hold cap reached"
                                                                                            : "lease expired";
    } else if (e.broker == me && !attached.count(e.key)) {
      if (e.create_revision > start_revision_) {
        // Made by a write whose answer was lost, or left by a removal that failed,
        // while etcd was out of reach: no request waits on it. (Given a moment
        // first: a job that re-attached it may not have reported yet.)
        const auto was = unattached_.find(e.key);
        const Micros since = unattached[e.key] = was == unattached_.end() ? now : was->second;
        if (now < since + kUnattachedUs) {
          soon(since + kUnattachedUs);
          return;
        }
        why = "no request waits on it";
      } else if (!orphans_due) {
        // Queued in the last run: kept for its client to ask again.
        soon(started_at_ + opts_.restore_grace_ms * 1000);
        return;
      } else {
        why = "its client did not come back within " + std::to_string(opts_.restore_grace_ms) + " ms of a restart";
      }
    } else {
      return;
    }
    sweeping_[e.key] = now;
    run_job([this, e, why](EtcdClient& c) {
      Result<etcd::TxnResult> r =
          txn(c, e.lock_key, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)}, {etcd::txn_delete(e.key)}, {}, Retry::Idempotent);
      const bool done = r.ok() && r->succeeded;
      if (done)
        log(LogLevel::Info, "broker", "dropped ", e.held ? "" : "queued ", to_string(e.mode), " ",
            e.held ? "lock" : "request", " on '", e.lock_key, "' of ", e.owner, ": ", why);
      boost::asio::post(ioc_, [this, key = e.key, held = e.held, why, done, failed = !r.ok()] {
        sweeping_.erase(key);
        if (done && held) ++(why == "hold cap reached" ? metrics_.cap_expiries : metrics_.lease_expiries);
        if (failed) arm_timer(wall_clock_micros() + kRetryUs);
        else if (!done) schedule_evaluate();  // changed meanwhile (a heartbeat): looked at again
      });
    });
  };
  std::vector<std::string> doubted;
  for (const auto& [key, mark] : doubtful_) doubted.push_back(key);
  for (const std::string& key : doubted)
    if (std::optional<Entry> e = mirror_->entry(key)) consider(*e);
  etcd::SpaceMirror::Due due = mirror_->due(now, me);
  for (const Entry& e : due.ended) consider(e);
  for (const Entry& e : due.waiting) consider(e);
  if (due.next_end) soon(*due.next_end);
  unattached_ = std::move(unattached);
  for (auto d = doubtful_.begin(); d != doubtful_.end();)
    d = now - d->second.second > 60'000'000 ? doubtful_.erase(d) : std::next(d);
  if (next) arm_timer(*next);
}

}  // namespace gate
