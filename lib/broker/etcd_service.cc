#include "broker/etcd_service.h"

#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "broker/lock_json.h"
#include "core/files.h"
#include "core/log.h"
#include "core/token.h"
#include "gate/version.h"

namespace gate {

namespace json = boost::json;
using etcd::Entry;
using etcd::EtcdClient;
using etcd::Queue;
using etcd::Retry;

struct EtcdService::Waiter {
  Reply reply;
  AcquireParams params;
  Micros since = 0;
  std::optional<Micros> deadline;
  std::string made_as;         // the key its first entry is made under (acquire_job)
  std::optional<Entry> entry;  // its queue entry once made, as last written
  bool busy = false;           // a job for it runs
  bool gone = false;           // its client went away
  bool seen = false;           // the mirror showed its entry
};

struct EtcdService::Outcome {
  // NotYet: a grant job found its request still waiting (nothing changes).
  enum class Kind { Granted, Queued, NotYet, Timeout, Deadlock, Vanished, Superseded, Unavailable };
  Kind kind = Kind::Unavailable;
  Entry entry;  // Granted: the held entry; Queued: the waiting one
  std::uint64_t version = 0;
  std::string error;
};

namespace {

// Decisions taken on a stale view fail their compare and are taken again on the
// queue the failure read; this many times at most before the client hears 503.
constexpr int kAttempts = 16;
constexpr Micros kRetryUs = 250'000;  // a job etcd refused is tried again after this
constexpr Micros kUnattachedUs = 1'000'000;  // an entry of ours no request waits on lives this long

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
  r.req_id = static_cast<std::uint64_t>(e.create_revision);
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

const json::object* response_range(const etcd::TxnResult& r, std::size_t i) {
  if (i >= r.responses.size() || !r.responses[i].is_object()) return nullptr;
  const json::value* v = r.responses[i].as_object().if_contains("response_range");
  return v && v->is_object() ? &v->as_object() : nullptr;
}

// The queue a transaction's failure branch read (entries not gate's are left out).
Queue queue_from(const etcd::TxnResult& r, std::size_t i) {
  Queue q;
  const json::object* range = response_range(r, i);
  if (!range) return q;
  Result<etcd::RangeResult> rr = etcd::decode_range(*range);
  if (!rr.ok()) return q;
  for (const etcd::KeyValue& kv : rr->kvs)
    if (Result<Entry> e = etcd::decode_entry(kv); e.ok()) q.push_back(std::move(*e));
  std::sort(q.begin(), q.end(), [](const Entry& a, const Entry& b) { return a.create_revision < b.create_revision; });
  return q;
}

std::uint64_t version_from(const etcd::TxnResult& r, std::size_t i) {
  const json::object* range = response_range(r, i);
  if (!range) return 0;
  Result<etcd::RangeResult> rr = etcd::decode_range(*range);
  if (!rr.ok() || rr->kvs.empty()) return 0;
  try {
    return std::stoull(rr->kvs.front().value);
  } catch (const std::exception&) {
    return 0;
  }
}

const Entry* find_entry(const Queue& q, const std::string& key) {
  for (const Entry& e : q)
    if (e.key == key) return &e;
  return nullptr;
}

std::string new_op() { return random_token().substr(0, 12); }

// The deletes of `e` and of its lock id's key.
json::array delete_writes(const Entry& e) {
  json::array deletes{etcd::txn_delete(e.key)};
  if (!e.lock_id.empty()) deletes.push_back(etcd::txn_delete(etcd::id_key(e.lock_id)));
  return deletes;
}

// What ends one hold of `held`: *left is it with its count one lower and a fresh
// mark, put while a hold stays; at the last hold the entry goes (delete_writes).
json::array release_writes(const Entry& held, Entry* left) {
  *left = held;
  left->op = new_op();
  --left->hold_count;
  if (left->hold_count > 0) return {etcd::txn_put(left->key, etcd::encode_entry(*left), left->etcd_lease)};
  return delete_writes(held);
}

// `e` granted now: held once, with a fresh lock id; what writes it (with its lock id's
// key, under `lease`) and reads the key's version (`vkey`; none when empty), last.
json::array grant_writes(Entry& e, Micros now, std::int64_t lease, const std::string& vkey) {
  e.held = true;
  e.upgrade = false;
  e.hold_count = 1;
  e.acquired_at = now;
  e.lease_expires_at = now + e.lease_ms * 1000;
  e.lock_id = random_token();
  json::array writes{etcd::txn_put(e.key, etcd::encode_entry(e), lease),
                     etcd::txn_put(etcd::id_key(e.lock_id), e.key, lease)};
  if (!vkey.empty()) writes.push_back(etcd::txn_range(vkey));
  return writes;
}

// What the release of `gone` lets in, granted in the release's own transaction (so a
// hand-off costs one write; the waiters' brokers see their entries held and answer):
// the writes, and in *compares what keeps them right (every entry up to the last one
// granted is as the mirror shows it). None when the mirror does not show `gone` as
// it is, or the next in line is an upgrade (left to its own broker).
json::array hand_off(const Queue& queue, const Entry& gone, Micros now, json::array* compares) {
  Queue q = queue;
  auto it = std::find_if(q.begin(), q.end(), [&](const Entry& x) { return x.key == gone.key; });
  if (it == q.end() || it->mod_revision != gone.mod_revision) return {};
  q.erase(it);
  const std::vector<etcd::Standing> st = etcd::standings(q);
  json::array writes;
  std::size_t last = q.size();
  for (std::size_t i = 0; i < q.size(); ++i) {
    if (st[i] == etcd::Standing::Held) continue;
    if (st[i] == etcd::Standing::Waiting || q[i].upgrade || (q[i].held && q[i].ends_at() <= now)) break;
    Entry g = q[i];
    for (auto& w : grant_writes(g, now, g.etcd_lease, "")) writes.push_back(std::move(w));
    last = i;
  }
  if (last == q.size()) return {};
  for (std::size_t j = 0; j <= last; ++j) compares->push_back(etcd::compare(q[j].key, "MOD", "EQUAL", q[j].mod_revision));
  return writes;
}

// Takes the held entries of `q` whose lease or hold cap ended by `now` out of it; the
// deletes of them (and their lock ids' keys), for the transaction that decides.
json::array drop_ended(Queue& q, Micros now) {
  json::array deletes;
  for (auto it = q.begin(); it != q.end();) {
    if (!it->held || it->ends_at() > now) {
      ++it;
      continue;
    }
    for (auto& d : delete_writes(*it)) deletes.push_back(std::move(d));
    it = q.erase(it);
  }
  return deletes;
}

// The entry at `key` when the write marked `op` is in it (a write whose answer was
// lost, read back with a fresh deadline); nullopt when it is not, or etcd cannot say.
std::optional<Entry> applied(EtcdClient& c, const std::string& key, const std::string& op) {
  Result<etcd::RangeResult> r = c.range(etcd::range_request(key));
  if (!r.ok() || r->kvs.empty()) return std::nullopt;
  Result<Entry> e = etcd::decode_entry(r->kvs.front());
  if (!e.ok() || e->op != op) return std::nullopt;
  return std::move(*e);
}

std::string lease_hex(std::int64_t lease) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%" PRIx64, static_cast<std::uint64_t>(lease));
  return buf;
}

}  // namespace

