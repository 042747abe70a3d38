#include "broker/broker_service.h"

#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include <algorithm>
#include <sstream>

#include "broker/lock_json.h"
#include "core/log.h"
#include "gate/version.h"

namespace gate {

namespace json = boost::json;

HttpAnswer json_answer(int status, const std::string& body) { return {status, body}; }

HttpAnswer error_answer(int status, const std::string& message) {
  json::object o;
  o["error"] = message;
  return {status, json::serialize(o)};
}

namespace {

// 403 or 404 for a release or heartbeat the table refused.
HttpAnswer refusal(OpStatus status, const std::string& lock_id) {
  return error_answer(status == OpStatus::Forbidden ? 403 : 404, BrokerService::refusal_text(status, lock_id));
}


std::string url_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out.push_back(' ');
    } else if (s[i] == '%') {
      auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
      };
      int hi = i + 1 < s.size() ? hex(s[i + 1]) : -1;
      int lo = i + 2 < s.size() ? hex(s[i + 2]) : -1;
      if (hi < 0 || lo < 0) {
        out.push_back(s[i]);
        continue;
      }
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

}  // namespace

Target split_target(std::string_view target) {
  const auto q = target.find('?');
  if (q == std::string_view::npos) return {target, {}};
  return {target.substr(0, q), target.substr(q + 1)};
}

