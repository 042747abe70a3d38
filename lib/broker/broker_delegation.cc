// BrokerService's delegation of the whole lock space to one client (a mount that is
// the broker's only client), and its recall as soon as another client asks: see
// docs/delegation.md. While the space is out, this broker's table holds nothing, every
// acquire waits here (parked) until the delegate has handed its state back, and the
// delegate's reports are what `status` shows.
#include <boost/json.hpp>

#include <algorithm>

#include "broker/broker_service.h"
#include "broker/lock_json.h"
#include "core/log.h"

namespace gate {

namespace json = boost::json;

namespace {

// The client an acquire comes from: the mount id before the session's ':' (locking.md:
// "<mount-id>:<pid>"), else its session or owner.
std::string client_of(const AcquireParams& p) {
  const std::string& s = p.session.empty() ? p.owner : p.session;
  return s.substr(0, s.find(':'));
}

// A stable id of a delegate's view ("<host>:<mountpoint>"), kept with the delegation
// in the store's counters: FNV-1a, 63 bits (never 0 for a view).
std::int64_t view_id(const std::string& view) {
  if (view.empty()) return 0;
  std::uint64_t h = 14695981039346656037ull;
  for (unsigned char c : view) h = (h ^ c) * 1099511628211ull;
  h &= (std::uint64_t{1} << 63) - 1;
  return h ? static_cast<std::int64_t>(h) : 1;
}

HttpAnswer ended_answer(const std::string& why) {
  json::object o;
  o["status"] = "ended";
  o["error"] = why;
  return {404, json::serialize(o)};
}

}  // namespace

void BrokerService::note_client(const AcquireParams& p, Micros now) {
  last_acquire_[client_of(p)] = now;
  // Only the last few seconds matter.
  if (last_acquire_.size() > 1024)
    std::erase_if(last_acquire_, [now](const auto& kv) { return now - kv.second > kDelegationQuietUs; });
}

void BrokerService::park(const std::string& body, Reply& reply, std::uint64_t* ticket) {
  auto obj = parse_body_object(body);
  Result<AcquireParams> p = obj.ok() ? parse_acquire(*obj) : Result<AcquireParams>(obj.status());
  if (!p.ok()) return bad_request(reply, 400, p.message());
  note_client(*p, clock_());
  if (!delegation_->heard && p->timeout_ms && *p->timeout_ms == 0) {
    // A try, while the space is lent to a delegate not heard from since this broker
    // started (maybe gone with it): "not now" at once, rather than a wait for its
    // grace to end; a waiting acquire waits.
    answer(std::move(reply), {408, R"({"status":"timeout","error":"the lock space is lent to a client not heard from since the broker started"})"});
    return;
  }
  *ticket = kParkedTicket | ++next_ticket_;
  parked_.push_back({*ticket, body, std::move(reply)});
  recall("'" + client_of(*p) + "' asked for " + to_string(p->mode) + " '" + p->key.substr(0, 200) + "'");
}

void BrokerService::delegate(const std::string& body, Reply& reply) {
  auto obj = parse_body_object(body);
  std::string client, view;
  std::optional<std::int64_t> lease_ms;
  Status valid = obj.status();
  if (valid.ok()) valid = get_string(*obj, "client", true, &client);
  if (valid.ok()) valid = get_string(*obj, "view", false, &view);
  if (valid.ok()) valid = get_millis(*obj, "lease_ms", &lease_ms);
  if (valid.ok() && client.empty()) valid = Status::failure("field 'client' must not be empty");
  if (!valid.ok()) return bad_request(reply, 400, valid.message());
  const Micros now = clock_();
  table_.expire(now);
  auto refuse = [&](const std::string& why) {
    json::object o;
    o["status"] = "refused";
    o["error"] = why;
    answer(std::move(reply), {409, json::serialize(o)});
  };
  // Restored at a restart, lent to this same view, and not heard from since: a live
  // delegate polls again within 200 ms of the restart (and never asks while it has
  // the space), so once kRestoredSilenceUs has passed without a word its process is
  // gone and this is the view's new one; its locks went with it. Asked sooner, it
  // ends then, unless its delegate speaks up (a poll or report renews its lease).
  if (delegation_ && !delegation_->heard && delegation_->view != 0 && delegation_->view == view_id(view)) {
    const Micros at = delegation_->since + kRestoredSilenceUs;
    delegation_->view_asked = true;
    if (now >= at) end_delegation(kViewGoneWhy);
    else delegation_->expires_at = std::min(delegation_->expires_at, at);
  }
  if (delegation_) return refuse("the lock space is delegated to '" + delegation_->client + "'");
  if (table_.lock_count() || table_.queue_length() || !parked_.empty())
    return refuse("locks are held or asked for here");
  for (const auto& [other, when] : last_acquire_)
    if (other != client && now - when < kDelegationQuietUs)
      return refuse("'" + other + "' asked for a lock in the last " +
                    std::to_string(kDelegationQuietUs / 1000) + " ms");
  Delegation d;
  d.id = table_.reserve_fence_block(kDelegationFences);
  d.fence_end = d.id + kDelegationFences;
  d.client = client;
  d.view = view_id(view);
  d.lease_ms = lease_ms.value_or(30'000);
  if (d.lease_ms <= 0) d.lease_ms = 30'000;
  d.since = now;
  d.expires_at = now + d.lease_ms * 1000;
  json::object versions;
  for (const auto& [key, v] : table_.versions()) versions[key] = v;
  json::object o;
  o["status"] = "delegated";
  o["delegation"] = d.id;
  o["fence_from"] = d.id;
  o["fence_end"] = d.fence_end;
  o["lease_ms"] = d.lease_ms;
  // The delegate's engine runs with this broker's rules.
  o["default_lease_ms"] = table_.options().default_lease_ms;
  o["max_hold_ms"] = table_.options().max_hold_ms;
  o["restore_grace_ms"] = table_.options().restore_grace_ms;
  o["versions"] = std::move(versions);
  delegation_ = std::move(d);
  ++metrics_.delegations;
  journal_delegation();
  log(LogLevel::Info, "broker", "lock space delegated to '", client, "' (delegation ", delegation_->id, ")");
  // Answered once the delegation (and the fences it took) are saved.
  answer(std::move(reply), {200, json::serialize(o)});
}

BrokerService::Delegation* BrokerService::delegation_in(const json::object& body, Reply& reply) {
  auto it = body.find("delegation");
  const bool given = it != body.end() && (it->value().is_uint64() || it->value().is_int64());
  if (!given) {
    bad_request(reply, 400, "field 'delegation' must be the id the delegation was given");
    return nullptr;
  }
  const std::uint64_t id = it->value().is_uint64() ? it->value().as_uint64()
                                                   : static_cast<std::uint64_t>(it->value().as_int64());
  if (!delegation_ || delegation_->id != id) {
    answer(std::move(reply), ended_answer("delegation " + std::to_string(id) + " has ended"));
    return nullptr;
  }
  return &*delegation_;
}

void BrokerService::recall_wait(const std::string& query, Reply& reply, std::uint64_t* ticket) {
  json::object q;
  try {
    q["delegation"] = std::stoull(query.substr(query.find('=') + 1));
  } catch (const std::exception&) {
    return bad_request(reply, 400, "ask with ?delegation=ID");
  }
  Delegation* d = delegation_in(q, reply);
  if (!d) return;
  // Only the live delegate polls for its delegation: as good as a report for its
  // lease (an idle delegate's next report may be a third of a lease away, and a
  // delegation restored at a restart would otherwise end at its restore grace).
  d->heard = true;
  d->expires_at = std::max(d->expires_at, clock_() + d->lease_ms * 1000);
  if (d->recalling) return answer(std::move(reply), {200, R"({"recall":true})"});
  if (report_wanted_) {
    report_wanted_ = false;
    json::object o{{"recall", false}, {"report", report_asked_}};
    return answer(std::move(reply), {200, json::serialize(o)});
  }
  if (d->recall_waiter) answer(std::move(*d->recall_waiter), {200, R"({"recall":false})"});
  d->recall_waiter = std::move(reply);
  d->recall_ticket = kRecallTicket | ++next_ticket_;
  *ticket = d->recall_ticket;
}

bool BrokerService::ask_for_report() {
  return delegation_ && !delegation_->recalling;
}

void BrokerService::send_report_ask() {
  ++report_asked_;
  report_pending_ = true;
  if (delegation_->recall_waiter) {
    json::object o{{"recall", false}, {"report", report_asked_}};
    answer(std::move(*delegation_->recall_waiter), {200, json::serialize(o)});
    delegation_->recall_waiter.reset();
  } else {
    report_wanted_ = true;  // at its next recall poll
  }
  status_timer_.expires_after(kReportWait);
  status_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    // The delegate did not answer in time: what it reported last.
    answer_status_waiters();
    after_change();
  });
}

