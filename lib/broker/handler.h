#pragma once
// What the broker's HTTP front (HttpServer) serves: a handler of API v1 requests.
// Two kinds exist: BrokerService (the lock space in this process, kept in SQLite) and
// EtcdService (the lock space shared by every broker on an etcd cluster).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace gate {

struct HttpAnswer {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
};

// {"error": message} with `status`.
HttpAnswer error_answer(int status, const std::string& message);
HttpAnswer json_answer(int status, const std::string& body);

class RequestHandler {
 public:
  using Reply = std::function<void(HttpAnswer)>;
  virtual ~RequestHandler() = default;

  // Handles one request; calls `reply` exactly once, now or later, on the handler's
  // io_context thread. Returns a non-zero ticket when the request waits: pass it to
  // client_gone() if the client disconnects first.
  virtual std::uint64_t handle(const std::string& method, const std::string& target,
                               const std::string& body, Reply reply) = 0;
  virtual void client_gone(std::uint64_t ticket) = 0;
  // A request the HTTP layer refused before it reached handle() (for /metrics).
  virtual void count_bad_request() = 0;
  // Open client connections now (for /metrics).
  virtual void set_connections(std::size_t n) = 0;
};

// A request target's path and query ("" when none), split at the first '?'.
struct Target {
  std::string_view path, query;
};
Target split_target(std::string_view target);

// The value of `name` in a URL query string, percent-decoded ("" when absent).
std::string query_param(std::string_view query, std::string_view name);

}  // namespace gate
