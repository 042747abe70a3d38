#include "broker/etcd_service.h"

#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include <algorithm>
#include <type_traits>

#include "broker/etcd_service_impl.h"
#include "broker/lock_json.h"
#include "core/log.h"
#include "core/token.h"
#include "gate/version.h"

namespace gate {

using namespace etcd_parts;

namespace {

// A key recalled, or with another broker's entry, this long ago may be lent again.
constexpr Micros kQuietUs = 2'000'000;

}  // namespace

namespace etcd_parts {

Lock to_lock(const Entry& e) {
  Lock l;
  l.lock_id = e.lock_id;
  l.key = e.lock_key;
  l.mode = e.mode;
  l.owner = e.owner;
  l.session = e.session;
  l.acquired_at = e.acquired_at;
  l.lease_expires_at = e.lease_expires_at;
  l.lease_ms = e.lease_ms;
  l.max_hold_ms = e.max_hold_ms;
  l.hold_count = e.hold_count;
  l.fence = e.fence();
  l.who = HolderInfo{e.agent, e.pid, e.command};
  return l;
}

QueuedRequest to_queued(const Entry& e) {
  QueuedRequest r;
  r.req_id = e.fence();  // (unique: the entries one batch makes share a create revision)
  r.key = e.lock_key;
  r.mode = e.mode;
  r.owner = e.owner;
  r.session = e.session;
  r.request_id = e.request_id;
  r.requested_at = e.requested_at;
  r.lease_ms = e.lease_ms;
  r.max_hold_ms = e.max_hold_ms;
  r.who = HolderInfo{e.agent, e.pid, e.command};
  return r;
}

}  // namespace etcd_parts

EtcdService::EtcdService(boost::asio::io_context& ioc, EtcdServiceOptions options)
    : ioc_(ioc), opts_(std::move(options)),
      workers_(std::clamp<std::size_t>(opts_.workers, 1, etcd::kFenceSlots - 1), "etcd"),
      timer_(ioc),
      lent_table_(LockTableOptions{opts_.default_lease_ms, opts_.max_hold_ms, opts_.restore_grace_ms},
                  [this] { return lending_ + "." + random_token().substr(0, 16); }) {
  // A lent lock's id names its lend; its fence is one of its lend's (serve_lent makes
  // sure one is left). Journaled once lent.db is open (start()).
  lent_table_.keep_journal(false);
  lent_table_.set_fence_source([this](const std::string& key) {
    Lent& l = lent_.at(key);
    return l.lend.fence() + l.next++;
  });
}

EtcdService::~EtcdService() { stop(); }

void EtcdService::shutdown() {
  shutting_down_ = true;
  for (auto& [ticket, w] : waiters_) {
    if (w->gone) continue;
    answer(std::move(w->reply), status_answer(503, "unavailable", "broker is shutting down"));
    w->gone = true;  // a job still running finds nobody to answer
  }
  for (auto it = waiters_.begin(); it != waiters_.end();) it = it->second->busy ? std::next(it) : waiters_.erase(it);
  timer_.cancel();
  // The lent keys go back to etcd, their locks with them (a restart within the
  // session's TTL takes them up there): the jobs finish before stop() returns.
  std::vector<std::string> keys;
  for (const auto& [key, l] : lent_) keys.push_back(key);
  for (const std::string& key : keys) adopt(key, "the broker stops", {});
}

void EtcdService::stop() {
  {
    std::lock_guard lock(keeper_mu_);
    keeper_stop_ = true;
  }
  keeper_cv_.notify_all();
  if (keeper_.joinable()) keeper_.join();
  workers_.stop();
  if (mirror_) mirror_->stop();
}


void EtcdService::answer(Reply reply, HttpAnswer a) {
  boost::asio::post(ioc_, [reply = std::move(reply), a = std::move(a)]() mutable { reply(std::move(a)); });
}

std::uint64_t EtcdService::handle(const std::string& method, const std::string& target, const std::string& body,
                                  Reply reply) {
  ++metrics_.requests;
  const auto [path, query] = split_target(target);
  std::uint64_t ticket = 0;
  auto only = [&](const char* m) {
    if (method == m) return true;
    ++metrics_.bad_requests;
    answer(std::move(reply), error_answer(405, std::string(path) + " takes " + m));
    return false;
  };
  if (shutting_down_) {
    answer(std::move(reply), status_answer(503, "unavailable", "broker is shutting down"));
  } else if (path == "/v1/locks/acquire") {
    if (only("POST")) acquire(body, reply, &ticket);
  } else if (path == "/v1/locks/release") {
    if (only("POST")) release(body, reply);
  } else if (path == "/v1/locks/heartbeat") {
    if (only("POST")) heartbeat(body, reply);
  } else if (path == "/v1/locks/status") {
    if (only("GET")) status(std::string(query), reply);
  } else if (path == "/v1/health") {
    health(reply);
  } else if (path == "/metrics") {
    const auto [held, queued] = mirror_->counts();
    std::string text = metrics_exposition(metrics_, held, queued);
    auto add = [&text](const char* name, const char* type, const char* help, const std::string& value) {
      text += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " + value + "\n";
    };
    add("gate_etcd_resyncs_total", "counter", "Whole reads of the lock space after the watch fell behind a compaction.",
        std::to_string(mirror_->resyncs()));
    add("gate_etcd_revision", "gauge", "The etcd revision this broker's mirror has applied.",
        std::to_string(mirror_->revision()));
    add("gate_etcd_txn_batches_total", "counter", "Calls to etcd that carried this broker's decisions (batches).",
        std::to_string(batcher_.batches()));
    add("gate_etcd_txns_total", "counter", "This broker's decisions written to etcd (in the batches).",
        std::to_string(batcher_.transactions()));
    add("gate_etcd_txn_batch_seconds_total", "counter", "Time the batches spent with etcd.",
        std::to_string(static_cast<double>(batcher_.call_micros()) / 1e6));
    add("gate_etcd_lent_keys", "gauge", "Keys lent to this broker now (served without etcd while nobody else asks).",
        std::to_string(lent_.size()));
    add("gate_etcd_lent_locks", "gauge", "Locks held under this broker's lends now.",
        std::to_string(lent_table_.lock_count()));
    add("gate_etcd_adoptions_total", "counter", "Lent keys handed back to etcd (someone else asked, or a wait).",
        std::to_string(adoptions_));
    answer(std::move(reply), {200, std::move(text), "text/plain; version=0.0.4"});
  } else if (path.substr(0, 14) == "/v1/delegation") {
    ++metrics_.bad_requests;
    answer(std::move(reply), error_answer(404, "delegation is off with an etcd store: several brokers share the lock space"));
  } else {
    ++metrics_.bad_requests;
    answer(std::move(reply), error_answer(404, "no such route: " + std::string(path).substr(0, 200)));
  }
  return ticket;
}

void EtcdService::health(Reply& reply) {
  const std::string why = unavailable();
  json::object o{{"status", why.empty() ? "ok" : "unavailable"}, {"version", kVersion}, {"store", "etcd"},
                 {"broker", broker_id()}, {"revision", mirror_->revision()}};
  if (!why.empty()) o["error"] = why;
  answer(std::move(reply), {why.empty() ? 200 : 503, json::serialize(o)});
}

// ---------------------------------------------------------------------------------
// Acquire

void EtcdService::acquire(const std::string& body, Reply& reply, std::uint64_t* ticket) {
  auto obj = parse_body_object(body);
  Result<AcquireParams> parsed = obj.ok() ? parse_acquire(*obj) : Result<AcquireParams>(obj.status());
  if (!parsed.ok()) {
    ++metrics_.bad_requests;
    return answer(std::move(reply), error_answer(400, parsed.message()));
  }
  if (const std::string why = unavailable(); !why.empty())
    return answer(std::move(reply), status_answer(503, "unavailable", why));
  AcquireParams p = std::move(*parsed);
  if (p.session.empty()) p.session = "owner:" + p.owner;  // as LockTable names it
  if (p.owner.starts_with("broker:") || p.session.starts_with("broker:")) {
    ++metrics_.bad_requests;
    return answer(std::move(reply), error_answer(400, "owners and sessions named 'broker:...' are the brokers' own"));
  }
  const Micros now = wall_clock_micros();

  Entry fresh;
  fresh.lock_key = p.key;
  fresh.key = etcd::queue_key(p.key, broker_id() + "-" + random_token().substr(0, 16));
  fresh.mode = p.mode;
  fresh.owner = p.owner;
  fresh.session = p.session;
  fresh.broker = broker_id();
  fresh.request_id = p.request_id;
  fresh.attach = random_token().substr(0, 16);
  fresh.requested_at = now;
  fresh.lease_ms = p.lease_ms && *p.lease_ms > 0 ? *p.lease_ms : opts_.default_lease_ms;
  const std::int64_t cap = opts_.max_hold_ms;
  if (p.max_hold_ms && *p.max_hold_ms > 0) fresh.max_hold_ms = cap > 0 ? std::min(*p.max_hold_ms, cap) : *p.max_hold_ms;
  else if (cap > 0) fresh.max_hold_ms = cap;
  fresh.agent = p.who.agent;
  fresh.pid = p.who.pid;
  fresh.command = p.who.command;

  auto w = std::make_unique<Waiter>();
  w->reply = std::move(reply);
  w->params = p;
  w->since = now;
  if (p.timeout_ms && *p.timeout_ms > 0) w->deadline = now + *p.timeout_ms * 1000;
  w->busy = true;
  w->made_as = fresh.key;
  w->fresh = std::move(fresh);
  const std::uint64_t t = ++next_ticket_;
  *ticket = t;
  if (w->deadline) arm_timer(*w->deadline);
  waiters_[t] = std::move(w);
  begin_acquire(t);
}

void EtcdService::begin_acquire(std::uint64_t t) {
  auto it = waiters_.find(t);
  if (it == waiters_.end()) return;
  Waiter& w = *it->second;
  if (w.gone) {
    ++metrics_.disconnects_while_queued;
    waiters_.erase(it);
    return;
  }
  w.busy = true;
  const std::string& key = w.params.key;
  if (auto l = lent_.find(key); l != lent_.end()) {
    std::string why = "being handed back";
    if (!l->second.adopting && serve_lent(t, &why)) return;
    // It would wait (or the lend cannot serve it): the key goes back to etcd first,
    // and then the acquires that waited for that go etcd's way in their order.
    l->second.acquires.push_back(t);
    return adopt(key, why.c_str(), {});
  }
  if (auto d = draining_.find(key); d != draining_.end()) return d->second.push_back(t);  // (its turn comes)
  bool may_lend = opts_.lend && !w.entry && lends_trusted();
  if (auto r = recalled_.find(key); may_lend && r != recalled_.end()) {
    // Recalled a moment ago: someone else uses it; lent again once it is quiet.
    if (wall_clock_micros() - r->second < kQuietUs) may_lend = false;
    else recalled_.erase(r);
  }
  // Another broker's entry there a moment ago (its lock, its wait, or its lend): the
  // key is shared, and a lend would only be recalled.
  if (may_lend && mirror_->other_broker_within(key, broker_id(), std::chrono::microseconds(kQuietUs))) may_lend = false;
  run_job([this, t, p = w.params, fresh = w.fresh, may_lend](EtcdClient& c, std::int64_t slot) {
    Outcome o = acquire_job(c, slot, p, fresh, wall_clock_micros(), may_lend);
    boost::asio::post(ioc_, [this, t, o = std::move(o)]() mutable { acquired(t, std::move(o)); });
  });
}

void EtcdService::begin_acquires_in_order(const std::string& key, const std::vector<std::uint64_t>& tickets) {
  struct Start {
    std::uint64_t ticket;
    AcquireParams params;
    Entry fresh;
  };
  std::vector<Start> starts;
  for (std::uint64_t t : tickets) {
    auto it = waiters_.find(t);
    if (it == waiters_.end()) continue;
    if (it->second->gone) {
      ++metrics_.disconnects_while_queued;
      waiters_.erase(it);
      continue;
    }
    starts.push_back({t, it->second->params, it->second->fresh});
  }
  if (starts.empty()) return;
  // One job: each request's entry is in etcd before the next one's is made; the key's
  // acquires that come meanwhile wait their turn (draining_), and go next, in order.
  draining_[key];
  run_job([this, key, starts = std::move(starts)](EtcdClient& c, std::int64_t slot) {
    for (const Start& s : starts) {
      Outcome o = acquire_job(c, slot, s.params, s.fresh, wall_clock_micros(), false);
      boost::asio::post(ioc_, [this, t = s.ticket, o = std::move(o)]() mutable { acquired(t, std::move(o)); });
    }
    boost::asio::post(ioc_, [this, key] {
      auto d = draining_.find(key);
      if (d == draining_.end()) return;
      const std::vector<std::uint64_t> next = std::move(d->second);
      draining_.erase(d);
      if (!next.empty()) begin_acquires_in_order(key, next);
    });
  });
}

void EtcdService::record_grant(Micros since, bool waited) {
  ++metrics_.grants;
  if (waited) ++metrics_.grants_after_wait;
  metrics_.record_wait(waited ? wall_clock_micros() - since : 0);
}

void EtcdService::acquired(std::uint64_t ticket, Outcome o) {
  using K = Outcome::Kind;
  auto it = waiters_.find(ticket);
  if (it == waiters_.end()) {
    if (o.kind == K::Granted) give_back(o.entry);
    return;
  }
  Waiter& w = *it->second;
  const bool had_entry = w.entry.has_value();
  w.busy = false;
  auto finish = [&](HttpAnswer a) {
    if (!w.gone) answer(std::move(w.reply), std::move(a));
    waiters_.erase(it);
  };
  switch (o.kind) {
    case K::Granted:
      if (w.gone) {
        give_back(o.entry);
        ++metrics_.disconnects_while_queued;
        return finish({});
      }
      record_grant(w.since, had_entry);
      if (had_entry)
        log(LogLevel::Info, "broker", "granted ", to_string(o.entry.mode), " '", o.entry.lock_key, "' to ",
            o.entry.owner, " after waiting ", (wall_clock_micros() - w.since) / 1000, " ms (fence ",
            o.entry.fence(), ")");
      return finish(granted_answer(to_lock(o.entry), o.version));
    case K::Queued: {
      w.entry = o.entry;
      w.recheck = o.lend_seen;
      const Micros now = wall_clock_micros();
      if (shutting_down_) return finish({});  // its entry stays for a restart
      if (w.gone || (w.deadline && *w.deadline <= now)) {
        cancel_entry(*w.entry);
        if (w.gone) ++metrics_.disconnects_while_queued;
        else ++metrics_.timeouts;
        return finish(status_answer(408, "timeout"));
      }
      if (!had_entry)
        log(LogLevel::Debug, "broker", "queued ", to_string(o.entry.mode), " '", o.entry.lock_key, "' for ",
            o.entry.owner, " as ", o.entry.key);
      schedule_evaluate();  // what the mirror showed meanwhile is looked at again
      return;
    }
    case K::NotYet:
      if (w.gone || (w.deadline && *w.deadline <= wall_clock_micros())) {
        cancel_entry(*w.entry);
        if (w.gone) ++metrics_.disconnects_while_queued;
        else ++metrics_.timeouts;
        return finish(status_answer(408, "timeout"));
      }
      schedule_evaluate();  // what the mirror showed meanwhile is looked at again
      return;
    case K::Lent:
      register_lend(o.entry, o.version);
      return begin_acquire(ticket);
    case K::Timeout:
      ++metrics_.timeouts;
      return finish(status_answer(408, "timeout"));
    case K::Deadlock:
      ++metrics_.deadlocks;
      log(LogLevel::Info, "broker", "deadlock refused: ", o.error);
      return finish(status_answer(409, "deadlock", o.error));
    case K::Vanished:
      return finish(status_answer(503, "unavailable",
                                  "the request's place in the queue is gone (this broker's etcd session ended)"));
    case K::Superseded:
      return finish(status_answer(408, "timeout", "superseded by a request with the same request_id"));
    case K::Unavailable:
      if (had_entry && !w.gone) {
        // Its place stays; the grant is tried again shortly.
        log(LogLevel::Warn, "broker", "could not grant ", w.entry->key, ": ", o.error);
        arm_timer(wall_clock_micros() + kRetryUs);
        return;
      }
      if (had_entry) cancel_entry(*w.entry);
      // The entry its write made may yet show up (applied, its answer lost, and etcd
      // could not say): removed if it does, unless changed since (taken up).
      else if (!o.entry.key.empty()) doubtful_[o.entry.key] = {o.entry.op, wall_clock_micros()};
      return finish(status_answer(503, "unavailable", o.error));
  }
}

void EtcdService::schedule_evaluate() {
  if (!change_posted_.exchange(true)) boost::asio::post(ioc_, [this] { evaluate(); });
}

void EtcdService::cancel_entry(const Entry& e) {
  run_job([this, e](EtcdClient& c) {
    Result<etcd::TxnResult> r = txn(c, e.lock_key, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)},
                                    {etcd::txn_delete(e.key)}, {etcd::txn_range(e.key)}, Retry::Idempotent);
    if (r.ok() && !r->succeeded) {
      // Granted meanwhile by a release's hand-off: nobody will hear of that grant, so
      // it is given back (a re-attachment by a later request is left alone).
      Queue now = queue_from(*r, 0);
      if (!now.empty() && now.front().held && now.front().attach == e.attach) {
        const Entry& g = now.front();
        r = txn(c, g.lock_key, {etcd::compare(g.key, "MOD", "EQUAL", g.mod_revision)}, {etcd::txn_delete(g.key)}, {}, Retry::Idempotent);
      }
    }
    if (!r.ok())
      log(LogLevel::Warn, "broker", "could not remove the request ", e.key, " (removed later, or with this broker's session): ",
          r.message());
  });
}