void BrokerService::answer_status_waiters(std::uint64_t got) {
  if (got >= report_asked_) {
    report_pending_ = false;
    report_wanted_ = false;
    status_timer_.cancel();
  }
  std::vector<StatusWaiter> later;
  for (StatusWaiter& w : std::exchange(status_waiters_, {})) {
    if (w.needs <= got) answer(std::move(w.reply), w.make());
    else later.push_back(std::move(w));
  }
  status_waiters_ = std::move(later);
  if (!status_waiters_.empty() && !report_pending_ && delegation_) send_report_ask();
}

void BrokerService::recall(const std::string& why) {
  if (!delegation_ || delegation_->recalling) return;
  delegation_->recalling = true;
  ++metrics_.recalls;
  log(LogLevel::Info, "broker", "recalling the lock space from '", delegation_->client, "': ", why);
  if (delegation_->recall_waiter) {
    answer(std::move(*delegation_->recall_waiter), {200, R"({"recall":true})"});
    delegation_->recall_waiter.reset();
  }
}

BrokerService::Delegation* BrokerService::delegation_state(const std::string& body, Reply& reply,
                                                           TableState* state, bool* given,
                                                           std::uint64_t* report) {
  auto obj = parse_body_object(body);
  if (!obj.ok()) {
    bad_request(reply, 400, obj.message());
    return nullptr;
  }
  Delegation* d = delegation_in(*obj, reply);
  if (!d) return nullptr;
  if (const json::value* m = obj->if_contains("metrics"); m && m->is_object()) {
    d->activity = BrokerMetrics{};
    activity_from_json(m->as_object(), &d->activity);
  }
  if (const json::value* n = obj->if_contains("report"); report && n && (n->is_uint64() || n->is_int64()))
    *report = n->to_number<std::uint64_t>();
  // A report without a state only keeps the delegation alive.
  if (given && !(*given = obj->contains("locks"))) return d;
  Result<TableState> parsed = state_from_json(*obj);
  if (!parsed.ok()) {
    bad_request(reply, 400, parsed.message());
    return nullptr;
  }
  *state = std::move(parsed).value();
  return d;
}

