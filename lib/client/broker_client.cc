#include "client/broker_client.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include <mutex>

namespace gate {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using error_code = boost::system::error_code;

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

struct BrokerClient::Impl {
  asio::io_context ioc{1};
  std::optional<beast::tcp_stream> tcp;
  std::optional<beast::basic_stream<asio::local::stream_protocol>> local;
  beast::flat_buffer buffer;
  std::atomic<bool> aborted{false};
  std::chrono::milliseconds io_timeout;

  bool connected() const {
    return (tcp && tcp->socket().is_open()) || (local && local->socket().is_open());
  }

  void close() {
    if (tcp) tcp->close();
    if (local) local->close();
    tcp.reset();
    local.reset();
    buffer.clear();
  }

  void run() {
    ioc.restart();
    ioc.run();
  }

  error_code connect(const BrokerEndpoint& ep) {
    error_code result = asio::error::operation_aborted;
    if (!ep.unix_socket.empty()) {
      local.emplace(ioc);
      local->expires_after(io_timeout);
      local->async_connect(asio::local::stream_protocol::endpoint(ep.unix_socket),
                           [&](error_code ec) { result = ec; });
    } else {
      error_code ec;
      auto address = asio::ip::make_address(ep.host, ec);
      std::vector<asio::ip::tcp::endpoint> endpoints;
      if (!ec) {
        endpoints.emplace_back(address, ep.port);
      } else {
        asio::ip::tcp::resolver resolver(ioc);
        for (const auto& e : resolver.resolve(ep.host, std::to_string(ep.port), ec))
          endpoints.push_back(e.endpoint());
        if (ec) return ec;
      }
      tcp.emplace(ioc);
      tcp->expires_after(io_timeout);
      tcp->async_connect(endpoints, [&](error_code ec, const asio::ip::tcp::endpoint&) {
        result = ec;
      });
    }
    run();
    if (!result && tcp) tcp->socket().set_option(asio::ip::tcp::no_delay(true), result);
    if (result) close();
    return result;
  }

  template <class Stream>
  error_code exchange(Stream& stream, http::request<http::string_body>& req,
                      http::response<http::string_body>& res, bool wait_forever,
                      bool* got_bytes) {
    error_code result = asio::error::operation_aborted;
    http::response_parser<http::string_body> parser;
    parser.body_limit(256 * 1024 * 1024);
    stream.expires_after(io_timeout);
    http::async_write(stream, req, [&](error_code ec, std::size_t) {
      if (ec) {
        result = ec;
        return;
      }
      if (wait_forever) stream.expires_never();
      else stream.expires_after(io_timeout);
      http::async_read(stream, buffer, parser, [&](error_code ec2, std::size_t n) {
        result = ec2;
        *got_bytes = n > 0;
      });
    });
    run();
    if (!result) res = parser.release();
    return result;
  }
};

BrokerClient::BrokerClient(BrokerEndpoint endpoint, std::chrono::milliseconds io_timeout)
    : endpoint_(std::move(endpoint)), impl_(std::make_unique<Impl>()) {
  impl_->io_timeout = io_timeout;
}

BrokerClient::~BrokerClient() = default;

void BrokerClient::abort() {
  impl_->aborted = true;
  // Runs inside the call in progress (or at the next reset()).
  asio::post(impl_->ioc, [impl = impl_.get()] {
    if (impl->tcp) impl->tcp->socket().close();
    if (impl->local) impl->local->socket().close();
  });
}

void BrokerClient::reset() {
  impl_->ioc.restart();
  impl_->ioc.poll();
  impl_->close();
  impl_->aborted = false;
}

HttpReply BrokerClient::request(const std::string& method, const std::string& target,
                                const std::string& body, bool wait_forever) {
  HttpReply reply;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (impl_->aborted) {
      reply.error = "aborted";
      return reply;
    }
    const bool reused = impl_->connected();
    if (!reused) {
      if (error_code ec = impl_->connect(endpoint_)) {
        reply.error = "cannot reach the broker at " + endpoint_.describe() + ": " + ec.message();
        if (impl_->aborted) reply.error = "aborted";
        return reply;
      }
    }
    http::request<http::string_body> req{http::string_to_verb(method), target, 11};
    req.set(http::field::host, endpoint_.unix_socket.empty() ? endpoint_.host : "localhost");
    req.set(http::field::user_agent, "gate");
    if (!body.empty()) req.set(http::field::content_type, "application/json");
    req.keep_alive(true);
    req.body() = body;
    req.prepare_payload();
    http::response<http::string_body> res;
    bool got_bytes = false;
    error_code ec = impl_->tcp ? impl_->exchange(*impl_->tcp, req, res, wait_forever, &got_bytes)
                               : impl_->exchange(*impl_->local, req, res, wait_forever, &got_bytes);
    if (!ec) {
      reply.status = res.result_int();
      reply.body = std::move(res.body());
      if (!res.keep_alive()) impl_->close();
      return reply;
    }
    impl_->close();
    if (impl_->aborted) {
      reply.error = "aborted";
      return reply;
    }
    // A kept-alive connection the broker had already closed: try once on a new one.
    if (reused && !got_bytes && (ec == http::error::end_of_stream || ec == asio::error::eof ||
                                 ec == asio::error::connection_reset ||
                                 ec == asio::error::broken_pipe))
      continue;
    reply.error = "broker at " + endpoint_.describe() + " did not answer: " + ec.message();
    return reply;
  }
  return reply;
}

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
  l.path = str("path");
  l.mode = str("mode");
  l.owner = str("owner");
  l.acquired_at = str("acquired_at");
  l.lease_expires_at = str("lease_expires_at");
  l.max_hold_ms = num("max_hold_ms");
  l.hold_count = num("hold_count").value_or(0);
  l.fence = static_cast<std::uint64_t>(num("fence").value_or(0));
  return l;
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

}  // namespace