void EtcdService::give_back(const Entry& held) {
  run_job([this, id = held.lock_id, owner = held.owner](EtcdClient& c) {
    Result<std::optional<Entry>> e = find_lock(c, id);
    if (!e.ok() || !*e) return;
    Entry left;
    json::array success = release_writes(**e, &left);
    Result<etcd::TxnResult> r =
        txn(c, left.lock_key, {etcd::compare(left.key, "MOD", "EQUAL", (*e)->mod_revision)}, success, {}, Retry::Once);
    log(LogLevel::Debug, "broker", "client of ", id, " went away before its grant was sent; ",
        r.ok() && r->succeeded ? "given back" : "it ends with its lease");
  });
}

// ---------------------------------------------------------------------------------
// Release, heartbeat, status

namespace {

// A release's or heartbeat's result: the answer, and what to count.
struct OpResult {
  HttpAnswer answer;
  bool ok = false;
};

}  // namespace

void EtcdService::release(const std::string& body, Reply& reply) {
  Result<ReleaseParams> p = parse_release(body);
  if (!p.ok()) {
    ++metrics_.bad_requests;
    return answer(std::move(reply), error_answer(400, p.message()));
  }
  if (const std::string why = unavailable(); !why.empty())
    return answer(std::move(reply), status_answer(503, "unavailable", why));
  release_lock(std::move(*p), std::move(reply));
}

