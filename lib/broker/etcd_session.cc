// EtcdService's etcd session and start (etcd_service.h): the lease its entries live
// under, kept in the state directory for a restart; the mirror and the threads
// started; the keeper thread, which renews the lease and tells whether etcd answers
// and whether the mirror keeps following it.
#include <boost/asio/post.hpp>
#include <boost/json.hpp>

#include <cinttypes>
#include <cstdio>

#include "broker/etcd_service_impl.h"
#include "core/files.h"
#include "core/log.h"
#include "gate/version.h"

namespace gate {

namespace {

std::string lease_hex(std::int64_t lease) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%" PRIx64, static_cast<std::uint64_t>(lease));
  return buf;
}

// What a broker's key says of its broker: its fence format (0: before formats were
// written down, create revision x 64 + slot), and what people know it by.
struct BrokerRecord {
  std::int64_t format = 0;
  std::string described;  // its id, gate version and address
};
BrokerRecord read_broker(const etcd::KeyValue& broker) {
  BrokerRecord r;
  r.described = broker.key.substr(etcd::broker_key("").size());
  boost::system::error_code ec;
  json::value v = json::parse(broker.value, ec);
  if (ec || !v.is_object()) return r;
  const json::object& o = v.as_object();
  if (const json::value* f = o.if_contains("format"); f && f->is_int64()) r.format = f->as_int64();
  auto text = [&](const char* field) {
    const json::value* x = o.if_contains(field);
    return x && x->is_string() ? std::string(x->as_string()) : std::string();
  };
  const std::string version = text("version"), address = text("address");
  if (!version.empty()) r.described += " (gate " + version + (address.empty() ? ")" : ", " + address + ")");
  else if (!address.empty()) r.described += " (" + address + ")";
  return r;
}

// The broker's key's value: where it listens, its gate and fence format, and `when`
// ("started_at" or "alive_at") now.
std::string broker_value(const std::string& address, const char* when) {
  return json::serialize(json::object{{"address", address},
                                      {"version", kVersion},
                                      {"format", etcd::kFormat},
                                      {when, format_iso8601(wall_clock_micros())}});
}

// Every other broker on the cluster must number fences as this one does: fences are
// computed from create revisions when read, so two numberings in one space would give
// one lock two fences, and fences and versions could go back.
Status check_formats(etcd::EtcdClient& c, const std::string& me) {
  const std::string prefix = etcd::broker_key("");
  Result<etcd::RangeResult> r = c.range(etcd::range_request(prefix, etcd::prefix_end(prefix)));
  if (!r.ok()) return Status::failure("cannot read the brokers on etcd: " + r.message());
  const std::string mine = etcd::broker_key(me);
  for (const etcd::KeyValue& kv : r->kvs) {
    if (kv.key == mine) continue;
    if (const BrokerRecord b = read_broker(kv); b.format != etcd::kFormat)
      return Status::failure("broker " + b.described + " on this etcd cluster numbers fences in format " +
                             std::to_string(b.format) + ", this gate in format " + std::to_string(etcd::kFormat) +
                             ": stop it (its entries end with its session) before starting this one");
  }
  return {};
}

}  // namespace

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
      Result<etcd::RangeResult> mine = etcd::RangeResult{};
      if (*ttl > 0) mine = c.range(etcd::range_request(etcd::broker_key(lease_hex(lease))));
      if (!mine.ok()) return Status::failure("cannot reach etcd: " + mine.message());
      if (*ttl <= 0) lease = 0;
      else if (mine->kvs.empty() || read_broker(mine->kvs.front()).format != etcd::kFormat) {
        // The last run numbered fences otherwise (an upgrade), or its key is gone: its
        // entries end now, with its session.
        log(LogLevel::Warn, "broker", "not taking up the etcd session of the last run (lease ", lease_hex(lease), "): ",
            mine->kvs.empty() ? "its broker key is gone" : "it numbered fences in another format",
            "; its queued requests end with it");
        if (Status gone = c.lease_revoke(lease); !gone.ok())
          log(LogLevel::Warn, "broker", "could not end that session: ", gone.message());
        lease = 0;
      } else if (Result<std::int64_t> kept = c.lease_keepalive(lease); !kept.ok()) {
        return Status::failure("cannot reach etcd: " + kept.message());
      } else if (*kept <= 0) {
        lease = 0;  // ended meanwhile
      } else {
        // Kept alive at once (what is left of it may be less than the keeper's first
        // wait), and then as often as its own TTL needs, whatever --etcd-session-ttl
        // says now: a new session has that TTL.
        lease_ttl_s_ = *kept;
        log(LogLevel::Info, "broker", "taking up the etcd session of the last run (lease ", lease_hex(lease), ", ",
            *ttl, " s left, TTL ", *kept, " s): its queued requests keep their places");
      }
    }
  }
  if (!lease) {
    const std::int64_t ttl_s = std::max<std::int64_t>(2, opts_.session_ttl_s);
    Result<std::int64_t> granted = c.lease_grant(ttl_s);
    if (!granted.ok()) return Status::failure("cannot take an etcd session lease: " + granted.message());
    lease = *granted;
    lease_ttl_s_ = ttl_s;
    if (Status s = replace_file(path, std::to_string(lease) + "\n"); !s.ok())
      return Status::failure("cannot save the etcd session in " + path + ": " + s.message());
  }
  Result<std::int64_t> put = c.put(etcd::broker_key(lease_hex(lease)), broker_value(opts_.address, "started_at"), lease);
  if (!put.ok()) return Status::failure("cannot register with etcd: " + put.message());
  // (Refused, the session is left to end by itself: it may be the last run's, whose
  // waiters keep their places for a start within its TTL.)
  if (Status s = check_formats(c, lease_hex(lease)); !s.ok()) return s;
  std::lock_guard lock(health_mu_);
  broker_id_ = lease_hex(lease);
  lease_ = lease;
  return {};
}