EtcdService::EtcdService(boost::asio::io_context& ioc, EtcdServiceOptions options)
    : ioc_(ioc), opts_(std::move(options)), workers_(std::max<std::size_t>(1, opts_.workers), "etcd"),
      timer_(ioc) {}

EtcdService::~EtcdService() { stop(); }

std::string EtcdService::broker_id() const {
  std::lock_guard lock(health_mu_);
  return broker_id_;
}

EtcdService::Session EtcdService::session() const {
  std::lock_guard lock(health_mu_);
  return {lease_.load(), broker_id_};
}

std::string EtcdService::unavailable() const {
  std::lock_guard lock(health_mu_);
  return unavailable_;
}

void EtcdService::set_unavailable(std::string why) {
  std::lock_guard lock(health_mu_);
  if (why != unavailable_) {
    if (why.empty()) log(LogLevel::Info, "broker", "etcd answers again");
    else log(LogLevel::Warn, "broker", "answering 503: ", why);
  }
  unavailable_ = std::move(why);
}

Status EtcdService::take_session(EtcdClient& c) {
  const std::string path = opts_.state_dir + "/etcd-session";
  std::int64_t lease = 0;
  if (!lease_.load()) {
    // A restart within the lease's TTL keeps the last run's entries: their places.
    const std::string saved = read_file(path, 64).value_or("");
    try {
      if (!saved.empty()) lease = std::stoll(saved);
    } catch (const std::exception&) {
      lease = 0;
    }
    if (lease) {
      Result<std::int64_t> ttl = c.lease_ttl(lease);
      if (!ttl.ok()) return Status::failure("cannot reach etcd: " + ttl.message());
      if (*ttl <= 0) lease = 0;
      else log(LogLevel::Info, "broker", "taking up the etcd session of the last run (lease ", lease_hex(lease), ", ",
               *ttl, " s left): its queued requests keep their places");
    }
  }
  if (!lease) {
    Result<std::int64_t> granted = c.lease_grant(std::max<std::int64_t>(2, opts_.session_ttl_s));
    if (!granted.ok()) return Status::failure("cannot take an etcd session lease: " + granted.message());
    lease = *granted;
    if (Status s = replace_file(path, std::to_string(lease) + "\n"); !s.ok())
      return Status::failure("cannot save the etcd session in " + path + ": " + s.message());
  }
  json::object me{{"address", opts_.address}, {"version", kVersion}, {"started_at", format_iso8601(wall_clock_micros())}};
  Result<std::int64_t> put = c.put(etcd::broker_key(lease_hex(lease)), json::serialize(me), lease);
  if (!put.ok()) return Status::failure("cannot register with etcd: " + put.message());
  std::lock_guard lock(health_mu_);
  broker_id_ = lease_hex(lease);
  lease_ = lease;
  return {};
}

