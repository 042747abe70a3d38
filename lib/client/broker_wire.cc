#include "client/broker_wire.h"

#include <boost/asio/buffer.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include <cctype>

#include "client/wire_key.h"

namespace gate {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;

const char* to_string(CallStatus s) {
  switch (s) {
    case CallStatus::Ok: return "ok";
    case CallStatus::Timeout: return "timeout";
    case CallStatus::Deadlock: return "deadlock";
    case CallStatus::Forbidden: return "forbidden";
    case CallStatus::NotFound: return "not found";
    case CallStatus::BadRequest: return "bad request";
    case CallStatus::Unavailable: return "unavailable";
  }
  return "?";
}

namespace wire {

namespace {

LockInfo lock_from_json(const json::value& v) {
  LockInfo l;
  if (!v.is_object()) return l;
  const auto& o = v.as_object();
  auto str = [&](const char* k) -> std::string {
    auto it = o.find(k);
    return it != o.end() && it->value().is_string() ? std::string(it->value().as_string()) : "";
  };
  auto num = [&](const char* k) -> std::optional<std::int64_t> {
    auto it = o.find(k);
    if (it == o.end()) return std::nullopt;
    if (it->value().is_int64()) return it->value().as_int64();
    if (it->value().is_uint64()) return static_cast<std::int64_t>(it->value().as_uint64());
    if (it->value().is_double()) return static_cast<std::int64_t>(it->value().as_double());
    return std::nullopt;
  };
  l.lock_id = str("lock_id");
  l.key = str("path");
  l.mode = parse_lock_mode(str("mode")).value_or(LockMode::Write);
  l.owner = str("owner");
  l.acquired_at = str("acquired_at");
  l.lease_expires_at = str("lease_expires_at");
  l.max_hold_ms = num("max_hold_ms");
  l.hold_count = num("hold_count").value_or(0);
  l.fence = static_cast<std::uint64_t>(num("fence").value_or(0));
  l.version = static_cast<std::uint64_t>(num("version").value_or(0));
  l.agent = str("agent");
  l.pid = num("pid").value_or(0);
  l.command = str("command");
  return l;
}

}  // namespace

Request acquire(const AcquireRequest& req, std::chrono::milliseconds io_timeout) {
  json::object o;
  o["path"] = wire_key(req.key);
  o["mode"] = to_string(req.mode);
  o["owner"] = req.owner;
  if (req.timeout_ms) o["timeout_ms"] = *req.timeout_ms;
  else o["timeout_ms"] = nullptr;
  if (req.lease_ms) o["lease_ms"] = *req.lease_ms;
  if (req.max_hold_ms) o["max_hold_ms"] = *req.max_hold_ms;
  if (!req.session.empty()) o["session"] = req.session;
  if (!req.request_id.empty()) o["request_id"] = req.request_id;
  if (!req.agent.empty()) o["agent"] = req.agent;
  if (req.pid > 0) o["pid"] = req.pid;
  if (!req.command.empty()) o["command"] = req.command;
  // The answer to a waiting acquire comes when the broker grants it.
  const bool long_wait = !req.timeout_ms || *req.timeout_ms * 2 >= io_timeout.count();
  return {"POST", "/v1/locks/acquire", json::serialize(o), long_wait};
}

Request release(const std::string& lock_id, const std::string& owner, bool changed,
                const std::string& stale) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  if (changed) o["changed"] = true;
  if (!stale.empty()) o["stale"] = stale;
  return {"POST", "/v1/locks/release", json::serialize(o)};
}

Request heartbeat(const std::string& lock_id, const std::string& owner,
                  std::optional<std::int64_t> lease_ms) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  if (lease_ms) o["lease_ms"] = *lease_ms;
  return {"POST", "/v1/locks/heartbeat", json::serialize(o)};
}

Request status(const std::string& key) {
  std::string target = "/v1/locks/status";
  if (!key.empty()) {
    target += "?path=";
    static const char* hex = "0123456789ABCDEF";
    for (unsigned char c : wire_key(key)) {
      if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '/' || c == '~') {
        target.push_back(static_cast<char>(c));
      } else {
        target.push_back('%');
        target.push_back(hex[c >> 4]);
        target.push_back(hex[c & 15]);
      }
    }
  }
  return {"GET", target, ""};
}