std::string query_param(std::string_view query, std::string_view name) {
  while (!query.empty()) {
    auto amp = query.find('&');
    std::string_view part = query.substr(0, amp);
    auto eq = part.find('=');
    if (part.substr(0, eq) == name) return eq == std::string_view::npos ? "" : url_decode(part.substr(eq + 1));
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return "";
}

BrokerService::BrokerService(boost::asio::io_context& ioc, LockTable& table, LockStore* store,
                             Clock clock, bool own_timer)
    : ioc_(ioc), table_(table), store_(store), clock_(std::move(clock)), timer_(ioc),
      own_timer_(own_timer), status_timer_(ioc) {
  arm_timer();
}

std::uint64_t BrokerService::handle(const std::string& method, const std::string& target,
                                    const std::string& body, Reply reply) {
  ++metrics_.requests;
  const auto [path, query] = split_target(target);
  std::uint64_t ticket = 0;
  auto only = [&](const char* m) {
    if (method == m) return true;
    bad_request(reply, 405, std::string(path) + " takes " + m);
    return false;
  };
  if (shutting_down_) {
    answer(std::move(reply), status_answer(503, "unavailable", "broker is shutting down"));
  } else if (path == "/v1/locks/acquire") {
    if (only("POST")) {
      if (delegation_) park(body, reply, &ticket);
      else acquire(body, reply, &ticket);
    }
  } else if (path == "/v1/locks/release") {
    if (only("POST")) release(body, reply);
  } else if (path == "/v1/locks/heartbeat") {
    if (only("POST")) heartbeat(body, reply);
  } else if (path == "/v1/locks/status") {
    if (only("GET")) status(std::string(query), reply);
  } else if (path == "/v1/delegation") {
    if (only("POST")) delegate(body, reply);
  } else if (path == "/v1/delegation/recall") {
    if (only("GET")) recall_wait(std::string(query), reply, &ticket);
  } else if (path == "/v1/delegation/report") {
    if (only("POST")) delegation_report(body, reply);
  } else if (path == "/v1/delegation/return") {
    if (only("POST")) delegation_return(body, reply);
  } else if (path == "/v1/health") {
    json::object o;
    o["status"] = "ok";
    o["version"] = kVersion;
    answer(std::move(reply), {200, json::serialize(o)});
  } else if (path == "/metrics") {
    answer_fresh(reply, [this] { return HttpAnswer{200, metrics_text(), "text/plain; version=0.0.4"}; });
  } else {
    bad_request(reply, 404, "no such route: " + std::string(path).substr(0, 200));
  }
  after_change();
  return ticket;
}

void BrokerService::acquire(const std::string& body, Reply& reply, std::uint64_t* ticket) {
  unsigned char scratch[4096];
  json::monotonic_resource mr(scratch, sizeof scratch);
  auto obj = parse_body_object(body, &mr);
  Result<AcquireParams> p = obj.ok() ? parse_acquire(*obj) : Result<AcquireParams>(obj.status());
  if (!p.ok()) {
    log(LogLevel::Info, "broker", "bad acquire request: ", p.message());
    return bad_request(reply, 400, p.message());
  }
  const Micros now = clock_();
  AcquireResult r = acquire_checked(*p, now);
  switch (r.kind) {
    case AcquireResult::Kind::Granted:
      answer(std::move(reply), granted_answer(r.lock, table_.version_of(r.lock.key)), undo_grant(r.lock));
      return;
    case AcquireResult::Kind::Timeout:
      answer(std::move(reply), status_answer(408, "timeout"));
      return;
    case AcquireResult::Kind::Deadlock:
      answer(std::move(reply), status_answer(409, "deadlock", r.error));
      return;
    case AcquireResult::Kind::Queued:
      if (r.replaced_req_id) {
        auto old = waiters_.find(r.replaced_req_id);
        if (old != waiters_.end()) {
          answer(std::move(old->second.reply),
                 status_answer(408, "timeout", "superseded by a request with the same request_id"));
          waiters_.erase(old);
        }
      }
      waiters_[r.req_id] = Waiter{std::move(reply), now};
      *ticket = r.req_id;
      log(LogLevel::Debug, "broker", "queued ", to_string(p->mode), " '", p->key, "' for ",
          p->owner, " as request ", r.req_id);
      return;
  }
}

std::string BrokerService::refusal_text(OpStatus status, const std::string& lock_id) {
  if (status == OpStatus::Forbidden) return "lock " + lock_id + " belongs to another owner";
  return "no lock " + lock_id.substr(0, 200) + " (released, expired or capped)";
}

AcquireResult BrokerService::acquire_checked(const AcquireParams& p, Micros now) {
  note_client(p, now);
  AcquireResult r = table_.acquire(p, now);
  switch (r.kind) {
    case AcquireResult::Kind::Granted:
      ++metrics_.grants;
      record_wait(0);
      break;
    case AcquireResult::Kind::Timeout:
      ++metrics_.timeouts;
      break;
    case AcquireResult::Kind::Deadlock:
      ++metrics_.deadlocks;
      log(LogLevel::Info, "broker", "deadlock refused: ", r.error);
      break;
    case AcquireResult::Kind::Queued:
      break;
  }
  return r;
}

std::optional<AcquireResult> BrokerService::try_acquire(const AcquireParams& p) {
  if (!typed_calls_here() || p.timeout_ms != 0) return std::nullopt;
  ++metrics_.requests;
  AcquireResult r = acquire_checked(p, clock_());
  settled_change();
  return r;
}

std::optional<OpStatus> BrokerService::release_now(const std::string& lock_id, const std::string& owner,
                                                   bool changed, std::string_view stale) {
  if (!typed_calls_here()) return std::nullopt;
  ++metrics_.requests;
  const OpStatus status = release_checked(lock_id, owner, changed, stale);
  settled_change();
  return status;
}

void BrokerService::bad_request(Reply& reply, int status, const std::string& message) {
  ++metrics_.bad_requests;
  answer(std::move(reply), error_answer(status, message));
}

void BrokerService::release(const std::string& body, Reply& reply) {
  Result<ReleaseParams> p = parse_release(body);
  if (!p.ok()) return bad_request(reply, 400, p.message());
  // Forbidden or NotFound: the same refusal as for a heartbeat.
  if (OpStatus status = release_checked(p->lock_id, p->owner, p->changed, p->stale); status != OpStatus::Ok)
    return answer(std::move(reply), refusal(status, p->lock_id));
  answer(std::move(reply), status_answer(200, "released"));
}

OpStatus BrokerService::release_checked(const std::string& lock_id, const std::string& owner,
                                        bool changed, std::string_view stale) {
  const OpStatus status = table_.release(lock_id, owner, clock_(), changed);
  if (status == OpStatus::Ok) metrics_.count_release(stale);
  return status;
}

void BrokerService::heartbeat(const std::string& body, Reply& reply) {
  Result<HeartbeatParams> p = parse_heartbeat(body);
  if (!p.ok()) return bad_request(reply, 400, p.message());
  const std::string& lock_id = p->lock_id;
  Lock lock;
  if (OpStatus status = table_.heartbeat(lock_id, p->owner, p->lease_ms, clock_(), &lock); status != OpStatus::Ok)
    return answer(std::move(reply), refusal(status, lock_id));
  ++metrics_.heartbeats;
  json::object o;
  o["status"] = "ok";
  o["lock"] = lock_to_json(lock, table_.version_of(lock.key));
  answer(std::move(reply), {200, json::serialize(o)});
}

void BrokerService::status(const std::string& query, Reply& reply) {
  const std::string key = query_param(query, "path");
  answer_fresh(reply, [this, key] { return status_now(key); });
}

void BrokerService::answer_fresh(Reply& reply, std::function<HttpAnswer()> make) {
  // While the space is lent out, the delegate is asked for its state first (briefly),
  // and a report asked for after this request came in answers it.
  if (!ask_for_report()) return answer(std::move(reply), make());
  status_waiters_.push_back({report_pending_ ? report_asked_ + 1 : report_asked_, std::move(make), std::move(reply)});
  if (!report_pending_) send_report_ask();
}

HttpAnswer BrokerService::status_now(const std::string& key) {
  table_.expire(clock_());
  json::array locks, queue;
  for (const auto& l : table_.locks(key)) locks.push_back(lock_to_json(l, table_.version_of(l.key)));
  for (const auto& q : table_.queue(key)) queue.push_back(queued_to_json(q));
  json::object versions;
  if (!key.empty()) {
    versions[key] = table_.version_of(key);
  } else {
    for (const auto& [k, v] : table_.versions()) versions[k] = v;
  }
  json::object o;
  add_delegated_status(key, locks, queue, o);
  o["locks"] = std::move(locks);
  o["queue"] = std::move(queue);
  o["versions"] = std::move(versions);
  return {200, json::serialize(o)};
}

void BrokerService::client_gone(std::uint64_t ticket) {
  if (ticket & (kParkedTicket | kRecallTicket)) {
    // A parked acquire that has run since waits under its request number now.
    auto alias = parked_alias_.find(ticket);
    if (alias == parked_alias_.end()) {
      client_gone_delegation(ticket);
      return;
    }
    ticket = alias->second;
    parked_alias_.erase(alias);
  }
  auto it = waiters_.find(ticket);
  if (it == waiters_.end()) {
    // Granted in this turn, its answer not sent yet: nobody will hear of the grant,
    // so it is given back (else the lock stays held until its lease ends, and a
    // re-entrant hold of a live owner never).
    auto p = std::find_if(pending_.begin(), pending_.end(),
                          [ticket](const Pending& q) { return q.ticket == ticket; });
    if (p == pending_.end()) return;
    if (p->undo) p->undo();
    pending_.erase(p);
    ++metrics_.disconnects_while_queued;
    log(LogLevel::Debug, "broker", "client of request ", ticket,
        " went away before its grant was sent; given back");
    after_change();
    return;
  }
  waiters_.erase(it);
  ++metrics_.disconnects_while_queued;
  log(LogLevel::Debug, "broker", "client of request ", ticket, " went away; leaving the queue");
  table_.cancel(ticket, clock_());
  after_change();
}

void BrokerService::answer(Reply reply, HttpAnswer a, std::function<void()> undo,
                           std::uint64_t ticket) {
  pending_.push_back({std::move(reply), std::move(a), std::move(undo), ticket});
}

std::function<void()> BrokerService::undo_grant(const Lock& l) {
  return [this, id = l.lock_id, owner = l.owner] { table_.release(id, owner, clock_()); };
}

void BrokerService::record_wait(Micros waited) { metrics_.record_wait(waited); }

void BrokerMetrics::count_release(std::string_view stale) {
  ++releases;
  if (stale == "merged") ++stale_merged;
  else if (stale == "conflict") ++stale_conflicts;
  else if (stale == "refused") ++stale_refused;
}

void BrokerMetrics::record_wait(Micros waited) {
  const double secs = static_cast<double>(waited) / 1e6;
  ++wait_count;
  wait_sum += secs;
  for (std::size_t i = 0; i < kWaitBuckets.size(); ++i)
    if (secs <= kWaitBuckets[i]) ++wait_counts[i];
}

void BrokerService::process_events() {
  for (auto& e : table_.take_events()) {
    switch (e.kind) {
      case Event::Kind::Granted: {
        auto it = waiters_.find(e.req_id);
        if (it == waiters_.end()) break;  // a restored request nobody re-attached yet
        ++metrics_.grants;
        ++metrics_.grants_after_wait;
        const Micros waited = clock_() - it->second.since;
        record_wait(waited);
        log(LogLevel::Info, "broker", "granted ", to_string(e.lock.mode), " '", e.lock.key,
            "' to ", e.lock.owner, " after waiting ", waited / 1000, " ms (fence ",
            e.lock.fence, ")");
        answer(std::move(it->second.reply), granted_answer(e.lock, table_.version_of(e.lock.key)),
               undo_grant(e.lock), e.req_id);
        waiters_.erase(it);
        break;
      }
      case Event::Kind::TimedOut: {
        auto it = waiters_.find(e.req_id);
        if (it == waiters_.end()) break;
        ++metrics_.timeouts;
        answer(std::move(it->second.reply), status_answer(408, "timeout"), nullptr, e.req_id);
        waiters_.erase(it);
        break;
      }
      case Event::Kind::Dropped:
        if (e.reason == "hold cap reached") ++metrics_.cap_expiries;
        else ++metrics_.lease_expiries;
        log(LogLevel::Info, "broker", "dropped ", to_string(e.lock.mode), " lock on '",
            e.lock.key, "' of ", e.lock.owner, ": ", e.reason);
        break;
    }
  }
}

void BrokerService::after_change() {
  process_events();
  arm_timer();
  if (flush_scheduled_) return;
  flush_scheduled_ = true;
  boost::asio::post(ioc_, [this] {
    if (flush_scheduled_) flush();  // (a typed call's may have run it already)
  });
}

void BrokerService::settled_change() {
  // No store to wait for: what after_change() leaves for a later turn of the event
  // loop (a post per call) is done now.
  process_events();
  arm_timer();
  flush();
}

void BrokerService::flush() {
  flush_scheduled_ = false;
  auto journal = table_.take_journal();
  if (!unsaved_.empty()) {
    unsaved_.insert(unsaved_.end(), std::make_move_iterator(journal.begin()),
                    std::make_move_iterator(journal.end()));
    journal = std::exchange(unsaved_, {});
  }
  bool saved = true;
  std::string failure;
  if (store_ && !journal.empty()) {
    if (Status s = store_->apply(journal); !s.ok()) {
      saved = false;
      failure = s.message();
      ++metrics_.store_failures;
      unsaved_ = std::move(journal);  // retried with the next batch
      log(LogLevel::Error, "broker", failure, "; answering 503 until it works again");
    }
  }
  auto pending = std::exchange(pending_, {});
  bool undone = false;
  for (auto& p : pending) {
    if (!saved && p.answer.status < 300) {
      if (p.undo) {
        p.undo();
        undone = true;
      }
      p.answer = status_answer(503, "unavailable", "lock state could not be saved: " + failure);
    }
    p.reply(std::move(p.answer));
  }
  // Undone grants may let waiters in: handle that like any other change.
  if (undone) after_change();
}

void BrokerService::expire_now() {
  table_.expire(clock_());
  after_change();
}

void BrokerService::arm_timer() {
  if (!own_timer_) return;
  auto next = table_.next_deadline();
  if (delegation_ && (!next || delegation_->expires_at < *next)) next = delegation_->expires_at;
  if (next == timer_at_) return;
  timer_at_ = next;
  if (!next) {
    timer_.cancel();
    return;
  }
  const Micros delay = std::max<Micros>(0, *next - clock_()) + 1;
  timer_.expires_after(std::chrono::microseconds(delay));
  timer_.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    timer_at_.reset();
    const Micros now = clock_();
    table_.expire(now);
    if (delegation_ && now >= delegation_->expires_at) {
      ++metrics_.delegations_expired;
      end_delegation(delegation_->view_asked && !delegation_->heard
                         ? kViewGoneWhy
                         : "its delegate stopped reporting (lease of " + std::to_string(delegation_->lease_ms) +
                               " ms over); its locks are gone");
    }
    after_change();
  });
}