CallResult BrokerClient::acquire(const AcquireRequest& req) {
  json::object o;
  o["path"] = req.path;
  o["mode"] = req.mode;
  o["owner"] = req.owner;
  if (req.timeout_ms) o["timeout_ms"] = *req.timeout_ms;
  else o["timeout_ms"] = nullptr;
  if (req.lease_ms) o["lease_ms"] = *req.lease_ms;
  if (req.max_hold_ms) o["max_hold_ms"] = *req.max_hold_ms;
  if (!req.session.empty()) o["session"] = req.session;
  if (!req.request_id.empty()) o["request_id"] = req.request_id;
  // The answer to a waiting acquire comes when the broker grants it.
  const bool long_wait = !req.timeout_ms || *req.timeout_ms * 2 >= impl_->io_timeout.count();
  return to_result(request("POST", "/v1/locks/acquire", json::serialize(o), long_wait));
}

CallResult BrokerClient::release(const std::string& lock_id, const std::string& owner) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  return to_result(request("POST", "/v1/locks/release", json::serialize(o)));
}

CallResult BrokerClient::heartbeat(const std::string& lock_id, const std::string& owner,
                                   std::optional<std::int64_t> lease_ms) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  if (lease_ms) o["lease_ms"] = *lease_ms;
  return to_result(request("POST", "/v1/locks/heartbeat", json::serialize(o)));
}

HttpReply BrokerClient::status(const std::string& path) {
  std::string target = "/v1/locks/status";
  if (!path.empty()) {
    target += "?path=";
    static const char* hex = "0123456789ABCDEF";
    for (unsigned char c : path) {
      if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '/' || c == '~') {
        target.push_back(static_cast<char>(c));
      } else {
        target.push_back('%');
        target.push_back(hex[c >> 4]);
        target.push_back(hex[c & 15]);
      }
    }
  }
  return request("GET", target, "");
}

bool BrokerClient::healthy() {
  HttpReply r = request("GET", "/v1/health", "");
  return r.status == 200;
}

}  // namespace gate