Request health() { return {"GET", "/v1/health", ""}; }

std::string http_text(const Request& r, const BrokerEndpoint& to) {
  std::string text = r.method + " " + r.target + " HTTP/1.1\r\nHost: " +
                     (to.unix_socket.empty() ? to.host : std::string("localhost")) +
                     "\r\nUser-Agent: gate\r\n";
  if (!r.body.empty()) text += "Content-Type: application/json\r\n";
  text += "Content-Length: " + std::to_string(r.body.size()) + "\r\n\r\n" + r.body;
  return text;
}

CallResult to_result(const HttpReply& r) {
  CallResult out;
  if (r.status == 0) {
    out.status = CallStatus::Unavailable;
    out.error = r.error;
    return out;
  }
  json::error_code ec;
  json::value v = json::parse(r.body, ec);
  if (!ec && v.is_object()) {
    const auto& o = v.as_object();
    if (auto it = o.find("lock"); it != o.end()) out.lock = lock_from_json(it->value());
    if (auto it = o.find("error"); it != o.end() && it->value().is_string())
      out.error = std::string(it->value().as_string());
  }
  switch (r.status) {
    case 200: out.status = CallStatus::Ok; break;
    case 408: out.status = CallStatus::Timeout; break;
    case 409: out.status = CallStatus::Deadlock; break;
    case 403: out.status = CallStatus::Forbidden; break;
    case 404: out.status = CallStatus::NotFound; break;
    case 400:
    case 413: out.status = CallStatus::BadRequest; break;
    default: out.status = CallStatus::Unavailable; break;
  }
  if (out.status != CallStatus::Ok && out.error.empty())
    out.error = "broker answered HTTP " + std::to_string(r.status);
  return out;
}

std::optional<std::vector<LockInfo>> holders_from(const HttpReply& r, const std::string& key) {
  if (r.status != 200) return std::nullopt;
  json::error_code ec;
  json::value v = json::parse(r.body, ec);
  if (ec || !v.is_object()) return std::nullopt;
  auto it = v.as_object().find("locks");
  if (it == v.as_object().end() || !it->value().is_array()) return std::nullopt;
  const std::string wire = wire_key(key);
  std::vector<LockInfo> out;
  for (const auto& l : it->value().as_array()) {
    LockInfo info = lock_from_json(l);
    if (info.key == wire) out.push_back(std::move(info));
  }
  return out;
}

struct AnswerReader::Parser {
  http::response_parser<http::string_body> p;
  Parser() {
    p.body_limit(256 * 1024 * 1024);
    p.eager(true);
  }
};

AnswerReader::AnswerReader() : parser_(std::make_unique<Parser>()) {}
AnswerReader::~AnswerReader() = default;
AnswerReader::AnswerReader(AnswerReader&&) noexcept = default;
AnswerReader& AnswerReader::operator=(AnswerReader&&) noexcept = default;

AnswerReader::State AnswerReader::feed(const char* data, std::size_t size) {
  if (size > 0) got_bytes_ = true;
  inbuf_.append(data, size);
  return parse();
}

AnswerReader::State AnswerReader::parse() {
  auto& p = parser_->p;
  while (!inbuf_.empty()) {
    beast::error_code ec;
    std::size_t used = p.put(asio::buffer(inbuf_), ec);
    inbuf_.erase(0, used);
    if (ec && ec != http::error::need_more) {
      error_ = "bad answer from the broker: " + ec.message();
      return State::Failed;
    }
    if (p.is_done()) return finished();
    if (ec || used == 0) break;  // the parser wants more than there is
  }
  return State::NeedMore;
}

AnswerReader::State AnswerReader::finished() {
  auto res = parser_->p.release();
  reply_.status = res.result_int();
  reply_.body = std::move(res.body());
  keep_alive_ = res.keep_alive();
  return State::Done;
}

AnswerReader::State AnswerReader::end_of_stream() {
  auto& p = parser_->p;
  if (p.is_header_done()) {
    beast::error_code ec;
    p.put_eof(ec);
    if (!ec && p.is_done()) return finished();
  }
  // Anything cut short, or nothing at all, is not an answer.
  error_ = "the broker closed the connection";
  return State::Failed;
}

std::string AnswerReader::take_leftover() { return std::move(inbuf_); }

}  // namespace wire
}  // namespace gate