Status EtcdService::start() {
  keeper_client_ = std::make_unique<EtcdClient>(opts_.endpoints, opts_.call_timeout);
  if (Status s = take_session(*keeper_client_); !s.ok()) return s;
  mirror_ = std::make_unique<etcd::SpaceMirror>(opts_.endpoints, [this] { schedule_evaluate(); });
  if (Status s = mirror_->start(); !s.ok()) return s;
  start_revision_ = mirror_->revision();
  started_at_ = wall_clock_micros();
  const std::string me = broker_id();
  for (const auto& [key, q] : mirror_->snapshot())
    for (const Entry& e : q) restored_waiting_ += !e.held && e.broker == me;
  workers_.start();
  keeper_ = start_quiet_thread([this] { keeper_main(); });
  boost::asio::post(ioc_, [this] { evaluate(); });
  return {};
}

void EtcdService::keeper_main() {
  const auto every = std::chrono::milliseconds(std::max<std::int64_t>(200, opts_.session_ttl_s * 1000 / 4));
  std::unique_lock lock(keeper_mu_);
  while (!keeper_cv_.wait_for(lock, every, [&] { return keeper_stop_; })) {
    lock.unlock();
    {
      // Grants the mirror has long shown (or that ended elsewhere) are forgotten.
      std::lock_guard recent(recent_mu_);
      const auto old = std::chrono::steady_clock::now() - std::chrono::seconds(30);
      for (auto it = recent_.begin(); it != recent_.end();) it = it->second.second < old ? recent_.erase(it) : std::next(it);
    }
    Result<std::int64_t> ttl = keeper_client_->lease_keepalive(lease_.load());
    if (!ttl.ok()) {
      set_unavailable("etcd does not answer (" + ttl.message() + ")");
    } else if (*ttl <= 0) {
      // Out of touch for longer than the TTL: etcd ended the session and every entry
      // under it; waiters hear 503 when their entries vanish (evaluate()).
      log(LogLevel::Error, "broker", "the etcd session (lease ", lease_hex(lease_.load()),
          ") ended: its locks and queued requests are gone; taking a new one");
      set_unavailable("this broker's etcd session ended; taking a new one");
      {
        std::lock_guard health(health_mu_);
        lease_ = 0;
      }
      if (Status s = take_session(*keeper_client_); !s.ok()) set_unavailable(s.message());
      else set_unavailable("");
    } else if (Result<std::int64_t> probe = keeper_client_->put(
                   etcd::broker_key(broker_id()),
                   json::serialize(json::object{{"address", opts_.address}, {"version", kVersion},
                                                {"alive_at", format_iso8601(wall_clock_micros())}}),
                   lease_.load());
               !probe.ok()) {
      set_unavailable("etcd does not answer (" + probe.message() + ")");
    } else {
      // Every write under /gate/v1/ reaches the mirror's watch in milliseconds. A
      // mirror behind this write that has not moved at all for 3 s hangs on a member
      // cut off from the cluster: the space is read again (and 503 meanwhile). One
      // that is behind but moving (a burst of writes) is left to catch up.
      const auto now = std::chrono::steady_clock::now();
      const std::int64_t seen = mirror_->revision();
      if (!probe_revision_ || seen >= probe_revision_ || seen != probe_seen_) {
        probe_revision_ = *probe;
        probe_at_ = now;
        probe_seen_ = seen;
        set_unavailable("");
      } else if (now - probe_at_ > std::chrono::seconds(3)) {
        log(LogLevel::Warn, "broker", "the mirror of the lock space stopped at revision ", seen, " (etcd is at ",
            *probe, "): reading it again");
        set_unavailable("this broker's view of the lock space stopped following etcd; reading it again");
        mirror_->resync();
        probe_revision_ = *probe;
        probe_at_ = now;
      }
    }
    lock.lock();
  }
}