void BrokerService::shutdown() {
  shutting_down_ = true;
  for (auto& [id, w] : waiters_)
    answer(std::move(w.reply), status_answer(503, "unavailable", "broker is shutting down"));
  waiters_.clear();
  for (auto& p : parked_)
    answer(std::move(p.reply), status_answer(503, "unavailable", "broker is shutting down"));
  parked_.clear();
  answer_status_waiters();
  status_timer_.cancel();
  if (delegation_ && delegation_->recall_waiter) {
    answer(std::move(*delegation_->recall_waiter), status_answer(503, "unavailable", "broker is shutting down"));
    delegation_->recall_waiter.reset();
  }
  timer_.cancel();
  flush();
}

void BrokerMetrics::add_activity(const BrokerMetrics& o) {
  grants += o.grants;
  grants_after_wait += o.grants_after_wait;
  timeouts += o.timeouts;
  deadlocks += o.deadlocks;
  lease_expiries += o.lease_expiries;
  cap_expiries += o.cap_expiries;
  releases += o.releases;
  heartbeats += o.heartbeats;
  stale_merged += o.stale_merged;
  stale_conflicts += o.stale_conflicts;
  stale_refused += o.stale_refused;
  for (std::size_t i = 0; i < wait_counts.size(); ++i) wait_counts[i] += o.wait_counts[i];
  wait_count += o.wait_count;
  wait_sum += o.wait_sum;
}

