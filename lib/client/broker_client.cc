#include "client/broker_client.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/buffer.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include <cerrno>
#include <cstring>
#include <mutex>

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

// Blocking sockets with poll() for time limits: a call costs a send and a receive
// or two, with no event loop or timers around them (the mount makes thousands of
// these calls a second). abort() shuts the socket down from another thread, which
// wakes a blocked poll() at once.
struct BrokerClient::Impl {
  std::mutex mu;  // guards fd against abort() from another thread
  int fd = -1;
  std::string inbuf;  // bytes received but not yet parsed
  std::atomic<bool> aborted{false};
  std::chrono::milliseconds io_timeout;

  bool connected() {
    std::lock_guard lock(mu);
    return fd >= 0;
  }

  void close() {
    std::lock_guard lock(mu);
    if (fd >= 0) ::close(fd);
    fd = -1;
    inbuf.clear();
  }

  // Waits until fd is ready for `events`; false on time-out, error or abort.
  bool wait(int sock, short events, int timeout_ms, std::string* error) {
    pollfd p{sock, events, 0};
    while (true) {
      int r = ::poll(&p, 1, timeout_ms);
      if (r < 0 && errno == EINTR) continue;
      if (aborted) {
        *error = "aborted";
        return false;
      }
      if (r == 0) {
        *error = "timed out after " + std::to_string(timeout_ms) + " ms";
        return false;
      }
      if (r < 0) {
        *error = std::strerror(errno);
        return false;
      }
      return true;  // ready, or hung up: the next read/write says which
    }
  }

  std::string connect(const BrokerEndpoint& ep) {
    sockaddr_storage addr{};
    socklen_t len = 0;
    int family;
    if (!ep.unix_socket.empty()) {
      auto* un = reinterpret_cast<sockaddr_un*>(&addr);
      if (ep.unix_socket.size() >= sizeof un->sun_path) return "socket path too long";
      un->sun_family = AF_UNIX;
      std::memcpy(un->sun_path, ep.unix_socket.c_str(), ep.unix_socket.size() + 1);
      len = sizeof(sockaddr_un);
      family = AF_UNIX;
    } else {
      addrinfo hints{};
      hints.ai_socktype = SOCK_STREAM;
      hints.ai_flags = AI_NUMERICSERV;
      addrinfo* res = nullptr;
      if (int rc = ::getaddrinfo(ep.host.c_str(), std::to_string(ep.port).c_str(), &hints, &res); rc != 0)
        return std::string("cannot resolve ") + ep.host + ": " + ::gai_strerror(rc);
      std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
      len = res->ai_addrlen;
      family = res->ai_family;
      ::freeaddrinfo(res);
    }
    int sock = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0) return std::strerror(errno);
    {
      std::lock_guard lock(mu);
      fd = sock;
    }
    if (aborted) return "aborted";
    if (::connect(sock, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
      if (errno != EINPROGRESS && errno != EAGAIN) return std::strerror(errno);
      std::string error;
      if (!wait(sock, POLLOUT, static_cast<int>(io_timeout.count()), &error)) return error;
      int err = 0;
      socklen_t elen = sizeof err;
      ::getsockopt(sock, SOL_SOCKET, SO_ERROR, &err, &elen);
      if (err != 0) return std::strerror(err);
    }
    if (family != AF_UNIX) {
      int one = 1;
      ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return "";
  }

  std::string send_all(const std::string& data) {
    const int sock = fd;
    std::size_t sent = 0;
    while (sent < data.size()) {
      ssize_t n = ::send(sock, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        std::string error;
        if (!wait(sock, POLLOUT, static_cast<int>(io_timeout.count()), &error)) return error;
        continue;
      }
      return aborted ? "aborted" : std::strerror(errno);
    }
    return "";
  }

  // Reads one response. *got_bytes tells whether anything at all arrived.
  std::string receive(http::response<http::string_body>& res, bool wait_forever, bool* got_bytes) {
    const int sock = fd;
    http::response_parser<http::string_body> parser;
    parser.body_limit(256 * 1024 * 1024);
    parser.eager(true);
    char buf[16384];
    while (true) {
      if (!inbuf.empty()) {
        beast::error_code ec;
        std::size_t used = parser.put(asio::buffer(inbuf), ec);
        inbuf.erase(0, used);
        if (ec && ec != http::error::need_more) return "bad answer from the broker: " + ec.message();
        if (parser.is_done()) {
          res = parser.release();
          return "";
        }
        if (!ec && used > 0) continue;  // the parser may take more of what we have
      }
      ssize_t n = ::recv(sock, buf, sizeof buf, 0);
      if (n > 0) {
        *got_bytes = true;
        inbuf.append(buf, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0) {
        if (aborted) return "aborted";
        // An answer that ends with the connection (no length) is complete; anything
        // else cut short, or nothing at all, is not.
        if (!parser.is_header_done()) return "the broker closed the connection";
        beast::error_code ec;
        parser.put_eof(ec);
        if (!ec && parser.is_done()) {
          res = parser.release();
          return "";
        }
        return "the broker closed the connection";
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        std::string error;
        if (!wait(sock, POLLIN, wait_forever ? -1 : static_cast<int>(io_timeout.count()), &error))
          return error;
        continue;
      }
      return aborted ? "aborted" : std::strerror(errno);
    }
  }
};

BrokerClient::BrokerClient(BrokerEndpoint endpoint, std::chrono::milliseconds io_timeout)
    : endpoint_(std::move(endpoint)), impl_(std::make_unique<Impl>()) {
  impl_->io_timeout = io_timeout;
}

BrokerClient::~BrokerClient() { impl_->close(); }

void BrokerClient::abort() {
  impl_->aborted = true;
  std::lock_guard lock(impl_->mu);
  if (impl_->fd >= 0) ::shutdown(impl_->fd, SHUT_RDWR);
}

void BrokerClient::reset() {
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
      if (std::string e = impl_->connect(endpoint_); !e.empty()) {
        impl_->close();
        reply.error = impl_->aborted ? "aborted"
                                     : "cannot reach the broker at " + endpoint_.describe() + ": " + e;
        return reply;
      }
    }
    std::string req = method + " " + target + " HTTP/1.1\r\nHost: " +
                      (endpoint_.unix_socket.empty() ? endpoint_.host : std::string("localhost")) +
                      "\r\nUser-Agent: gate\r\n";
    if (!body.empty()) req += "Content-Type: application/json\r\n";
    req += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    http::response<http::string_body> res;
    bool got_bytes = false;
    std::string error = impl_->send_all(req);
    if (error.empty()) error = impl_->receive(res, wait_forever, &got_bytes);
    if (error.empty()) {
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
    if (reused && !got_bytes && error.find("timed out") == std::string::npos) continue;
    reply.error = "broker at " + endpoint_.describe() + " did not answer: " + error;
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
  const bool long_wait = !req.timeout_ms || *req.timeout_ms * 2 >= impl_->io_timeout.count();
  return to_result(request("POST", "/v1/locks/acquire", json::serialize(o), long_wait));
}

CallResult BrokerClient::release(const std::string& lock_id, const std::string& owner,
                                 bool changed, const std::string& stale) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  if (changed) o["changed"] = true;
  if (!stale.empty()) o["stale"] = stale;
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
    for (unsigned char c : wire_key(path)) {
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

std::optional<std::vector<LockInfo>> BrokerClient::holders(const std::string& key) {
  HttpReply r = status(key);
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

bool BrokerClient::healthy() {
  HttpReply r = request("GET", "/v1/health", "");
  return r.status == 200;
}

}  // namespace gate