void EtcdService::shutdown() {
  shutting_down_ = true;
  for (auto& [ticket, w] : waiters_) {
    if (w->gone) continue;
    answer(std::move(w->reply), status_answer(503, "unavailable", "broker is shutting down"));
    w->gone = true;  // a job still running finds nobody to answer
  }
  for (auto it = waiters_.begin(); it != waiters_.end();) it = it->second->busy ? std::next(it) : waiters_.erase(it);
  timer_.cancel();
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

Result<etcd::TxnResult> EtcdService::txn(EtcdClient& c, const json::array& compares, const json::array& success,
                                         const json::array& failure, Retry retry) {
  Result<etcd::TxnResult> r = c.txn(compares, success, failure, retry);
  if (r.ok()) {
    std::int64_t seen = written_.load();
    while (r->revision > seen && !written_.compare_exchange_weak(seen, r->revision)) {
    }
  }
  return r;
}

void EtcdService::catch_up() const {
  // What this broker wrote (or read in a failure branch) is in its mirror within a
  // millisecond or two; deciding on an older view would only fail its compare.
  mirror_->wait_for(written_.load(), kCatchUp);
}

template <typename F>
void EtcdService::run_job(F&& fn) {
  workers_.post([this, fn = std::forward<F>(fn)]() mutable {
    std::unique_ptr<EtcdClient> c;
    {
      std::lock_guard lock(clients_mu_);
      if (!idle_clients_.empty()) {
        c = std::move(idle_clients_.back());
        idle_clients_.pop_back();
      }
    }
    if (!c) c = std::make_unique<EtcdClient>(opts_.endpoints, opts_.call_timeout);
    fn(*c);
    std::lock_guard lock(clients_mu_);
    idle_clients_.push_back(std::move(c));
  });
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
    std::size_t held = 0, queued = 0;
    for (const auto& [key, q] : mirror_->snapshot())
      for (const Entry& e : q) ++(e.held ? held : queued);
    std::string text = metrics_exposition(metrics_, held, queued);
    text += "# HELP gate_etcd_resyncs_total Whole reads of the lock space after the watch fell behind a compaction.\n"
            "# TYPE gate_etcd_resyncs_total counter\ngate_etcd_resyncs_total " +
            std::to_string(mirror_->resyncs()) +
            "\n# HELP gate_etcd_revision The etcd revision this broker's mirror has applied.\n"
            "# TYPE gate_etcd_revision gauge\ngate_etcd_revision " +
            std::to_string(mirror_->revision()) + "\n";
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
  const std::uint64_t t = ++next_ticket_;
  *ticket = t;
  if (w->deadline) arm_timer(*w->deadline);
  waiters_[t] = std::move(w);
  run_job([this, t, p = std::move(p), fresh = std::move(fresh), now](EtcdClient& c) {
    Outcome o = acquire_job(c, p, fresh, now);
    boost::asio::post(ioc_, [this, t, o = std::move(o)]() mutable { acquired(t, std::move(o)); });
  });
}

EtcdService::Outcome EtcdService::acquire_job(EtcdClient& c, const AcquireParams& p, Entry fresh, Micros now) {
  using K = Outcome::Kind;
  const std::string prefix = etcd::queue_prefix(p.key), end = etcd::prefix_end(prefix);
  const std::string vkey = etcd::version_key(p.key);
  const Session s = session();
  if (!s.lease) return {K::Unavailable, {}, 0, "this broker has no etcd session (taking a new one)"};
  const std::int64_t lease = s.lease;
  fresh.broker = s.id;
  etcd::SpaceMirror::KeyView view = mirror_->view(p.key);
  Queue q = std::move(view.queue);
  std::int64_t rev = view.revision;
  std::uint64_t version = view.version;
  if (q.empty() || rev < written_.load()) {
    // Most keys have no queue: one transaction that holds only while the queue is
    // empty (no key in its range has a version) takes the lock without waiting for
    // the mirror to catch up; otherwise its failure branch reads the queue.
    Entry mine = fresh;
    mine.op = new_op();
    json::array success = grant_writes(mine, now, lease, vkey);
    Result<etcd::TxnResult> r = txn(c, {etcd::compare_range(prefix, end, "VERSION", "EQUAL", 0)}, success,
                                    {etcd::txn_range(prefix, end), etcd::txn_range(vkey)}, Retry::Idempotent);
    if (!r.ok()) {
      if (std::optional<Entry> e = applied(c, mine.key, mine.op)) {
        remember(*e);
        return {K::Granted, *e, version, ""};
      }
      return {K::Unavailable, mine, 0, "etcd: " + r.message()};  // (what it may have made)
    }
    if (r->succeeded) {
      mine.create_revision = mine.mod_revision = r->revision;
      mine.etcd_lease = lease;
      remember(mine);
      return {K::Granted, mine, version_from(*r, success.size() - 1), ""};
    }
    q = queue_from(*r, 0);
    version = version_from(*r, 1);
    rev = r->revision;
  }
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    // A write of ours that etcd applied though its answer was lost.
    if (const Entry* mine = find_entry(q, fresh.key)) {
      if (mine->held) return {K::Granted, *mine, version, ""};
      return after_queued(c, *mine);
    }
    // Locks whose lease or hold cap ended are gone for this decision, and deleted by
    // its transaction (the range compare says they are as seen).
    json::array sweeps = drop_ended(q, now);
    json::array compares{etcd::compare_range(prefix, end, "MOD", "LESS", rev + 1)};
    json::array success, failure{etcd::txn_range(prefix, end), etcd::txn_range(vkey)};
    Entry result;
    K kind = K::Granted;
    bool made = false;  // the transaction makes `result` (its create revision is the txn's)
    Retry retry = Retry::Idempotent;
    const etcd::Reentry re = etcd::reentry(q, p.owner, p.mode);
    const Entry* orphan = nullptr;
    if (!p.request_id.empty() && (re == etcd::Reentry::None || re == etcd::Reentry::Upgrade))
      for (const Entry& e : q)
        if (!e.held && e.request_id == p.request_id && e.owner == p.owner && e.mode == p.mode) orphan = &e;
    const Entry* claimed = etcd::held_by(q, p.owner);
    if (claimed && (p.request_id.empty() || claimed->request_id != p.request_id)) claimed = nullptr;
    if (claimed) {
      // The repeat of a request that was granted while its client was away (another
      // broker's release granted it, or this broker restarted): it claims the lock,
      // as it is, with its lease renewed.
      result = *claimed;
      result.op = new_op();
      result.attach = fresh.attach;
      result.lease_expires_at = std::max(result.lease_expires_at, now + result.lease_ms * 1000);
      compares.push_back(etcd::compare(result.key, "MOD", "EQUAL", result.mod_revision));
      success = {etcd::txn_put(result.key, etcd::encode_entry(result), result.etcd_lease), etcd::txn_range(vkey)};
    } else if (re == etcd::Reentry::Deadlock) {
      if (p.timeout_ms && *p.timeout_ms <= 0) return {K::Timeout, {}, 0, ""};  // a try, as LockTable answers it
      return {K::Deadlock, {}, 0,
              "session " + p.session + " would wait for '" + p.key + "', which it holds itself (read)"};
    } else if (re == etcd::Reentry::Again || re == etcd::Reentry::UpgradeNow) {
      result = *etcd::held_by(q, p.owner);
      result.op = new_op();
      result.hold_count += 1;
      if (p.mode == LockMode::Write) result.mode = LockMode::Write;
      result.lease_expires_at = std::max(result.lease_expires_at, now + result.lease_ms * 1000);
      compares.push_back(etcd::compare(result.key, "MOD", "EQUAL", result.mod_revision));
      success = {etcd::txn_put(result.key, etcd::encode_entry(result), result.etcd_lease), etcd::txn_range(vkey)};
      retry = Retry::Once;  // a second application would count the hold twice
    } else if (orphan) {
      // The repeat of a queued request (its client's retry, or after a restart of
      // whichever broker had it): the entry keeps its place and is this broker's now.
      result = *orphan;
      result.op = new_op();
      result.broker = fresh.broker;
      result.attach = fresh.attach;
      compares.push_back(etcd::compare(result.key, "MOD", "EQUAL", result.mod_revision));
      success = {etcd::txn_put(result.key, etcd::encode_entry(result), lease)};
      kind = K::Queued;
      retry = Retry::Once;
    } else {
      result = fresh;
      result.op = new_op();
      result.upgrade = re == etcd::Reentry::Upgrade;
      q.push_back(result);
      const bool now_free = etcd::standings(q).back() == etcd::Standing::Grantable;
      q.pop_back();
      made = true;
      compares.push_back(etcd::compare(result.key, "CREATE", "EQUAL", 0));
      if (now_free) {
        success = grant_writes(result, now, lease, vkey);
      } else if (p.timeout_ms && *p.timeout_ms <= 0) {
        return {K::Timeout, {}, 0, ""};
      } else {
        // A waiting entry needs no view of the queue: its place is its create revision.
        compares = {etcd::compare(result.key, "CREATE", "EQUAL", 0)};
        success = {etcd::txn_put(result.key, etcd::encode_entry(result), lease)};
        sweeps.clear();  // (no view of the queue behind this write)
        kind = K::Queued;
      }
    }
    for (auto& op : sweeps) success.insert(success.begin(), std::move(op));
    Result<etcd::TxnResult> r = txn(c, compares, success, failure, retry);
    if (!r.ok()) {
      // No answer in time: the write may still have been applied (its mark says).
      std::optional<Entry> e = applied(c, result.key, result.op);
      if (!e) return {K::Unavailable, made ? result : Entry{}, 0, "etcd: " + r.message()};
      if (kind == K::Queued) return after_queued(c, *e);
      remember(*e);
      return {K::Granted, *e, version, ""};
    }
    if (r->succeeded) {
      result.mod_revision = r->revision;
      if (made) result.create_revision = r->revision;
      result.etcd_lease = kind == K::Queued || made ? lease : result.etcd_lease;
      if (kind == K::Queued) return after_queued(c, result);
      remember(result);
      return {K::Granted, result, version_from(*r, success.size() - 1), ""};
    }
    q = queue_from(*r, 0);
    version = version_from(*r, 1);
    rev = r->revision;
  }
  return {K::Unavailable, {}, 0, "the queue of '" + p.key + "' kept changing; try again"};
}