void BrokerService::delegation_report(const std::string& body, Reply& reply) {
  TableState state;
  bool given = false;
  std::uint64_t number = 0;
  Delegation* d = delegation_state(body, reply, &state, &given, &number);
  if (!d) return;
  d->heard = true;
  d->expires_at = clock_() + d->lease_ms * 1000;
  if (given) {
    // Its versions count from now on, also if it dies before handing the space back.
    table_.merge_versions(state.versions);
    d->reported = std::move(state);
    // The status requests that waited for a report made after they came in.
    if (number) answer_status_waiters(number);
  }
  answer(std::move(reply), {200, d->recalling ? R"({"recall":true})" : R"({"recall":false})"});
}

void BrokerService::delegation_return(const std::string& body, Reply& reply) {
  TableState state;
  if (!delegation_state(body, reply, &state)) return;
  const std::size_t locks = state.locks.size(), queued = state.queue.size();
  const std::size_t left_out = table_.adopt(std::move(state), clock_());
  if (left_out)
    log(LogLevel::Warn, "broker", "the delegate's state had ", left_out,
        " entries that break the lock rules; left out");
  json::object o;
  o["status"] = "returned";
  o["left_out"] = left_out;
  answer(std::move(reply), {200, json::serialize(o)});
  end_delegation("handed back with " + std::to_string(locks) + " locks and " + std::to_string(queued) +
                 " queued requests");
}

void BrokerService::end_delegation(const std::string& why) {
  if (!delegation_) return;
  log(LogLevel::Info, "broker", "delegation ", delegation_->id, " to '", delegation_->client,
      "' ended: ", why);
  if (delegation_->recall_waiter) answer(std::move(*delegation_->recall_waiter), ended_answer(why));
  delegated_activity_.add_activity(delegation_->activity);
  delegation_.reset();
  journal_delegation();
  answer_status_waiters();
  // Every acquire that waited for the space, in its order, behind what came back.
  for (Parked& p : std::exchange(parked_, {})) {
    std::uint64_t ticket = 0;
    acquire(p.body, p.reply, &ticket);
    if (ticket) parked_alias_[p.ticket] = ticket;
  }
}

void BrokerService::journal_delegation() {
  auto set = [this](const char* name, std::int64_t v) {
    JournalEntry e{JournalEntry::Kind::SetCounter};
    e.counter = name;
    e.value = v;
    unsaved_.push_back(std::move(e));
  };
  set("delegation", delegation_ ? static_cast<std::int64_t>(delegation_->id) : 0);
  set("delegation_fence_end", delegation_ ? static_cast<std::int64_t>(delegation_->fence_end) : 0);
  set("delegation_lease_ms", delegation_ ? delegation_->lease_ms : 0);
  set("delegation_view", delegation_ ? delegation_->view : 0);
}