void EtcdService::release_lock(ReleaseParams p, Reply reply) {
  if (const Lock* l = lent_table_.find_lock(p.lock_id)) {
    auto it = lent_.find(l->key);
    if (it == lent_.end() || !it->second.adopting) return release_lent(p, std::move(reply));
    it->second.after.push_back([this, p, reply = std::move(reply)](const std::string& error) mutable {
      if (error.empty()) release_lock(std::move(p), std::move(reply));
      else answer(std::move(reply), status_answer(503, "unavailable", error));
    });
    return;
  }
  const auto& [lock_id, owner, changed, stale] = p;
  run_job([this, lock_id, owner, changed, stale, reply = std::move(reply)](EtcdClient& c) mutable {
    OpResult out{status_answer(503, "unavailable", "the lock kept changing; try again")};
    Result<std::optional<Entry>> found = find_lock(c, lock_id);
    std::optional<Entry> e = found.ok() ? *found : std::nullopt;
    if (!found.ok()) out.answer = status_answer(503, "unavailable", "etcd: " + found.message());
    for (int attempt = 0; found.ok() && attempt < kAttempts; ++attempt) {
      if (!e || e->ends_at() <= wall_clock_micros()) {
        out.answer = error_answer(404, BrokerService::refusal_text(OpStatus::NotFound, lock_id));
        break;
      }
      if (e->owner != owner) {
        out.answer = error_answer(403, BrokerService::refusal_text(OpStatus::Forbidden, lock_id));
        break;
      }
      json::array success, compares{etcd::compare(e->key, "MOD", "EQUAL", e->mod_revision)};
      if (changed && e->mode == LockMode::Write)
        success.push_back(etcd::txn_put(etcd::version_key(e->lock_key), std::to_string(e->fence())));
      Entry left;
      for (auto& w : release_writes(*e, &left)) success.push_back(std::move(w));
      if (left.hold_count == 0) {
        // The first try also grants the next in line (a failed compare: the plain
        // release again, and their brokers grant them).
        if (attempt == 0)
          for (auto& w : hand_off(mirror_->queue(e->lock_key), *e, wall_clock_micros(), &compares))
            success.push_back(std::move(w));
      }
      // Not sent twice: a second application would count one release twice.
      Result<etcd::TxnResult> r = txn(c, e->lock_key, compares, success, {etcd::txn_range(e->key)}, Retry::Once);
      if (!r.ok()) {
        // No answer in time: read back whether it was applied (the count's mark, or
        // the entry gone).
        bool done = false;
        if (left.hold_count > 0) {
          done = applied(c, left.key, left.op).has_value();
        } else if (Result<etcd::RangeResult> now = c.range(etcd::range_request(e->key)); now.ok()) {
          done = now->kvs.empty();
        }
        if (done) {
          out = {status_answer(200, "released"), true};
          forget(lock_id);
        } else {
          out.answer = status_answer(503, "unavailable", "etcd: " + r.message());
        }
        break;
      }
      if (r->succeeded) {
        out = {status_answer(200, "released"), true};
        if (left.hold_count > 0) {
          left.mod_revision = r->revision;
          remember(left);
        } else {
          forget(lock_id);
        }
        break;
      }
      Queue now = queue_from(*r, 0);  // its key only: the entry as it is now
      e = now.empty() || !now.front().held ? std::nullopt : std::optional<Entry>(now.front());
    }
    boost::asio::post(ioc_, [this, out = std::move(out), stale, reply = std::move(reply)]() mutable {
      if (out.ok) metrics_.count_release(stale);
      reply(std::move(out.answer));
    });
  });
}