EtcdService::Outcome EtcdService::after_queued(EtcdClient& c, Entry e) {
  using K = Outcome::Kind;
  // Deadlock detection over the space as it was when the entry was made: an entry made
  // later that closes a cycle is the one refused (its own check finds it).
  mirror_->wait_for(e.mod_revision, std::chrono::seconds(2));  // (a re-attachment's write, too)
  etcd::Space space = mirror_->snapshot();
  for (auto& [key, q] : space)
    q.erase(std::remove_if(q.begin(), q.end(), [&](const Entry& x) { return x.create_revision > e.create_revision; }),
            q.end());
  Queue& own = space[e.lock_key];
  if (!find_entry(own, e.key)) {
    own.push_back(e);
    std::sort(own.begin(), own.end(), [](const Entry& a, const Entry& b) { return a.create_revision < b.create_revision; });
  }
  if (std::optional<std::string> cycle = etcd::deadlock(space, e)) {
    Result<etcd::TxnResult> r = txn(c, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)},
                                      {etcd::txn_delete(e.key)}, {}, Retry::Idempotent);
    if (!r.ok()) log(LogLevel::Warn, "broker", "could not remove the refused request ", e.key, ": ", r.message());
    return {K::Deadlock, {}, 0, *cycle};
  }
  return {K::Queued, std::move(e), 0, ""};
}