void BrokerService::restore_delegation(const std::unordered_map<std::string, std::int64_t>& counters) {
  auto get = [&](const char* name) {
    auto it = counters.find(name);
    return it == counters.end() ? 0 : it->second;
  };
  if (get("delegation") <= 0) return;
  Delegation d;
  d.id = static_cast<std::uint64_t>(get("delegation"));
  d.fence_end = static_cast<std::uint64_t>(get("delegation_fence_end"));
  d.lease_ms = get("delegation_lease_ms") > 0 ? get("delegation_lease_ms") : 30'000;
  d.view = get("delegation_view");
  d.since = clock_();
  // Nobody could report while the broker was down. A live delegate reports within a
  // second or so (it retries every second); one that died with the broker (a VM
  // killed) would block every key for a lease: it gets the restore grace, as queued
  // requests do.
  const std::int64_t grace_ms = std::min(d.lease_ms, table_.options().restore_grace_ms);
  d.expires_at = d.since + grace_ms * 1000;
  d.heard = false;
  log(LogLevel::Info, "broker", "delegation ", d.id,
      " is still out; it ends unless its delegate reports within ", grace_ms, " ms");
  delegation_ = std::move(d);
  arm_timer();
}

bool BrokerService::client_gone_delegation(std::uint64_t ticket) {
  if (ticket & kParkedTicket) {
    auto p = std::find_if(parked_.begin(), parked_.end(), [ticket](const Parked& x) { return x.ticket == ticket; });
    if (p != parked_.end()) {
      parked_.erase(p);
      ++metrics_.disconnects_while_queued;
      return true;
    }
    return false;  // already run: its alias is its ticket now
  }
  if (ticket & kRecallTicket) {
    if (delegation_ && delegation_->recall_ticket == ticket) delegation_->recall_waiter.reset();
    return true;
  }
  return false;
}

void BrokerService::add_delegated_status(const std::string& key, json::array& locks, json::array& queue,
                                         json::object& o) const {
  if (!delegation_) return;
  for (const Lock& l : delegation_->reported.locks) {
    if (!key.empty() && l.key != key) continue;
    json::object j = lock_to_json(l, table_.version_of(l.key));
    j["delegated"] = true;
    locks.push_back(std::move(j));
  }
  for (const QueuedRequest& r : delegation_->reported.queue) {
    if (!key.empty() && r.key != key) continue;
    json::object j = queued_to_json(r);
    j["delegated"] = true;
    queue.push_back(std::move(j));
  }
  json::object d;
  d["id"] = delegation_->id;
  d["client"] = delegation_->client;
  d["since"] = format_iso8601(delegation_->since);
  d["recalling"] = delegation_->recalling;
  d["heard"] = delegation_->heard;  // false: restored at a restart, no report since
  o["delegation"] = std::move(d);
}

namespace {
// The counters a delegate reports (BrokerMetrics::add_activity).
constexpr std::pair<const char*, std::uint64_t BrokerMetrics::*> kActivity[] = {
    {"grants", &BrokerMetrics::grants},
    {"grants_after_wait", &BrokerMetrics::grants_after_wait},
    {"timeouts", &BrokerMetrics::timeouts},
    {"deadlocks", &BrokerMetrics::deadlocks},
    {"lease_expiries", &BrokerMetrics::lease_expiries},
    {"cap_expiries", &BrokerMetrics::cap_expiries},
    {"releases", &BrokerMetrics::releases},
    {"heartbeats", &BrokerMetrics::heartbeats},
    {"stale_merged", &BrokerMetrics::stale_merged},
    {"stale_conflicts", &BrokerMetrics::stale_conflicts},
    {"stale_refused", &BrokerMetrics::stale_refused},
    {"wait_count", &BrokerMetrics::wait_count},
};
}  // namespace

json::object BrokerService::activity_to_json(const BrokerMetrics& m) {
  json::object o;
  for (const auto& [name, field] : kActivity) o[name] = m.*field;
  json::array buckets;
  for (std::uint64_t n : m.wait_counts) buckets.push_back(n);
  o["wait_buckets"] = std::move(buckets);
  o["wait_sum"] = m.wait_sum;
  return o;
}

void BrokerService::activity_from_json(const json::object& o, BrokerMetrics* m) {
  for (const auto& [name, field] : kActivity)
    if (const json::value* v = o.if_contains(name); v && (v->is_uint64() || v->is_int64()))
      m->*field = v->to_number<std::uint64_t>();
  if (const json::value* b = o.if_contains("wait_buckets"); b && b->is_array())
    for (std::size_t i = 0; i < m->wait_counts.size() && i < b->as_array().size(); ++i)
      if (b->as_array()[i].is_number()) m->wait_counts[i] = b->as_array()[i].to_number<std::uint64_t>();
  if (const json::value* v = o.if_contains("wait_sum"); v && v->is_number()) m->wait_sum = v->to_number<double>();
}

}  // namespace gate