void EtcdService::heartbeat(const std::string& body, Reply& reply) {
  Result<HeartbeatParams> p = parse_heartbeat(body);
  if (!p.ok()) {
    ++metrics_.bad_requests;
    return answer(std::move(reply), error_answer(400, p.message()));
  }
  if (const std::string why = unavailable(); !why.empty())
    return answer(std::move(reply), status_answer(503, "unavailable", why));
  heartbeat_lock(std::move(*p), std::move(reply));
}

void EtcdService::heartbeat_lock(HeartbeatParams p, Reply reply) {
  if (const Lock* l = lent_table_.find_lock(p.lock_id)) {
    const std::string key = l->key;
    auto it = lent_.find(key);
    if (it != lent_.end() && (it->second.adopting || !lends_trusted())) {
      // (In doubt about its session, this broker renews no lent lock: etcd does.)
      return adopt(key, "a heartbeat while this broker's session is in doubt",
                   [this, p, reply = std::move(reply)](const std::string& error) mutable {
        if (error.empty()) heartbeat_lock(std::move(p), std::move(reply));
        else answer(std::move(reply), status_answer(503, "unavailable", error));
      });
    }
    Lock out;
    const OpStatus st = lent_table_.heartbeat(p.lock_id, p.owner, p.lease_ms, wall_clock_micros(), &out);
    lent_changed(key);
    if (st != OpStatus::Ok)
      return answer(std::move(reply),
                    error_answer(st == OpStatus::NotFound ? 404 : 403, BrokerService::refusal_text(st, p.lock_id)));
    ++metrics_.heartbeats;
    json::object o{{"status", "ok"}, {"lock", lock_to_json(out, lent_table_.version_of(key))}};
    return answer(std::move(reply), {200, json::serialize(o)});
  }
  const auto& [lock_id, owner, lease_ms] = p;
  run_job([this, lock_id, owner, lease_ms, reply = std::move(reply)](EtcdClient& c) mutable {
    OpResult out{status_answer(503, "unavailable", "the lock kept changing; try again")};
    Result<std::optional<Entry>> found = find_lock(c, lock_id);
    std::optional<Entry> e = found.ok() ? *found : std::nullopt;
    if (!found.ok()) out.answer = status_answer(503, "unavailable", "etcd: " + found.message());
    for (int attempt = 0; found.ok() && attempt < kAttempts; ++attempt) {
      const Micros now = wall_clock_micros();
      if (!e || e->ends_at() <= now) {
        out.answer = error_answer(404, BrokerService::refusal_text(OpStatus::NotFound, lock_id));
        break;
      }
      if (e->owner != owner) {
        out.answer = error_answer(403, BrokerService::refusal_text(OpStatus::Forbidden, lock_id));
        break;
      }
      Entry renewed = *e;
      if (lease_ms && *lease_ms > 0) renewed.lease_ms = *lease_ms;
      renewed.lease_expires_at = now + renewed.lease_ms * 1000;
      Result<etcd::TxnResult> r =
          txn(c, e->lock_key, {etcd::compare(e->key, "MOD", "EQUAL", e->mod_revision)},
                {etcd::txn_put(renewed.key, etcd::encode_entry(renewed), renewed.etcd_lease),
                 etcd::txn_range(etcd::version_key(renewed.lock_key))},
                {etcd::txn_range(e->key)}, Retry::Idempotent);
      if (!r.ok()) {
        out.answer = status_answer(503, "unavailable", "etcd: " + r.message());
        break;
      }
      if (r->succeeded) {
        renewed.mod_revision = r->revision;
        remember(renewed);
        json::object o{{"status", "ok"}, {"lock", lock_to_json(to_lock(renewed), version_from(*r, 1))}};
        out = {{200, json::serialize(o)}, true};
        break;
      }
      Queue now_q = queue_from(*r, 0);
      e = now_q.empty() || !now_q.front().held ? std::nullopt : std::optional<Entry>(now_q.front());
    }
    boost::asio::post(ioc_, [this, out = std::move(out), reply = std::move(reply)]() mutable {
      if (out.ok) ++metrics_.heartbeats;
      reply(std::move(out.answer));
    });
  });
}