EtcdService::Outcome EtcdService::grant_job(EtcdClient& c, const Entry& known, Micros now) {
  using K = Outcome::Kind;
  const std::string& entry_key = known.key;
  const std::string& lock_key = known.lock_key;
  catch_up();
  etcd::SpaceMirror::KeyView view = mirror_->view(lock_key);
  Queue q = std::move(view.queue);
  std::int64_t rev = view.revision;
  std::uint64_t version = view.version;
  const std::string prefix = etcd::queue_prefix(lock_key), end = etcd::prefix_end(prefix);
  const std::string vkey = etcd::version_key(lock_key);
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    json::array sweeps = drop_ended(q, now);
    auto it = std::find_if(q.begin(), q.end(), [&](const Entry& e) { return e.key == entry_key; });
    if (it == q.end()) return {K::Vanished, {}, 0, ""};
    const Entry& mine = *it;
    if (mine.attach != known.attach) {
      // Re-attached by a later request with the same request_id (here or on another
      // broker); a view older than this request's own write proves nothing yet.
      if (mine.mod_revision < known.mod_revision) return {K::NotYet, {}, 0, ""};
      return {K::Superseded, mine, 0, ""};
    }
    if (mine.held) return {K::Granted, mine, version, ""};
    if (etcd::standings(q)[static_cast<std::size_t>(it - q.begin())] != etcd::Standing::Grantable)
      return {K::NotYet, {}, 0, ""};
    json::array compares{etcd::compare_range(prefix, end, "MOD", "LESS", rev + 1),
                         etcd::compare(mine.key, "MOD", "EQUAL", mine.mod_revision)};
    json::array success, failure{etcd::txn_range(prefix, end), etcd::txn_range(vkey)};
    Entry result;
    Retry retry = Retry::Idempotent;  // a second application fails its compares
    if (const Entry* held = etcd::upgrade_target(q, static_cast<std::size_t>(it - q.begin()))) {
      // The owner's read becomes its write (the upgrade keeps the read's fence).
      result = *held;
      result.op = new_op();
      result.mode = LockMode::Write;
      result.hold_count += 1;
      result.lease_expires_at = std::max(result.lease_expires_at, now + result.lease_ms * 1000);
      compares.push_back(etcd::compare(result.key, "MOD", "EQUAL", result.mod_revision));
      success = {etcd::txn_put(result.key, etcd::encode_entry(result), result.etcd_lease), etcd::txn_delete(mine.key),
                 etcd::txn_range(vkey)};
      retry = Retry::Once;  // (applied twice it would look vanished)
    } else {
      result = mine;
      result.op = new_op();
      success = grant_writes(result, now, result.etcd_lease, vkey);
    }
    for (auto& op : sweeps) success.insert(success.begin(), std::move(op));
    Result<etcd::TxnResult> r = txn(c, compares, success, failure, retry);
    if (!r.ok()) {
      if (std::optional<Entry> e = applied(c, result.key, result.op)) {
        remember(*e);
        return {K::Granted, *e, version, ""};
      }
      return {K::Unavailable, mine, 0, "etcd: " + r.message()};
    }
    if (r->succeeded) {
      result.mod_revision = r->revision;
      remember(result);
      return {K::Granted, result, version_from(*r, success.size() - 1), ""};
    }
    q = queue_from(*r, 0);
    version = version_from(*r, 1);
    rev = r->revision;
  }
  return {K::Unavailable, {}, 0, "the queue of '" + lock_key + "' kept changing"};
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
    Result<etcd::TxnResult> r = txn(c, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)},
                                    {etcd::txn_delete(e.key)}, {etcd::txn_range(e.key)}, Retry::Idempotent);
    if (r.ok() && !r->succeeded) {
      // Granted meanwhile by a release's hand-off: nobody will hear of that grant, so
      // it is given back (a re-attachment by a later request is left alone).
      Queue now = queue_from(*r, 0);
      if (!now.empty() && now.front().held && now.front().attach == e.attach) {
        const Entry& g = now.front();
        r = txn(c, {etcd::compare(g.key, "MOD", "EQUAL", g.mod_revision)}, delete_writes(g), {}, Retry::Idempotent);
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
        txn(c, {etcd::compare(left.key, "MOD", "EQUAL", (*e)->mod_revision)}, success, {}, Retry::Once);
    log(LogLevel::Debug, "broker", "client of ", id, " went away before its grant was sent; ",
        r.ok() && r->succeeded ? "given back" : "it ends with its lease");
  });
}