std::string BrokerService::metrics_text() const {
  // What delegates did counts as if done here.
  BrokerMetrics m = metrics_;
  m.add_activity(delegated_activity_);
  if (delegation_) m.add_activity(delegation_->activity);
  const std::size_t lent_locks = delegation_ ? delegation_->reported.locks.size() : 0;
  const std::size_t lent_queue = delegation_ ? delegation_->reported.queue.size() : 0;
  return metrics_exposition(m, table_.lock_count() + lent_locks, table_.queue_length() + lent_queue,
                            delegation_.has_value());
}

std::string metrics_exposition(const BrokerMetrics& m, std::size_t held, std::size_t queued, bool delegated) {
  std::ostringstream o;
  auto counter = [&](const char* name, const char* help, std::uint64_t v) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << " counter\n"
      << name << ' ' << v << '\n';
  };
  auto gauge = [&](const char* name, const char* help, std::uint64_t v) {
    o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << " gauge\n"
      << name << ' ' << v << '\n';
  };
  gauge("gate_locks_held", "Locks held now.", held);
  gauge("gate_queue_length", "Acquire requests waiting now.", queued);
  gauge("gate_connections", "Open client connections.", m.connections);
  counter("gate_requests_total", "HTTP requests handled.", m.requests);
  counter("gate_grants_total", "Locks granted (including re-entrant grants).", m.grants);
  counter("gate_grants_after_wait_total", "Grants that had to wait in the queue.",
          m.grants_after_wait);
  counter("gate_releases_total", "Successful releases.", m.releases);
  counter("gate_heartbeats_total", "Successful heartbeats.", m.heartbeats);
  counter("gate_acquire_timeouts_total", "Acquires answered timeout.", m.timeouts);
  counter("gate_deadlocks_total", "Acquires refused as deadlocks.", m.deadlocks);
  counter("gate_lease_expiries_total", "Locks dropped because their lease ran out.",
          m.lease_expiries);
  counter("gate_hold_cap_expiries_total", "Locks dropped at the hold cap.", m.cap_expiries);
  counter("gate_bad_requests_total", "Requests refused as malformed.", m.bad_requests);
  counter("gate_queued_disconnects_total", "Queued requests whose client went away.",
          m.disconnects_while_queued);
  counter("gate_store_failures_total", "Failed writes of the lock state.", m.store_failures);
  gauge("gate_delegated", "1 while the lock space is delegated to a client.", delegated ? 1 : 0);
  counter("gate_delegations_total", "Delegations of the lock space to a client.", m.delegations);
  counter("gate_recalls_total", "Delegations recalled because another client asked.", m.recalls);
  counter("gate_delegations_expired_total", "Delegations whose delegate stopped reporting.",
          m.delegations_expired);
  o << "# HELP gate_stale_replacements_total Saves over a file another agent changed since the "
       "saver read it, by what the mount did: merged, installed as a conflict, or refused.\n"
       "# TYPE gate_stale_replacements_total counter\n"
    << "gate_stale_replacements_total{outcome=\"merged\"} " << m.stale_merged << '\n'
    << "gate_stale_replacements_total{outcome=\"conflict\"} " << m.stale_conflicts << '\n'
    << "gate_stale_replacements_total{outcome=\"refused\"} " << m.stale_refused << '\n';
  o << "# HELP gate_acquire_wait_seconds Time from acquire to grant.\n"
       "# TYPE gate_acquire_wait_seconds histogram\n";
  for (std::size_t i = 0; i < BrokerMetrics::kWaitBuckets.size(); ++i)
    o << "gate_acquire_wait_seconds_bucket{le=\"" << BrokerMetrics::kWaitBuckets[i] << "\"} "
      << m.wait_counts[i] << '\n';
  o << "gate_acquire_wait_seconds_bucket{le=\"+Inf\"} " << m.wait_count << '\n'
    << "gate_acquire_wait_seconds_sum " << m.wait_sum << '\n'
    << "gate_acquire_wait_seconds_count " << m.wait_count << '\n';
  return o.str();
}

}  // namespace gate
