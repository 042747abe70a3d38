#pragma once
// HttpServer: Boost.Beast HTTP/1.1 (keep-alive) and HTTP/1.0 front of a
// RequestHandler (BrokerService or EtcdService), on TCP and optionally a Unix socket. One session object per
// connection, on the service's io_context thread.
//
// Limits, each answered with a status while other clients carry on: body size
// (413), a time limit for a request to arrive once started and for an idle
// keep-alive connection (the connection is closed), and a cap on connections (503).
// While an acquire waits, the session watches its socket: a client that goes away
// leaves the queue at once.
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "broker/handler.h"
#include "core/status.h"

namespace gate {

// The largest request header the broker reads (431 above).
inline constexpr std::size_t kHeaderLimit = 16 * 1024;

struct ServerLimits {
  std::size_t max_body_bytes = 64 * 1024;
  // The body of a delegate's report or hand-back (a whole lock table).
  std::size_t max_state_bytes = 256 * 1024 * 1024;
  std::chrono::milliseconds request_timeout{10'000};  // from first byte to full request
  std::chrono::milliseconds idle_timeout{120'000};    // keep-alive with no request
  std::size_t max_connections = 10'000;
};

class HttpServer {
 public:
  HttpServer(boost::asio::io_context& ioc, RequestHandler& service, ServerLimits limits);
  ~HttpServer();

  // Bind and start accepting. False and a message for people on failure.
  Status listen_tcp(const std::string& host, std::uint16_t port);
  Status listen_unix(const std::string& path, unsigned mode, const std::string& group);
  std::uint16_t tcp_port() const;

  // Stop accepting, close idle connections, and call done() once every answer in
  // flight was written (or after `grace`).
  void drain(std::chrono::milliseconds grace, std::function<void()> done);

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace gate
