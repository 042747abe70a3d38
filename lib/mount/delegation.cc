#include "mount/delegation.h"

#include <boost/json.hpp>

#include <algorithm>

#include "broker/lock_json.h"
#include "client/wire_key.h"
#include "core/log.h"
#include "core/token.h"

namespace gate::mount {

namespace json = boost::json;

namespace {

wire::Request to_broker(std::string method, std::string target, std::string body, bool wait = false) {
  wire::Request r{std::move(method), std::move(target), std::move(body)};
  r.wait_forever = wait;
  r.to_broker = true;
  return r;
}

json::value parse_or_null(const std::string& body) {
  json::error_code ec;
  json::value v = json::parse(body, ec);
  return ec ? json::value() : v;
}

std::uint64_t number(const json::value& v, const char* field) {
  if (!v.is_object()) return 0;
  const json::value* f = v.as_object().if_contains(field);
  if (!f) return 0;
  if (f->is_uint64()) return f->as_uint64();
  if (f->is_int64() && f->as_int64() >= 0) return static_cast<std::uint64_t>(f->as_int64());
  return 0;
}

// A true `field` in a broker's answer ("recall": hand the space back).
bool flag(const json::value& v, const char* field) {
  const json::value* f = v.is_object() ? v.as_object().if_contains(field) : nullptr;
  return f && f->is_bool() && f->as_bool();
}

// A release or heartbeat: calls about a lock the space's holder has, which must reach
// whoever holds the space (while it is handed back: the broker, once it has it).
bool about_a_held_lock(const wire::Request& r) {
  return r.target == "/v1/locks/release" || r.target == "/v1/locks/heartbeat";
}

// Fences kept in reserve at the end of a delegation's block: the space goes back first.
constexpr std::uint64_t kFenceMargin = 1 << 20;

// A typed try as the engine takes it: what parse_acquire makes of the same request's
// JSON, but no request_id: that re-attaches a queued request, whose answer would come
// later, and a try answered here takes over nothing (waits go as HTTP).
AcquireParams params_of(const AcquireRequest& r) {
  AcquireParams p;
  p.key = wire_key(r.key);
  p.mode = r.mode;
  p.owner = r.owner;
  p.session = r.session;
  p.timeout_ms = r.timeout_ms;
  p.lease_ms = r.lease_ms;
  p.max_hold_ms = r.max_hold_ms;
  p.who = {r.agent, r.pid, r.command};
  return p;
}

// A grant as the agent keeps it (what lock_from_json reads of the JSON answer), but
// without the times, which it does not use.
LockInfo info_of(const Lock& l, std::uint64_t version) {
  LockInfo i;
  i.lock_id = l.lock_id;
  i.key = l.key;
  i.mode = l.mode;
  i.owner = l.owner;
  i.max_hold_ms = l.max_hold_ms;
  i.hold_count = l.hold_count;
  i.fence = l.fence;
  i.version = version;
  i.agent = l.who.agent;
  i.pid = l.who.pid;
  i.command = l.who.command;
  return i;
}

}  // namespace

Delegation::Delegation(BrokerLoop& loop, std::string client, std::string view, std::int64_t lease_ms,
                       std::function<bool()> idle)
    : loop_(loop), client_(std::move(client)), view_(std::move(view)), lease_ms_(lease_ms), idle_(std::move(idle)) {}

Delegation::~Delegation() = default;

bool Delegation::delegated() const {
  std::lock_guard lock(m_);
  return state_ == State::On;
}

void Delegation::set_state(State s) {
  state_ = s;
  changed_.notify_all();
}

void Delegation::start() {
  loop_.post([self = shared_from_this()] { self->ask(); });
}

void Delegation::ask() {
  {
    std::lock_guard lock(m_);
    if (state_ != State::Off || unsupported_) return;
    if (!idle_()) {
      loop_.post_at(BrokerLoop::Clock::now() + kAskEvery, [self = shared_from_this()] { self->ask(); });
      return;
    }
    set_state(State::Asking);
  }
  loop_.set_route(shared_from_this());  // what comes meanwhile waits for the answer
  json::object o{{"client", client_}, {"lease_ms", lease_ms_}};
  if (!view_.empty()) o["view"] = view_;
  loop_.call(to_broker("POST", "/v1/delegation", json::serialize(o)),
             [self = shared_from_this()](const HttpReply& r) {
               if (r.status == 200) return self->on_granted(r.body);
               self->release_held();
               std::lock_guard lock(self->m_);
               if (self->state_ != State::Asking) return;
               self->set_state(State::Off);
               if (r.status == 404 || r.status == 405 || r.status == 400) {
                 // A broker without delegations (or refusing how this one asks): the
                 // mount works through it as always.
                 self->unsupported_ = true;
                 log(LogLevel::Info, "mount", "the broker does not delegate its lock space (",
                     r.status, "); every lock goes through it");
                 return;
               }
               self->loop_.post_at(BrokerLoop::Clock::now() + kAskEvery, [self] { self->ask(); });
             });
}

void Delegation::on_granted(const std::string& body) {
  const json::value v = parse_or_null(body);
  LockTableOptions options;
  options.default_lease_ms = static_cast<std::int64_t>(number(v, "default_lease_ms"));
  options.max_hold_ms = static_cast<std::int64_t>(number(v, "max_hold_ms"));
  options.restore_grace_ms = static_cast<std::int64_t>(number(v, "restore_grace_ms"));
  if (options.default_lease_ms <= 0) options.default_lease_ms = LockTableOptions{}.default_lease_ms;
  std::unordered_map<std::string, std::uint64_t> versions;
  if (v.is_object())
    if (const json::value* vs = v.as_object().if_contains("versions"); vs && vs->is_object())
      for (const auto& kv : vs->as_object())
        if (kv.value().is_int64() || kv.value().is_uint64())
          versions[std::string(kv.key())] = kv.value().to_number<std::uint64_t>();
  std::string stopped_body;
  {
    std::lock_guard lock(m_);
    id_ = number(v, "delegation");
    fence_end_ = number(v, "fence_end");
    const std::uint64_t fence_from = number(v, "fence_from");
    if (state_ != State::Asking || !id_ || !fence_from || fence_end_ <= fence_from + kFenceMargin) {
      // Stopped meanwhile (or an answer that makes no sense): straight back.
      if (id_) {
        json::object o = state_to_json(TableState{});
        o["delegation"] = id_;
        stopped_body = json::serialize(o);
      }
      if (state_ == State::Asking) set_state(State::Off);
    } else {
      ioc_ = std::make_unique<boost::asio::io_context>(1);
      table_ = std::make_unique<LockTable>(options, random_token);
      table_->restore({}, {}, fence_from, wall_clock_micros(), std::move(versions));
      table_->take_journal();
      table_->keep_journal(false);  // no store here: the broker learns by reports
      table_->keep_version_changes(true);
      unreported_.clear();
      service_ = std::make_unique<BrokerService>(*ioc_, *table_, nullptr, wall_clock_micros,
                                                 /*own_timer=*/false);
      dirty_ = false;
      last_report_ = confirmed_ = std::chrono::steady_clock::now();
      report_failed_ = false;
      set_state(State::On);
      log(LogLevel::Info, "mount", "the broker lent this mount its lock space (delegation ", id_,
          "): locks are taken here until another client asks");
    }
  }
  if (!stopped_body.empty() || !delegated()) {
    release_held();
    if (!stopped_body.empty())
      loop_.call(to_broker("POST", "/v1/delegation/return", stopped_body), [](const HttpReply&) {});
    return;
  }
  {
    // What waited for the answer is answered here, in its order.
    std::lock_guard lock(m_);
    for (Held& h : std::exchange(held_, {})) serve(h.id, h.request, std::move(h.answer));
  }
  poll_recall();
  std::lock_guard lock(m_);
  if (state_ == State::On) arm_tick();
}

void Delegation::poll_recall() {
  std::uint64_t id;
  {
    std::lock_guard lock(m_);
    if (state_ != State::On) return;
    id = id_;
  }
  loop_.call(to_broker("GET", "/v1/delegation/recall?delegation=" + std::to_string(id), "", true),
             [self = shared_from_this(), id](const HttpReply& r) {
               {
                 std::lock_guard lock(self->m_);
                 if (self->state_ != State::On || self->id_ != id) return;
               }
               const json::value v = parse_or_null(r.body);
               if (r.status == 200 && flag(v, "recall")) return self->give_back("another client asked for a lock");
               if (r.status == 404) return self->lost("the broker ended it: " + r.body);
               if (r.status == 200) {
                 // A number: someone asked the broker who holds what.
                 if (const std::uint64_t n = number(v, "report")) self->report(false, n);
                 return self->poll_recall();
               }
               // No answer (a broker restarting): ask again shortly; reports keep it alive.
               self->loop_.post_at(BrokerLoop::Clock::now() + std::chrono::milliseconds(200),
                                   [self] { self->poll_recall(); });
             });
}

void Delegation::drive() {
  ioc_->restart();
  ioc_->poll();
}

void Delegation::release_held() {
  std::vector<std::uint64_t> ids;
  {
    std::lock_guard lock(m_);
    for (const Held& h : held_) ids.push_back(h.id);
    held_.clear();
  }
  loop_.set_route(nullptr);
  loop_.resend_to_broker(ids);
}

bool Delegation::handle(std::uint64_t id, const wire::Request& request, Deliver answer) {
  std::unique_lock lock(m_);
  if (state_ == State::Returning && about_a_held_lock(request)) {
    // Its lock is on its way back to the broker: the call goes there once it has it.
    deferred_.push_back(id);
    return true;
  }
  if (state_ == State::Asking) {
    held_.push_back({id, request, std::move(answer)});
    return true;
  }
  if (state_ != State::On) return false;
  serve(id, request, std::move(answer));
  give_back_if_fences_low(lock);
  return true;
}

void Delegation::serve(std::uint64_t id, const wire::Request& request, Deliver answer) {
  const std::uint64_t ticket =
      service_->handle(request.method, request.target, request.body,
                       [this, id, answer = std::move(answer)](HttpAnswer a) {
                         waiting_.erase(id);  // (m_ is held: answers come out of drive())
                         answer(HttpReply{a.status, std::move(a.body), ""});
                       });
  if (ticket) waiting_[id] = ticket;
  if (request.method == "POST") dirty_ = true;
  drive();
  arm_tick();
}

void Delegation::give_back_if_fences_low(std::unique_lock<std::mutex>& lock) {
  const bool fences_low = table_->next_fence() + kFenceMargin >= fence_end_;
  lock.unlock();
  if (fences_low) loop_.post([self = shared_from_this()] { self->give_back("its fences are used up"); });
}

void Delegation::served(std::unique_lock<std::mutex>& lock) {
  dirty_ = true;
  arm_tick();
  give_back_if_fences_low(lock);
}

std::optional<CallResult> Delegation::try_acquire(const AcquireRequest& request) {
  AcquireParams p = params_of(request);
  if (!check_acquire(p).ok()) return std::nullopt;  // handle() says what is wrong
  std::unique_lock lock(m_);
  if (state_ != State::On) return std::nullopt;
  std::optional<AcquireResult> r = service_->try_acquire(p);
  if (!r) return std::nullopt;
  CallResult out;
  switch (r->kind) {
    case AcquireResult::Kind::Granted:
      out.status = CallStatus::Ok;
      out.lock = info_of(r->lock, table_->version_of(r->lock.key));
      break;
    case AcquireResult::Kind::Deadlock:
      out.status = CallStatus::Deadlock;
      out.error = r->error;
      break;
    case AcquireResult::Kind::Timeout:
    case AcquireResult::Kind::Queued:  // (a try never queues)
      out.status = CallStatus::Timeout;
      out.error = "timeout";
      break;
  }
  served(lock);
  return out;
}

std::optional<CallResult> Delegation::release_now(const std::string& lock_id, const std::string& owner,
                                                  bool changed, const std::string& stale) {
  std::unique_lock lock(m_);
  if (state_ != State::On) return std::nullopt;
  std::optional<OpStatus> status = service_->release_now(lock_id, owner, changed, stale);
  if (!status) return std::nullopt;
  CallResult out;
  out.status = *status == OpStatus::Ok          ? CallStatus::Ok
               : *status == OpStatus::Forbidden ? CallStatus::Forbidden
                                                : CallStatus::NotFound;
  if (*status != OpStatus::Ok) out.error = BrokerService::refusal_text(*status, lock_id);
  served(lock);
  return out;
}

void Delegation::cancel(std::uint64_t id) {
  std::lock_guard lock(m_);
  std::erase_if(held_, [id](const Held& h) { return h.id == id; });
  std::erase(deferred_, id);
  std::erase(resend_, id);
  auto it = waiting_.find(id);
  if (it == waiting_.end() || state_ != State::On) return;
  const std::uint64_t ticket = it->second;
  waiting_.erase(it);
  service_->client_gone(ticket);
  dirty_ = true;
  drive();
  arm_tick();  // what came in behind it has deadlines of its own
}

std::chrono::milliseconds Delegation::keepalive_every() const {
  const std::chrono::milliseconds third(std::max<std::int64_t>(lease_ms_ / 3, 100));
  return report_failed_ ? std::min(third, std::chrono::milliseconds(1000)) : third;
}

void Delegation::arm_tick() {
  using std::chrono::milliseconds;
  const auto now = std::chrono::steady_clock::now();
  auto at = std::min(confirmed_ + milliseconds(lease_ms_), last_report_ + keepalive_every());
  if (dirty_) at = std::min(at, last_report_ + kReportChanges);
  if (const std::optional<Micros> due = table_->next_deadline())
    at = std::min(at, now + std::chrono::microseconds(std::max<Micros>(0, *due - wall_clock_micros()) + 1));
  at = std::max(at, now + kTick);
  if (tick_at_ && *tick_at_ <= at) return;
  tick_at_ = at;
  loop_.post_at(at, [self = shared_from_this(), at] { self->tick(at); });
}

void Delegation::tick(std::chrono::steady_clock::time_point at) {
  bool report_now = false, keepalive = false, expired = false;
  {
    std::lock_guard lock(m_);
    if (tick_at_ != at) return;  // replaced by an earlier one
    tick_at_.reset();
    if (state_ != State::On) return;
    service_->expire_now();  // leases, the hold cap and time-outs of waits
    drive();
    const auto now = std::chrono::steady_clock::now();
    const auto since = now - last_report_;
    expired = now - confirmed_ >= std::chrono::milliseconds(lease_ms_);
    if (dirty_ && since >= kReportChanges) report_now = true;
    else if (since >= keepalive_every()) report_now = keepalive = true;
  }
  if (expired) return lost("the broker has not confirmed it for a lease (" + std::to_string(lease_ms_) + " ms)");
  if (report_now) report(keepalive);
  std::lock_guard lock(m_);
  if (state_ == State::On) arm_tick();
}

json::object Delegation::message(bool with_state) {
  json::object o;
  if (with_state) {
    for (auto& [key, v] : table_->take_version_changes()) unreported_[key] = v;
    TableState state = table_->export_state(/*with_versions=*/false);
    state.versions = unreported_;
    o = state_to_json(state);
  }
  o["delegation"] = id_;
  o["metrics"] = BrokerService::activity_to_json(service_->metrics());
  return o;
}

void Delegation::close_engine() {
  drive();  // what the engine has to answer or deliver goes out first
  service_.reset();
  table_.reset();
  ioc_.reset();
}

void Delegation::report(bool keepalive, std::uint64_t asked_for) {
  std::string body;
  std::uint64_t id;
  std::unordered_map<std::string, std::uint64_t> sent;
  {
    std::lock_guard lock(m_);
    if (state_ != State::On) return;
    json::object o = message(!keepalive);
    if (asked_for) o["report"] = asked_for;  // made after the broker asked for it
    id = id_;
    body = json::serialize(o);
    if (!keepalive) sent = unreported_;
    dirty_ = false;
    last_report_ = std::chrono::steady_clock::now();
  }
  loop_.call(to_broker("POST", "/v1/delegation/report", std::move(body)),
             [self = shared_from_this(), id, sent = std::move(sent)](const HttpReply& r) {
               {
                 std::lock_guard lock(self->m_);
                 if (self->state_ != State::On || self->id_ != id) return;
                 self->report_failed_ = r.status != 200;
                 if (r.status == 200) self->confirmed_ = std::chrono::steady_clock::now();
                 else self->arm_tick();  // tried again within a second, not at the next keep-alive
                 // The broker has these now (unless they changed again since).
                 if (r.status == 200)
                   for (const auto& [key, v] : sent)
                     if (auto it = self->unreported_.find(key); it != self->unreported_.end() && it->second == v)
                       self->unreported_.erase(it);
               }
               if (r.status == 200 && flag(parse_or_null(r.body), "recall"))
                 self->give_back("another client asked for a lock");
               else if (r.status == 404) self->lost("the broker ended it: " + r.body);
               // No answer: the next report tries again.
             });
}

void Delegation::give_back(const std::string& why) {
  std::string body;
  {
    std::lock_guard lock(m_);
    if (state_ != State::On) return;
    drive();
    body = json::serialize(message(true));
    unreported_.clear();
    for (const auto& [call, ticket] : waiting_) resend_.push_back(call);
    waiting_.clear();  // (their answers come from the broker now)
    close_engine();
    set_state(State::Returning);
    log(LogLevel::Info, "mount", "handing the lock space back to the broker (", why, "), ",
        resend_.size(), " waits with it");
  }
  send_back(std::move(body));
}

void Delegation::send_back(std::string body) {
  loop_.call(to_broker("POST", "/v1/delegation/return", body),
             [self = shared_from_this(), body](const HttpReply& r) {
               if (r.status == 200) return self->returned();
               if (r.status == 404) return self->lost("the broker ended it before it was handed back: " + r.body);
               if (r.status >= 400 && r.status < 500)
                 return self->lost("the broker refused the hand-back (" + std::to_string(r.status) + "): " + r.body);
               // The broker is away (restarting: the delegation outlives that): again.
               self->loop_.post_at(BrokerLoop::Clock::now() + std::chrono::milliseconds(200),
                                   [self, body] { self->send_back(body); });
             });
}

void Delegation::returned() {
  std::vector<std::uint64_t> calls;
  bool again;
  {
    std::lock_guard lock(m_);
    calls = std::exchange(resend_, {});
    calls.insert(calls.end(), deferred_.begin(), deferred_.end());
    deferred_.clear();
    again = state_ == State::Returning;
    if (again) set_state(State::Off);
  }
  loop_.set_route(nullptr);
  // The waits re-attach to their places by request_id; the releases find their locks.
  loop_.resend_to_broker(calls);
  if (again)
    loop_.post_at(BrokerLoop::Clock::now() + kAskEvery, [self = shared_from_this()] { self->ask(); });
}

void Delegation::lost(const std::string& why) {
  {
    std::lock_guard lock(m_);
    if (state_ != State::On && state_ != State::Returning) return;
    log(LogLevel::Error, "mount", "the lock space lent to this mount was taken back without its locks (",
        why, "); they are lost, and writes through their files fail with EIO");
    if (state_ == State::On) {
      // Every wait here ends (503); the agent asks the broker again.
      service_->shutdown();
      close_engine();
      waiting_.clear();
    }
    set_state(State::Returning);  // returned() finishes the switch
  }
  returned();
}

void Delegation::stop(std::chrono::milliseconds limit) {
  bool out;
  {
    std::lock_guard lock(m_);
    out = state_ == State::On;
  }
  if (out) loop_.post([self = shared_from_this()] { self->give_back("the mount is going away"); });
  std::unique_lock lock(m_);
  changed_.wait_for(lock, limit, [this] { return state_ == State::Off || state_ == State::Asking; });
  set_state(State::Stopped);
}

}  // namespace gate::mount