Status EtcdService::start() {
  // Writes go to the leader; a client that starts there saves each the hop (a client
  // keeps its member while it answers, so after an election some go round).
  opts_.endpoints = etcd::leader_first(opts_.endpoints, std::chrono::milliseconds(500));
  keeper_client_ = std::make_unique<EtcdClient>(opts_.endpoints, opts_.call_timeout);
  if (Status s = take_session(*keeper_client_); !s.ok()) return s;
  mirror_ = std::make_unique<etcd::SpaceMirror>(opts_.endpoints, [this] { schedule_evaluate(); });
  if (Status s = mirror_->start(); !s.ok()) return s;
  start_revision_ = mirror_->revision();
  started_at_ = wall_clock_micros();
  alive_sent_at_ = mirror_fresh_at_ = etcd_parts::steady_ns();
  const std::string me = broker_id();
  for (const auto& [key, q] : mirror_->snapshot())
    for (const Entry& e : q) restored_waiting_ += !e.held && e.broker == me;
  if (Status s = hand_back_last_run(); !s.ok()) return s;
  workers_.start();
  keeper_ = start_quiet_thread([this] { keeper_main(); });
  boost::asio::post(ioc_, [this] { evaluate(); });
  return {};
}

std::chrono::milliseconds EtcdService::keeper_every() const {
  return std::chrono::milliseconds(std::max<std::int64_t>(200, lease_ttl_s_.load() * 1000 / 4));
}

void EtcdService::keeper_main() {
  std::unique_lock lock(keeper_mu_);
  while (!keeper_cv_.wait_for(lock, keeper_every(), [&] { return keeper_stop_; })) {
    lock.unlock();
    {
      // Grants the mirror has long shown (or that ended elsewhere) are forgotten.
      std::lock_guard recent(recent_mu_);
      const auto old = std::chrono::steady_clock::now() - std::chrono::seconds(30);
      for (auto it = recent_.begin(); it != recent_.end();) it = it->second.second < old ? recent_.erase(it) : std::next(it);
    }
    const std::int64_t sent = etcd_parts::steady_ns();
    Result<std::int64_t> ttl = keeper_client_->lease_keepalive(lease_.load());
    if (ttl.ok() && *ttl > 0) {
      alive_sent_at_ = sent;
      lease_ttl_s_ = *ttl;
    }
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
    } else if (Result<std::int64_t> probe = keeper_client_->put(etcd::broker_key(broker_id()),
                                                                 broker_value(opts_.address, "alive_at"), lease_.load());
               !probe.ok()) {
      set_unavailable("etcd does not answer (" + probe.message() + ")");
    } else {
      // Every write under /gate/v1/ reaches the mirror's watch in milliseconds. A
      // mirror behind this write that has not moved at all for 3 s hangs on a member
      // cut off from the cluster: the space is read again (and 503 meanwhile). One
      // that is behind but moving (a burst of writes) is left to catch up.
      const auto now = std::chrono::steady_clock::now();
      const std::int64_t seen = mirror_->revision();
      if (probe_revision_ && seen >= probe_revision_) mirror_fresh_at_ = probe_made_;
      if (!probe_revision_ || seen >= probe_revision_ || seen != probe_seen_) {
        probe_revision_ = *probe;
        probe_at_ = now;
        probe_made_ = sent;
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

}  // namespace gate
