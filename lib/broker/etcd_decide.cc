// EtcdService's decisions (etcd_service.h): what a worker thread writes to etcd for an
// acquire or a grant, in transactions guarded by the queue as seen, and the helpers
// the request side shares with it.
#include <boost/json.hpp>

#include <algorithm>

#include "broker/etcd_service_impl.h"
#include "core/log.h"
#include "core/token.h"

namespace gate {

namespace etcd_parts {

namespace {

const json::object* response_range(const etcd::TxnResult& r, std::size_t i) {
  if (i >= r.responses.size() || !r.responses[i].is_object()) return nullptr;
  const json::value* v = r.responses[i].as_object().if_contains("response_range");
  return v && v->is_object() ? &v->as_object() : nullptr;
}

}  // namespace

// The queue a transaction's failure branch read (entries not gate's are left out).
Queue queue_of(const etcd::RangeResult& range) {
  Queue q;
  for (const etcd::KeyValue& kv : range.kvs)
    if (Result<Entry> e = etcd::decode_entry(kv); e.ok()) q.push_back(std::move(*e));
  std::sort(q.begin(), q.end(), etcd::queue_order);
  return q;
}

Queue queue_from(const etcd::TxnResult& r, std::size_t i) {
  const json::object* range = response_range(r, i);
  if (!range) return {};
  Result<etcd::RangeResult> rr = etcd::decode_range(*range);
  return rr.ok() ? queue_of(*rr) : Queue{};
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

std::string new_op() { return random_token().substr(0, 12); }

// What ends one hold of `held`: *left is it with its count one lower and a fresh
// mark, put while a hold stays; at the last hold the entry goes.
json::array release_writes(const Entry& held, Entry* left) {
  *left = held;
  left->op = new_op();
  --left->hold_count;
  if (left->hold_count > 0) return {etcd::txn_put(left->key, etcd::encode_entry(*left), left->etcd_lease)};
  return {etcd::txn_delete(held.key)};
}

// `e` granted now: held once, with a fresh lock id; what writes it (under `lease`) and
// reads the key's version (`vkey`; none when empty), last.
json::array grant_writes(Entry& e, Micros now, std::int64_t lease, const std::string& vkey) {
  e.held = true;
  e.upgrade = false;
  e.hold_count = 1;
  e.acquired_at = now;
  e.lease_expires_at = now + e.lease_ms * 1000;
  e.lock_id = random_token();
  json::array writes{etcd::txn_put(e.key, etcd::encode_entry(e), lease)};
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
// deletes of them, for the transaction that decides.
json::array drop_ended(Queue& q, Micros now) {
  json::array deletes;
  for (auto it = q.begin(); it != q.end();) {
    if (!it->held || it->ends_at() > now) {
      ++it;
      continue;
    }
    deletes.push_back(etcd::txn_delete(it->key));
    it = q.erase(it);
  }
  return deletes;
}

// A lend of `lock_key` to `broker` (docs/etcd-store.md): one write holder, the
// party "broker:<id>", with no lease or hold cap.
Entry lend_entry(const std::string& lock_key, const std::string& broker, std::int64_t slot, Micros now) {
  Entry e;
  const std::string name = broker + "-lend-" + random_token().substr(0, 12);
  e.key = etcd::queue_key(lock_key, name);
  e.lock_key = lock_key;
  e.mode = LockMode::Write;
  e.owner = e.session = "broker:" + broker;
  e.broker = broker;
  e.lock_id = name;
  e.held = e.lend = true;
  e.hold_count = 1;
  e.requested_at = e.acquired_at = now;
  e.slot = slot;
  return e;
}

// A lent lock as an ordinary held entry of `lend`'s broker, in the lend's place (its
// fence, and the lend's key prefix, which tells its name from other entries').
Entry adopted_entry(const Lock& l, const Entry& lend) {
  Entry e;
  e.key = lend.key + "-" + random_token().substr(0, 12);
  e.lock_key = l.key;
  e.mode = l.mode;
  e.owner = l.owner;
  e.session = l.session;
  e.broker = lend.broker;
  e.lock_id = l.lock_id;
  e.attach = random_token().substr(0, 16);
  e.op = new_op();
  e.held = true;
  e.hold_count = l.hold_count;
  e.requested_at = e.acquired_at = l.acquired_at;
  e.lease_expires_at = l.lease_expires_at;
  e.lease_ms = l.lease_ms;
  e.max_hold_ms = l.max_hold_ms;
  e.agent = l.who.agent;
  e.pid = l.who.pid;
  e.command = l.who.command;
  e.slot = lend.slot;
  e.fixed_fence = l.fence;
  return e;
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

}  // namespace etcd_parts

using namespace etcd_parts;

Result<etcd::TxnResult> EtcdService::txn(EtcdClient& c, const std::string& lock_key, const json::array& compares,
                                         const json::array& success, const json::array& failure, Retry retry,
                                         etcd::Share share) {
  Result<etcd::TxnResult> r = batcher_.txn(c, lock_key, share, compares, success, failure, retry);
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

EtcdService::Outcome EtcdService::acquire_job(EtcdClient& c, std::int64_t slot, const AcquireParams& p, Entry fresh,
                                              Micros now, bool may_lend) {
  using K = Outcome::Kind;
  const std::string prefix = etcd::queue_prefix(p.key), end = etcd::prefix_end(prefix);
  const std::string vkey = etcd::version_key(p.key);
  const Session s = session();
  if (!s.lease) return {K::Unavailable, {}, 0, "this broker has no etcd session (taking a new one)"};
  const std::int64_t lease = s.lease;
  fresh.broker = s.id;
  fresh.slot = slot;
  etcd::SpaceMirror::KeyView view = mirror_->view(p.key);
  Queue q = std::move(view.queue);
  std::int64_t rev = view.revision;
  std::uint64_t version = view.version;
  if (q.empty() || rev < written_.load()) {
    // Most keys have no queue: one transaction that holds only while the queue is
    // empty (no key in its range has a version) takes the lock without waiting for
    // the mirror to catch up; otherwise its failure branch reads the queue.
    // (Lent: the queue's one entry is the lend, and the client's grant is made in
    // this broker's lent table.)
    Entry mine = may_lend ? lend_entry(p.key, s.id, slot, now) : fresh;
    mine.op = new_op();
    json::array success = may_lend ? json::array{etcd::txn_put(mine.key, etcd::encode_entry(mine), lease),
                                                 etcd::txn_range(vkey)}
                                   : grant_writes(mine, now, lease, vkey);
    const K kind = may_lend ? K::Lent : K::Granted;
    Result<etcd::TxnResult> r = txn(c, p.key, {etcd::compare_range(prefix, end, "VERSION", "EQUAL", 0)}, success,
                                    {etcd::txn_range(prefix, end), etcd::txn_range(vkey)}, Retry::Idempotent,
                                    etcd::Share::Alone);
    if (!r.ok()) {
      if (std::optional<Entry> e = applied(c, mine.key, mine.op)) {
        if (!may_lend) remember(*e);
        return {kind, *e, version, ""};
      }
      return {K::Unavailable, mine, 0, "etcd: " + r.message()};  // (what it may have made)
    }
    if (r->succeeded) {
      mine.create_revision = mine.mod_revision = r->revision;
      mine.etcd_lease = lease;
      if (!may_lend) remember(mine);
      return {kind, mine, version_from(*r, success.size() - 1), ""};
    }
    q = queue_from(*r, 0);
    version = version_from(*r, 1);
    rev = r->revision;
  }
  bool recalled = false;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    // Lent to this broker (by an acquire beside this one): served from its table.
    if (!q.empty() && q.front().lend && q.front().broker == s.id) return {K::Lent, q.front(), version, ""};
    if (!q.empty() && q.front().lend && !recalled) {
      // Another broker's lend, whose locks only it knows (maybe none, maybe this
      // owner's, to enter again): it is asked to hand the key back first, and the
      // request is decided on the queue as it then is.
      recalled = true;
      if (Status st = recall(c, {q.front()}); !st.ok()) return {K::Unavailable, {}, 0, st.message()};
      etcd::SpaceMirror::KeyView again = mirror_->view(p.key);
      q = std::move(again.queue);
      rev = again.revision;
      version = again.version;
      continue;
    }
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
    etcd::Share share = etcd::Share::Decides;
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
      share = etcd::Share::Alone;
      compares.push_back(etcd::compare(result.key, "CREATE", "EQUAL", 0));
      if (now_free) {
        success = grant_writes(result, now, lease, vkey);
      } else if (p.timeout_ms && *p.timeout_ms <= 0) {
        // A try refused on the mirror's view: refused only once etcd's own queue says
        // the same (a release a moment ago, on another broker, may not be in the view).
        Result<etcd::RangeResult> now_q = c.range(etcd::range_request(prefix, end));
        if (!now_q.ok()) return {K::Unavailable, {}, 0, "etcd: " + now_q.message()};
        Queue fresh_q = queue_of(*now_q);
        auto same = [](const Queue& a, const Queue& b) {
          return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const Entry& x, const Entry& y) {
            return x.key == y.key && x.mod_revision == y.mod_revision;
          });
        };
        if (same(q, fresh_q)) return {K::Timeout, {}, 0, ""};
        q = std::move(fresh_q);
        rev = now_q->revision;
        continue;
      } else {
        // A waiting entry needs no view of the queue: its place is its create revision.
        compares = {etcd::compare(result.key, "CREATE", "EQUAL", 0)};
        success = {etcd::txn_put(result.key, etcd::encode_entry(result), lease)};
        sweeps.clear();  // (no view of the queue behind this write)
        share = etcd::Share::Append;
        kind = K::Queued;
      }
    }
    for (auto& op : sweeps) success.insert(success.begin(), std::move(op));
    Result<etcd::TxnResult> r = txn(c, p.key, compares, success, failure, retry, share);
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
  bool lend_seen = false;
  if (std::optional<std::string> cycle = cycle_of(e, &lend_seen)) {
    Result<etcd::TxnResult> r = txn(c, e.lock_key, {etcd::compare(e.key, "MOD", "EQUAL", e.mod_revision)},
                                      {etcd::txn_delete(e.key)}, {}, Retry::Idempotent);
    if (!r.ok()) log(LogLevel::Warn, "broker", "could not remove the refused request ", e.key, ": ", r.message());
    return {K::Deadlock, {}, 0, *cycle};
  }
  Outcome o{K::Queued, std::move(e), 0, ""};
  o.lend_seen = lend_seen;
  return o;
}

std::optional<std::string> EtcdService::cycle_of(const Entry& e, bool* lend_seen) const {
  // (A cycle is made of waits; and its own queue, whose holders it waits for, though the
  // mirror may not show it waiting yet.)
  etcd::Space space = mirror_->contested(e.lock_key);
  for (auto& [key, q] : space)
    q.erase(std::remove_if(q.begin(), q.end(), [&](const Entry& x) { return etcd::queue_order(e, x); }),
            q.end());
  Queue& own = space[e.lock_key];
  if (!find_entry(own, e.key)) {
    own.push_back(e);
    std::sort(own.begin(), own.end(), etcd::queue_order);
  }
  *lend_seen = false;
  for (const auto& [key, q] : space)
    for (const Entry& x : q) *lend_seen = *lend_seen || x.lend;
  return etcd::deadlock(space, e);
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
    Result<etcd::TxnResult> r = txn(c, lock_key, compares, success, failure, retry);
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

EtcdService::Adoption EtcdService::adopt_job(EtcdClient& c, const Entry& lend, std::vector<Entry> entries, Micros now) {
  using A = Adoption::Kind;
  // Whether the adoption's writes are in etcd (its first entry's mark says), which
  // is then done.
  auto applied_already = [&]() -> std::optional<Adoption> {
    if (entries.empty()) return std::nullopt;
    std::optional<Entry> e = applied(c, entries.front().key, entries.front().op);
    if (!e) return std::nullopt;
    for (Entry& x : entries) {
      x.create_revision = x.mod_revision = e->create_revision;
      x.etcd_lease = lend.etcd_lease;
    }
    return Adoption{A::Done, std::move(entries), ""};
  };
  for (int attempt = 0; attempt < 2; ++attempt) {
    json::array compares{etcd::compare(lend.key, "MOD", "EQUAL", lend.mod_revision)};
    // (and the other brokers' recall keys: asked and answered)
    const std::string recalls = etcd::recall_prefix(lend.lock_key);
    json::array success{etcd::txn_delete(lend.key), etcd::txn_delete(recalls, etcd::prefix_end(recalls))};
    for (const Entry& e : entries) success.push_back(etcd::txn_put(e.key, etcd::encode_entry(e), lend.etcd_lease));
    // Nothing held under the lend: the next in line is granted at once (as a release
    // does), on the first try (a failed compare: the plain adoption, and their
    // brokers grant them).
    if (entries.empty() && attempt == 0)
      for (auto& w : hand_off(mirror_->queue(lend.lock_key), lend, now, &compares)) success.push_back(std::move(w));
    Result<etcd::TxnResult> r =
        txn(c, lend.lock_key, compares, success, {etcd::txn_range(lend.key)}, Retry::Idempotent, etcd::Share::Alone);
    if (!r.ok()) {
      // No answer in time: applied or not, as its first put (or the lend's absence) says.
      if (!entries.empty()) {
        if (std::optional<Adoption> done = applied_already()) return std::move(*done);
      } else if (Result<etcd::RangeResult> now_r = c.range(etcd::range_request(lend.key)); now_r.ok() && now_r->kvs.empty()) {
        return {A::Done, {}, ""};
      }
      return {A::Failed, {}, "etcd: " + r.message()};
    }
    if (r->succeeded) {
      for (Entry& x : entries) {
        x.create_revision = x.mod_revision = r->revision;
        x.etcd_lease = lend.etcd_lease;
      }
      return {A::Done, std::move(entries), ""};
    }
    if (queue_from(*r, 0).empty()) {
      // The lend is gone: this adoption's own first try, applied though its answer was
      // lost (its entries say), or the end of this broker's session.
      if (entries.empty()) return {A::Done, {}, ""};
      if (std::optional<Adoption> done = applied_already()) return std::move(*done);
      return {A::Lost, {}, ""};
    }
  }
  return {A::Failed, {}, "the queue of '" + lend.lock_key + "' kept changing"};
}

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
  if (mirrored && mirrored->lend) mirrored.reset();  // (a lend's name is no lock's id)
  if (!mirrored) {
    // A lock lent to another broker (its id: "<lend's name>.<n>"): that broker is
    // asked to hand its key back, and the lock is then an entry like any other.
    const std::string::size_type dot = lock_id.rfind('.');
    std::optional<Entry> lend = dot == std::string::npos ? std::nullopt : mirror_->find_lock(lock_id.substr(0, dot));
    if (lend && lend->lend && lend->broker != session().id) {
      if (Status s = recall(c, {*lend}); !s.ok()) return s;
      mirrored = mirror_->find_lock(lock_id);
    }
  }
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
  // Granted a moment ago on another broker, and not in the mirror yet: the mirror is
  // brought up to the newest change of any queue entry (one read: the entry changed
  // last; etcd's own revision may be ahead for keys the mirror never hears of), and
  // asked again. (A grant costs no index key of its own; this path is the rare one.)
  const std::string queues = etcd::all_queues_prefix();
  json::object newest = etcd::range_request(queues, etcd::prefix_end(queues));
  newest["sort_order"] = "DESCEND";
  newest["sort_target"] = "MOD";
  newest["limit"] = 1;
  newest["keys_only"] = true;
  Result<etcd::RangeResult> last = c.range(newest);
  if (!last.ok()) return last.status();
  const std::int64_t wanted = last->kvs.empty() ? 0 : last->kvs.front().mod_revision;
  const bool reached = mirror_->wait_for(wanted, kMirrorWait);
  if (std::optional<Entry> e = mirror_->find_lock(lock_id); e && e->held) return e;
  if (!reached)
    return Status::failure("this broker's view of etcd is behind (revision " + std::to_string(mirror_->revision()) +
                           " of " + std::to_string(wanted) + ")");
  return std::optional<Entry>();
}

}  // namespace gate
