#include "broker/lock_json.h"

#include <cmath>

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
                   get_millis(o, "max_hold_ms", &p.max_hold_ms),
                   get_short_string(o, "agent", kMaxAgentBytes, &p.who.agent),
                   get_short_string(o, "command", kMaxCommandBytes, &p.who.command),
                   get_pid(o, &p.who.pid)})
    if (!s.ok()) return s;
  if (p.key.empty()) {
    return Status::failure("field 'path' must not be empty");
  }
  if (p.key.size() > defaults::kMaxKeyBytes) {
    return Status::failure("field 'path' is longer than " + std::to_string(defaults::kMaxKeyBytes) + " bytes");
  }
  if (p.owner.empty()) {
    return Status::failure("field 'owner' must not be empty");
  }
  auto m = parse_lock_mode(mode);
  if (!m) {
    return Status::failure("field 'mode' must be \"read\" or \"write\", not \"" + mode.substr(0, 32) + "\"");
  }
  p.mode = *m;
  if (p.lease_ms && *p.lease_ms == 0) p.lease_ms.reset();
  return p;
}

}  // namespace gate