void EtcdService::status(const std::string& query, Reply& reply) {
  const std::string key = query_param(query, "path");
  // Other brokers' lends: the locks under them only their brokers know, so they are
  // asked to hand their keys back first (docs/etcd-store.md).
  std::vector<Entry> lends;
  const std::string me = broker_id();
  auto foreign_lends = [&](const Queue& q) {
    for (const Entry& e : q)
      if (e.lend && e.broker != me) lends.push_back(e);
  };
  if (key.empty()) {
    for (const auto& [lock_key, q] : mirror_->snapshot()) foreign_lends(q);
  } else {
    foreign_lends(mirror_->queue(key));
  }
  if (lends.empty()) return answer(std::move(reply), status_now(key));
  run_job([this, key, lends = std::move(lends), reply = std::move(reply)](EtcdClient& c) mutable {
    if (Status s = recall(c, lends, kStatusRecall); !s.ok())
      log(LogLevel::Warn, "broker", "status shows other brokers' lends as they are: ", s.message());
    boost::asio::post(ioc_, [this, key, reply = std::move(reply)]() mutable { answer(std::move(reply), status_now(key)); });
  });
}

HttpAnswer EtcdService::status_now(const std::string& key) {
  const Micros now = wall_clock_micros();
  json::array locks, queue;
  std::map<std::string, std::uint64_t> all_versions = mirror_->versions();
  etcd::Space space = mirror_->snapshot();
  // The keys lent here: their locks from the lent table, in their lends' place.
  for (const auto& [lock_key, l] : lent_) {
    std::uint64_t& v = all_versions[lock_key];
    v = std::max(v, lent_table_.version_of(lock_key));
  }
  for (const Lock& l : lent_table_.locks())
    if (key.empty() || l.key == key) locks.push_back(lock_to_json(l, all_versions[l.key]));
  for (const auto& [lock_key, q] : space) {
    if (!key.empty() && lock_key != key) continue;
    const auto v = all_versions.find(lock_key);
    for (const Entry& e : q) {
      if (e.lend && lent_.count(lock_key) && lent_.at(lock_key).lend.key == e.key) continue;
      if (!e.held) queue.push_back(queued_to_json(to_queued(e)));
      else if (e.ends_at() > now) locks.push_back(lock_to_json(to_lock(e), v == all_versions.end() ? 0 : v->second));
    }
  }
  json::object versions;
  if (!key.empty()) {
    const auto v = all_versions.find(key);
    versions[key] = v == all_versions.end() ? 0 : v->second;
  } else {
    for (const auto& [k, v] : all_versions) versions[k] = v;
  }
  json::object o{{"locks", std::move(locks)}, {"queue", std::move(queue)}, {"versions", std::move(versions)}};
  return {200, json::serialize(o)};
}

}  // namespace gate
