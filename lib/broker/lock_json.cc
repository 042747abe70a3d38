#include "broker/lock_json.h"

#include <cmath>
#include <limits>

#include "core/config.h"

namespace gate {

namespace json = boost::json;

namespace {

// Holder descriptions are for people: short, bounded.
constexpr std::size_t kMaxAgentBytes = 128;
constexpr std::size_t kMaxCommandBytes = 256;

// "agent", "pid", "command": null when the client did not say.
void put_holder(json::object& o, const HolderInfo& who) {
  if (who.agent.empty()) o["agent"] = nullptr;
  else o["agent"] = who.agent;
  if (who.pid > 0) o["pid"] = who.pid;
  else o["pid"] = nullptr;
  if (who.command.empty()) o["command"] = nullptr;
  else o["command"] = who.command;
}

// An optional string field, at most `limit` bytes.
Status get_short_string(const json::object& o, const char* field, std::size_t limit,
                        std::string* out) {
  if (Status s = get_string(o, field, false, out); !s.ok()) return s;
  if (out->size() > limit)
    return Status::failure(std::string("field '") + field + "' is longer than " +
                           std::to_string(limit) + " bytes");
  return {};
}

Status get_pid(const json::object& o, std::int64_t* out) {
  auto it = o.find("pid");
  if (it == o.end() || it->value().is_null()) return {};
  const json::value& v = it->value();
  if (v.is_int64() && v.as_int64() >= 0 && v.as_int64() <= (std::int64_t{1} << 32)) {
    *out = v.as_int64();
    return {};
  }
  if (v.is_uint64() && v.as_uint64() <= (std::uint64_t{1} << 32)) {
    *out = static_cast<std::int64_t>(v.as_uint64());
    return {};
  }
  return Status::failure("field 'pid' must be a process id (a non-negative integer) or null");
}

// "agent", "command", "pid" (put_holder's), each optional.
Status get_holder(const json::object& o, HolderInfo* who) {
  for (Status s : {get_short_string(o, "agent", kMaxAgentBytes, &who->agent),
                   get_short_string(o, "command", kMaxCommandBytes, &who->command), get_pid(o, &who->pid)})
    if (!s.ok()) return s;
  return {};
}

}  // namespace

json::object lock_to_json(const Lock& l, std::uint64_t version, json::storage_ptr storage) {
  json::object o(std::move(storage));
  o["lock_id"] = l.lock_id;
  o["path"] = l.key;
  o["mode"] = to_string(l.mode);
  o["owner"] = l.owner;
  o["acquired_at"] = format_iso8601(l.acquired_at);
  o["lease_expires_at"] = format_iso8601(l.lease_expires_at);
  if (l.max_hold_ms) o["max_hold_ms"] = *l.max_hold_ms;
  else o["max_hold_ms"] = nullptr;
  o["hold_count"] = l.hold_count;
  o["fence"] = l.fence;
  o["session"] = l.session;
  o["version"] = version;
  put_holder(o, l.who);
  return o;
}

json::object queued_to_json(const QueuedRequest& r) {
  json::object o;
  o["req_id"] = r.req_id;
  o["path"] = r.key;
  o["mode"] = to_string(r.mode);
  o["owner"] = r.owner;
  o["session"] = r.session;
  o["requested_at"] = format_iso8601(r.requested_at);
  put_holder(o, r.who);
  return o;
}

Result<json::object> parse_body_object(const std::string& body, json::storage_ptr storage) {
  json::error_code ec;
  json::value v = json::parse(body, ec, std::move(storage));
  if (ec) {
    return Status::failure("body is not valid JSON: " + ec.message());
  }
  if (!v.is_object()) {
    return Status::failure("body must be a JSON object");
  }
  return std::move(v.as_object());
}

Status get_string(const json::object& o, const char* field, bool required, std::string* out) {
  auto it = o.find(field);
  if (it == o.end() || it->value().is_null()) {
    if (!required) return {};
    return Status::failure(std::string("missing field '") + field + "'");
  }
  if (!it->value().is_string()) {
    return Status::failure(std::string("field '") + field + "' must be a string");
  }
  *out = std::string(it->value().as_string());
  return {};
}

Status get_millis(const json::object& o, const char* field, std::optional<std::int64_t>* out) {
  auto it = o.find(field);
  if (it == o.end() || it->value().is_null()) return {};
  const json::value& v = it->value();
  double d;
  if (v.is_int64()) d = static_cast<double>(v.as_int64());
  else if (v.is_uint64()) d = static_cast<double>(v.as_uint64());
  else if (v.is_double()) d = v.as_double();
  else {
    return Status::failure(std::string("field '") + field + "' must be a number of milliseconds or null");
  }
  // At most about 100 years, so that microsecond arithmetic cannot overflow.
  if (!std::isfinite(d) || d < 0 || d > 3.2e12) {
    return Status::failure(std::string("field '") + field + "' must be between 0 and 3.2e12");
  }
  *out = static_cast<std::int64_t>(d);
  return {};
}

Status get_bool(const json::object& o, const char* field, bool* out) {
  auto it = o.find(field);
  if (it == o.end() || it->value().is_null()) return {};
  if (!it->value().is_bool())
    return Status::failure(std::string("field '") + field + "' must be true or false");
  *out = it->value().as_bool();
  return {};
}

Result<AcquireParams> parse_acquire(const json::object& o) {
  AcquireParams p;
  std::string mode;
  for (Status s : {get_string(o, "path", true, &p.key), get_string(o, "mode", true, &mode),
                   get_string(o, "owner", true, &p.owner), get_string(o, "session", false, &p.session),
                   get_string(o, "request_id", false, &p.request_id),
                   get_millis(o, "timeout_ms", &p.timeout_ms), get_millis(o, "lease_ms", &p.lease_ms),
                   get_millis(o, "max_hold_ms", &p.max_hold_ms), get_holder(o, &p.who)})
    if (!s.ok()) return s;
  auto m = parse_lock_mode(mode);
  if (!m) {
    return Status::failure("field 'mode' must be \"read\" or \"write\", not \"" + mode.substr(0, 32) + "\"");
  }
  p.mode = *m;
  if (Status s = check_acquire(p); !s.ok()) return s;
  return p;
}

Status check_acquire(AcquireParams& p) {
  if (p.key.empty()) {
    return Status::failure("field 'path' must not be empty");
  }
  if (p.key.size() > defaults::kMaxKeyBytes) {
    return Status::failure("field 'path' is longer than " + std::to_string(defaults::kMaxKeyBytes) + " bytes");
  }
  if (p.owner.empty()) {
    return Status::failure("field 'owner' must not be empty");
  }
  if (p.lease_ms && *p.lease_ms == 0) p.lease_ms.reset();
  return {};
}

namespace {

Status get_count(const json::object& o, const char* field, bool required, std::uint64_t* out) {
  auto it = o.find(field);
  if (it == o.end() || it->value().is_null()) {
    if (!required) return {};
    return Status::failure(std::string("missing field '") + field + "'");
  }
  const json::value& v = it->value();
  if (v.is_uint64()) *out = v.as_uint64();
  else if (v.is_int64() && v.as_int64() >= 0) *out = static_cast<std::uint64_t>(v.as_int64());
  else return Status::failure(std::string("field '") + field + "' must be a non-negative integer");
  return {};
}

Status get_micros(const json::object& o, const char* field, bool required, Micros* out) {
  std::uint64_t v = 0;
  if (Status s = get_count(o, field, required, &v); !s.ok()) return s;
  if (v > static_cast<std::uint64_t>(std::numeric_limits<Micros>::max()))
    return Status::failure(std::string("field '") + field + "' is out of range");
  if (o.contains(field) && !o.at(field).is_null()) *out = static_cast<Micros>(v);
  return {};
}

Status get_mode(const json::object& o, LockMode* out) {
  std::string mode;
  if (Status s = get_string(o, "mode", true, &mode); !s.ok()) return s;
  auto m = parse_lock_mode(mode);
  if (!m) return Status::failure("field 'mode' must be \"read\" or \"write\"");
  *out = *m;
  return {};
}

const json::array* get_array(const json::object& o, const char* field, Status* status) {
  auto it = o.find(field);
  if (it == o.end() || !it->value().is_array()) {
    *status = Status::failure(std::string("field '") + field + "' must be an array");
    return nullptr;
  }
  return &it->value().as_array();
}

}  // namespace

json::object state_to_json(const TableState& s) {
  json::array locks, queue;
  for (const Lock& l : s.locks) {
    json::object o;
    o["lock_id"] = l.lock_id;
    o["path"] = l.key;
    o["mode"] = to_string(l.mode);
    o["owner"] = l.owner;
    o["session"] = l.session;
    o["acquired_at_us"] = l.acquired_at;
    o["lease_expires_at_us"] = l.lease_expires_at;
    o["lease_ms"] = l.lease_ms;
    if (l.max_hold_ms) o["max_hold_ms"] = *l.max_hold_ms;
    o["hold_count"] = l.hold_count;
    o["fence"] = l.fence;
    put_holder(o, l.who);
    locks.push_back(std::move(o));
  }
  for (const QueuedRequest& r : s.queue) {
    json::object o;
    o["path"] = r.key;
    o["mode"] = to_string(r.mode);
    o["owner"] = r.owner;
    o["session"] = r.session;
    o["request_id"] = r.request_id;
    o["requested_at_us"] = r.requested_at;
    o["lease_ms"] = r.lease_ms;
    if (r.max_hold_ms) o["max_hold_ms"] = *r.max_hold_ms;
    if (r.deadline) o["deadline_us"] = *r.deadline;
    put_holder(o, r.who);
    queue.push_back(std::move(o));
  }
  json::object versions;
  for (const auto& [key, v] : s.versions) versions[key] = v;
  json::object o;
  o["locks"] = std::move(locks);
  o["queue"] = std::move(queue);
  o["versions"] = std::move(versions);
  o["next_fence"] = s.next_fence;
  return o;
}

Result<TableState> state_from_json(const json::object& o) {
  TableState s;
  Status status;
  const json::array* locks = get_array(o, "locks", &status);
  const json::array* queue = locks ? get_array(o, "queue", &status) : nullptr;
  if (!queue) return status;
  for (const json::value& v : *locks) {
    if (!v.is_object()) return Status::failure("each of 'locks' must be an object");
    const json::object& j = v.as_object();
    Lock l;
    std::uint64_t hold = 0;
    std::optional<std::int64_t> lease;
    for (Status st : {get_string(j, "lock_id", true, &l.lock_id), get_string(j, "path", true, &l.key),
                      get_mode(j, &l.mode), get_string(j, "owner", true, &l.owner),
                      get_string(j, "session", false, &l.session),
                      get_micros(j, "acquired_at_us", true, &l.acquired_at),
                      get_micros(j, "lease_expires_at_us", true, &l.lease_expires_at),
                      get_millis(j, "lease_ms", &lease), get_millis(j, "max_hold_ms", &l.max_hold_ms),
                      get_count(j, "hold_count", true, &hold), get_count(j, "fence", true, &l.fence),
                      get_holder(j, &l.who)})
      if (!st.ok()) return Status::failure("a lock: " + st.message());
    l.lease_ms = lease.value_or(0);
    l.hold_count = static_cast<std::int64_t>(std::min<std::uint64_t>(hold, 1u << 30));
    s.locks.push_back(std::move(l));
  }
  for (const json::value& v : *queue) {
    if (!v.is_object()) return Status::failure("each of 'queue' must be an object");
    const json::object& j = v.as_object();
    QueuedRequest r;
    std::optional<std::int64_t> lease;
    Micros deadline = -1;
    for (Status st : {get_string(j, "path", true, &r.key), get_mode(j, &r.mode),
                      get_string(j, "owner", true, &r.owner), get_string(j, "session", false, &r.session),
                      get_string(j, "request_id", false, &r.request_id),
                      get_micros(j, "requested_at_us", true, &r.requested_at),
                      get_millis(j, "lease_ms", &lease), get_millis(j, "max_hold_ms", &r.max_hold_ms),
                      get_micros(j, "deadline_us", false, &deadline), get_holder(j, &r.who)})
      if (!st.ok()) return Status::failure("a queued request: " + st.message());
    r.lease_ms = lease.value_or(0);
    if (deadline >= 0) r.deadline = deadline;
    r.req_id = s.queue.size() + 1;  // its place; the adopting table numbers it anew
    s.queue.push_back(std::move(r));
  }
  if (auto it = o.find("versions"); it != o.end() && !it->value().is_null()) {
    if (!it->value().is_object()) return Status::failure("field 'versions' must be an object");
    for (const auto& kv : it->value().as_object()) {
      std::uint64_t v = 0;
      if (kv.value().is_uint64()) v = kv.value().as_uint64();
      else if (kv.value().is_int64() && kv.value().as_int64() >= 0) v = static_cast<std::uint64_t>(kv.value().as_int64());
      else return Status::failure("each of 'versions' must be a non-negative integer");
      s.versions[std::string(kv.key())] = v;
    }
  }
  if (Status st = get_count(o, "next_fence", false, &s.next_fence); !st.ok()) return st;
  return s;
}

Result<ReleaseParams> parse_release(const std::string& body) {
  ReleaseParams p;
  unsigned char scratch[2048];
  json::monotonic_resource mr(scratch, sizeof scratch);
  auto obj = parse_body_object(body, &mr);
  Status valid = obj.status();
  if (valid.ok()) valid = get_string(*obj, "lock_id", true, &p.lock_id);
  if (valid.ok()) valid = get_string(*obj, "owner", true, &p.owner);
  if (valid.ok()) valid = get_bool(*obj, "changed", &p.changed);
  // What the mount did with a stale replacement made under this lock, for /metrics.
  if (valid.ok()) valid = get_string(*obj, "stale", false, &p.stale);
  if (valid.ok() && !p.stale.empty() && p.stale != "merged" && p.stale != "conflict" && p.stale != "refused")
    valid = Status::failure("\"stale\" must be \"merged\", \"conflict\" or \"refused\"");
  if (!valid.ok()) return valid;
  return p;
}

Result<HeartbeatParams> parse_heartbeat(const std::string& body) {
  HeartbeatParams p;
  auto obj = parse_body_object(body);
  Status valid = obj.status();
  if (valid.ok()) valid = get_string(*obj, "lock_id", true, &p.lock_id);
  if (valid.ok()) valid = get_string(*obj, "owner", true, &p.owner);
  if (valid.ok()) valid = get_millis(*obj, "lease_ms", &p.lease_ms);
  if (!valid.ok()) return valid;
  return p;
}

HttpAnswer status_answer(int status, const char* word, const std::string& error) {
  unsigned char scratch[1024];
  json::monotonic_resource mr(scratch, sizeof scratch);
  json::object o(&mr);
  o["status"] = word;
  if (!error.empty()) o["error"] = error;
  return {status, json::serialize(o)};
}

HttpAnswer granted_answer(const Lock& l, std::uint64_t version) {
  // Built in a buffer on the stack: answers are the broker's hottest path.
  unsigned char scratch[4096];
  json::monotonic_resource mr(scratch, sizeof scratch);
  json::object o(&mr);
  o["status"] = "granted";
  o["lock"] = lock_to_json(l, version, &mr);
  return {200, json::serialize(o)};
}

}  // namespace gate