// ---------------------------------------------------------------------------------
// Release, heartbeat, status

void EtcdService::remember(const Entry& held) {
  std::lock_guard lock(recent_mu_);
  recent_[held.lock_id] = {held, std::chrono::steady_clock::now()};
}

void EtcdService::forget(const std::string& lock_id) {
  std::lock_guard lock(recent_mu_);
  recent_.erase(lock_id);
}

Result<std::optional<Entry>> EtcdService::find_lock(EtcdClient& c, const std::string& lock_id) {
  std::optional<Entry> mirrored = mirror_->find_lock(lock_id);
  {
    // A grant of this broker's a moment ago, which the mirror may not show yet (an
    // older copy only costs a failed compare).
    std::lock_guard lock(recent_mu_);
    if (auto it = recent_.find(lock_id); it != recent_.end()) {
      if (!mirrored || mirrored->mod_revision < it->second.first.mod_revision) return std::optional<Entry>(it->second.first);
      recent_.erase(it);  // the mirror has caught up with it
    }
  }
  if (mirrored && mirrored->held) return mirrored;
  catch_up();
  if (std::optional<Entry> e = mirror_->find_lock(lock_id); e && e->held) return e;
  // Granted a moment ago on another broker, and not in the mirror yet: etcd has it.
  Result<etcd::RangeResult> id = c.range(etcd::range_request(etcd::id_key(lock_id)));
  if (!id.ok()) return id.status();
  if (id->kvs.empty()) return std::optional<Entry>();
  Result<etcd::RangeResult> entry = c.range(etcd::range_request(id->kvs.front().value));
  if (!entry.ok()) return entry.status();
  if (entry->kvs.empty()) return std::optional<Entry>();
  Result<Entry> e = etcd::decode_entry(entry->kvs.front());
  if (!e.ok() || !e->held || e->lock_id != lock_id) return std::optional<Entry>();
  return std::optional<Entry>(std::move(*e));
}

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
  const auto& [lock_id, owner, changed, stale] = *p;
  if (const std::string why = unavailable(); !why.empty())
    return answer(std::move(reply), status_answer(503, "unavailable", why));
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
      Result<etcd::TxnResult> r = txn(c, compares, success, {etcd::txn_range(e->key)}, Retry::Once);
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
  const auto& [lock_id, owner, lease_ms] = *p;
  if (const std::string why = unavailable(); !why.empty())
    return answer(std::move(reply), status_answer(503, "unavailable", why));
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
          txn(c, {etcd::compare(e->key, "MOD", "EQUAL", e->mod_revision)},
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
  const Micros now = wall_clock_micros();
  json::array locks, queue;
  std::map<std::string, std::uint64_t> all_versions = mirror_->versions();
  etcd::Space space = mirror_->snapshot();
  for (const auto& [lock_key, q] : space) {
    if (!key.empty() && lock_key != key) continue;
    const auto v = all_versions.find(lock_key);
    for (const Entry& e : q) {
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
  answer(std::move(reply), {200, json::serialize(o)});
}

// ---------------------------------------------------------------------------------
// What the mirror shows: grants due, vanished entries, ended locks, time-outs

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
  std::int64_t rev = 0;
  const etcd::Space space = mirror_->snapshot(&rev);
  std::optional<Micros> next;
  auto soon = [&](Micros at) { next = next ? std::min(*next, at) : at; };

  std::map<std::string, std::uint64_t> attached;  // entry key -> ticket
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
    const auto q = space.find(w.params.key);
    const Entry* e = q == space.end() ? nullptr : find_entry(q->second, w.entry->key);
    if (!e) {
      if (w.seen || rev >= w.entry->create_revision) {
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
      answer(std::move(w.reply), granted_answer(to_lock(*e), mirror_->version_of(e->lock_key)));
      it = waiters_.erase(it);
      continue;
    }
    const std::size_t at = static_cast<std::size_t>(e - q->second.data());
    if (etcd::standings(q->second)[at] != etcd::Standing::Waiting) {
      w.busy = true;
      run_job([this, ticket, known = *w.entry](EtcdClient& c) {
        Outcome o = grant_job(c, known, wall_clock_micros());
        boost::asio::post(ioc_, [this, ticket, o = std::move(o)]() mutable { acquired(ticket, std::move(o)); });
      });
    }
    ++it;
  }

  const bool orphans_due = now >= started_at_ + opts_.restore_grace_ms * 1000;
  std::map<std::string, Micros> unattached;  // what is still so now
  for (const auto& [lock_key, q] : space) {
    for (const Entry& e : q) {
      if (sweeping_.count(e.key)) continue;
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
          continue;
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
            continue;
          }
          why = "no request waits on it";
        } else if (!orphans_due) {
          // Queued in the last run: kept for its client to ask again.
          soon(started_at_ + opts_.restore_grace_ms * 1000);
          continue;
        } else {
          why = "its client did not come back within " + std::to_string(opts_.restore_grace_ms) + " ms of a restart";
        }
      } else {
        continue;
      }
      sweeping_[e.key] = now;
      run_job([this, e, why](EtcdClient& c) {
        Result<etcd::TxnResult> r =
            txn(c, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)}, delete_writes(e), {}, Retry::Idempotent);
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
    }
  }
  unattached_ = std::move(unattached);
  for (auto d = doubtful_.begin(); d != doubtful_.end();)
    d = now - d->second.second > 60'000'000 ? doubtful_.erase(d) : std::next(d);
  if (next) arm_timer(*next);
}

}  // namespace gate
