#include "etcd/etcd_space.h"

#include <boost/json.hpp>

#include <limits>
#include <set>

namespace gate::etcd {

namespace json = boost::json;

std::string hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out;
}

std::optional<std::string> unhex(std::string_view text) {
  if (text.size() % 2 != 0) return std::nullopt;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out;
  for (std::size_t i = 0; i < text.size(); i += 2) {
    const int hi = digit(text[i]), lo = digit(text[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi << 4 | lo);
  }
  return out;
}

std::string all_queues_prefix() { return std::string(kRoot) + "q/"; }
std::string queue_prefix(std::string_view lock_key) { return all_queues_prefix() + hex(lock_key) + "/"; }
std::string queue_key(std::string_view lock_key, std::string_view request) {
  return queue_prefix(lock_key) + std::string(request);
}
std::string version_key(std::string_view lock_key) { return std::string(kRoot) + "v/" + hex(lock_key); }
std::string broker_key(std::string_view broker) { return std::string(kRoot) + "b/" + std::string(broker); }

namespace {

// The lock key of `key` = <prefix><hex>/<name>; nullopt for any other shape.
std::optional<std::string> lock_key_under(std::string_view key, const std::string& prefix) {
  if (key.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::string_view rest = key.substr(prefix.size());
  const auto slash = rest.find('/');
  if (slash == std::string_view::npos || slash == 0 || slash + 1 == rest.size()) return std::nullopt;
  return unhex(rest.substr(0, slash));
}

}  // namespace

std::optional<std::string> lock_key_of(std::string_view queue_key) {
  return lock_key_under(queue_key, all_queues_prefix());
}

std::string all_recalls_prefix() { return std::string(kRoot) + "r/"; }
std::string recall_prefix(std::string_view lock_key) { return all_recalls_prefix() + hex(lock_key) + "/"; }
std::string recall_key(std::string_view lock_key, std::string_view asker) {
  return recall_prefix(lock_key) + std::string(asker);
}
std::optional<std::string> lock_key_of_recall(std::string_view recall_key) {
  return lock_key_under(recall_key, all_recalls_prefix());
}

Micros Entry::ends_at() const {
  if (lend) return std::numeric_limits<Micros>::max();
  Micros end = lease_expires_at;
  if (max_hold_ms) end = std::min(end, acquired_at + *max_hold_ms * 1000);
  return end;
}

// Short field names (docs/etcd-store.md has their table): every grant and release
// sends an entry through etcd's JSON gateway, whose cost grows with the bytes. The
// lock key is the queue key's (not repeated); held means a hold count of 1 or more.
std::string encode_entry(const Entry& e) {
  json::object o{{"m", e.mode == LockMode::Write ? "w" : "r"}, {"o", e.owner}, {"rq", e.requested_at}, {"l", e.lease_ms}};
  for (const auto& [field, value] : {std::pair{"s", &e.session}, std::pair{"b", &e.broker},
                                     std::pair{"r", &e.request_id}, std::pair{"id", &e.lock_id},
                                     std::pair{"ag", &e.agent}, std::pair{"cmd", &e.command},
                                     std::pair{"at", &e.attach}, std::pair{"op", &e.op}})
    if (!value->empty()) o[field] = *value;
  if (e.upgrade) o["up"] = true;
  if (e.held) {
    o["n"] = e.hold_count;
    o["aq"] = e.acquired_at;
    o["ex"] = e.lease_expires_at;
  }
  if (e.max_hold_ms) o["mh"] = *e.max_hold_ms;
  if (e.pid > 0) o["pid"] = e.pid;
  if (e.slot > 0) o["sl"] = e.slot;
  if (e.fixed_fence) o["f"] = e.fixed_fence;
  if (e.lend) o["ln"] = true;
  return json::serialize(o);
}

Result<Entry> decode_entry(const KeyValue& kv) {
  auto bad = [&](const std::string& why) { return Status::failure("queue entry " + kv.key + ": " + why); };
  const std::optional<std::string> lock_key = lock_key_of(kv.key);
  if (!lock_key) return bad("not a queue key");
  boost::system::error_code ec;
  json::value v = json::parse(kv.value, ec);
  if (ec || !v.is_object()) return bad("its value is not JSON");
  const json::object& o = v.as_object();
  Entry e;
  e.key = kv.key;
  e.lock_key = *lock_key;
  e.create_revision = kv.create_revision;
  e.mod_revision = kv.mod_revision;
  e.etcd_lease = kv.lease;
  auto text = [&](const char* field, std::string& out) {
    if (const json::value* f = o.if_contains(field); f && f->is_string()) out = std::string(f->as_string());
  };
  auto number = [&](const char* field, std::int64_t& out) {
    if (const json::value* f = o.if_contains(field); f && f->is_int64()) out = f->as_int64();
  };
  std::string mode;
  text("m", mode);
  if (mode != "w" && mode != "r") return bad("mode '" + mode + "'");
  e.mode = mode == "w" ? LockMode::Write : LockMode::Read;
  text("o", e.owner);
  if (e.owner.empty()) return bad("no owner");
  text("s", e.session);
  text("b", e.broker);
  text("r", e.request_id);
  text("id", e.lock_id);
  text("at", e.attach);
  text("op", e.op);
  text("ag", e.agent);
  text("cmd", e.command);
  number("pid", e.pid);
  number("sl", e.slot);
  if (e.slot < 0 || e.slot >= kFenceSlots) return bad("slot " + std::to_string(e.slot));
  if (const json::value* u = o.if_contains("up"); u && u->is_bool()) e.upgrade = u->as_bool();
  number("n", e.hold_count);
  if (e.hold_count < 0) return bad("a hold count of " + std::to_string(e.hold_count));
  e.held = e.hold_count > 0;
  number("rq", e.requested_at);
  number("aq", e.acquired_at);
  number("ex", e.lease_expires_at);
  number("l", e.lease_ms);
  if (const json::value* c = o.if_contains("mh"); c && c->is_int64()) e.max_hold_ms = c->as_int64();
  if (const json::value* f = o.if_contains("f")) {
    if (f->is_uint64()) e.fixed_fence = f->as_uint64();
    else if (f->is_int64() && f->as_int64() > 0) e.fixed_fence = static_cast<std::uint64_t>(f->as_int64());
    // (a lent grant's fence is one after its lend's own, never an entry's own)
    if (!e.fixed_fence || e.fixed_fence % kSlotFences == 0) return bad("fence " + json::serialize(*f));
  }
  if (const json::value* l = o.if_contains("ln")) {
    if (!l->is_bool()) return bad("lend " + json::serialize(*l));
    e.lend = l->as_bool();
  }
  if (e.lend && (e.mode != LockMode::Write || !e.held || e.fixed_fence))
    return bad("a lend entry must be a held write with no fence of its own");
  return e;
}

namespace {

// Whether `earlier` must go before `later` may be held (of another owner, and not
// both reads).
bool blocks(const Entry& earlier, const Entry& later) {
  if (earlier.owner == later.owner) return false;
  return earlier.mode == LockMode::Write || later.mode == LockMode::Write;
}

}  // namespace

const Entry* find_entry(const Queue& q, std::string_view key) {
  for (const Entry& e : q)
    if (e.key == key) return &e;
  return nullptr;
}

std::vector<Standing> standings(const Queue& q) {
  std::vector<Standing> out(q.size(), Standing::Waiting);
  for (std::size_t i = 0; i < q.size(); ++i) {
    if (q[i].held) {
      out[i] = Standing::Held;
      continue;
    }
    bool free = true;
    for (std::size_t j = 0; j < i && free; ++j) free = !blocks(q[j], q[i]);
    if (free) out[i] = Standing::Grantable;
  }
  return out;
}

const Entry* held_by(const Queue& q, std::string_view owner) {
  for (const Entry& e : q)
    if (e.held && e.owner == owner) return &e;
  return nullptr;
}

const Entry* upgrade_target(const Queue& q, std::size_t i) {
  return q.at(i).upgrade ? held_by(q, q[i].owner) : nullptr;
}

std::vector<const Entry*> expired(const Queue& q, Micros now) {
  std::vector<const Entry*> out;
  for (const Entry& e : q)
    if (e.held && e.ends_at() <= now) out.push_back(&e);
  return out;
}

Reentry reentry(const Queue& q, std::string_view owner, LockMode mode) {
  const Entry* mine = held_by(q, owner);
  if (!mine) return Reentry::None;
  if (mine->mode == LockMode::Write || mode == LockMode::Read) return Reentry::Again;
  bool alone = true;
  for (const Entry& e : q) {
    // (an upgrade whose owner's read has ended is a plain write by now)
    if (e.upgrade && !e.held && e.owner != owner && held_by(q, e.owner)) return Reentry::Deadlock;
    alone = alone && (!e.held || e.owner == owner);
  }
  return alone ? Reentry::UpgradeNow : Reentry::Upgrade;
}

// As LockTable::find_deadlock: who must move before an entry may be held are the
// entries before it that block it, held or waiting; a chain of such waits through
// the sessions' other waiting entries that reaches a lock held by the waiter's own
// session is a deadlock.
std::optional<std::string> deadlock(const Space& space, const Entry& waiter) {
  const std::string& self = waiter.party();
  // Every session's waiting entries, and where each one stands in its queue.
  std::map<std::string, std::vector<std::pair<const Queue*, std::size_t>>> waiting;
  for (const auto& [key, q] : space)
    for (std::size_t i = 0; i < q.size(); ++i)
      if (!q[i].held) waiting[q[i].party()].push_back({&q, i});

  std::set<std::string> seen_sessions;
  std::set<std::string> seen_entries{waiter.key};
  std::vector<std::pair<const Queue*, std::size_t>> todo;
  auto it = space.find(waiter.lock_key);
  if (it == space.end()) return std::nullopt;
  for (std::size_t i = 0; i < it->second.size(); ++i)
    if (it->second[i].key == waiter.key) todo.push_back({&it->second, i});

  auto visit_session = [&](const std::string& s) {
    if (!seen_sessions.insert(s).second) return;
    for (const auto& w : waiting[s])
      if (seen_entries.insert((*w.first)[w.second].key).second) todo.push_back(w);
  };
  while (!todo.empty()) {
    const auto [q, at] = todo.back();
    todo.pop_back();
    const Entry& r = (*q)[at];
    for (std::size_t j = 0; j < at; ++j) {
      const Entry& e = (*q)[j];
      if (!blocks(e, r)) continue;
      if (e.held && e.party() == self)
        return "session " + self + " would wait for '" + r.lock_key + "', which it holds itself (" +
               to_string(e.mode) + ")";
      if (!e.held && seen_entries.insert(e.key).second) todo.push_back({q, j});
      if (e.party() != self) visit_session(e.party());
    }
  }
  return std::nullopt;
}

}  // namespace gate::etcd
