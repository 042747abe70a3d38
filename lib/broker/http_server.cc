#include "broker/http_server.h"

#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <array>

#include <set>

#include "core/log.h"

namespace gate {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using error_code = boost::system::error_code;

namespace {

constexpr std::string_view kTooBusy =
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    "Content-Length: 45\r\nConnection: close\r\n\r\n"
    "{\"error\":\"too many connections; retry later\"}";

struct SessionBase {
  virtual ~SessionBase() = default;
  virtual void drain() = 0;
};

}  // namespace

struct HttpServer::Impl {
  Impl(asio::io_context& ioc, RequestHandler& service, ServerLimits limits)
      : ioc(ioc), service(&service), limits(limits), retry_timer(ioc), drain_timer(ioc) {}

  asio::io_context& ioc;
  RequestHandler* service;  // null once the server is gone
  ServerLimits limits;
  std::optional<asio::ip::tcp::acceptor> tcp;
  std::optional<asio::local::stream_protocol::acceptor> local;
  std::string local_path;
  std::set<SessionBase*> sessions;
  bool draining = false;
  std::function<void()> on_drained;
  asio::steady_timer retry_timer;
  asio::steady_timer drain_timer;

  void opened(SessionBase* s) {
    sessions.insert(s);
    if (service) service->set_connections(sessions.size());
  }
  void closed(SessionBase* s) {
    sessions.erase(s);
    if (service) service->set_connections(sessions.size());
    if (draining && sessions.empty()) finish_drain();
  }
  void finish_drain() {
    drain_timer.cancel();
    if (auto f = std::exchange(on_drained, nullptr)) f();
  }

  template <class Acceptor>
  void accept(Acceptor& acceptor, std::shared_ptr<Impl> self);
};

namespace {

template <class Protocol>
class Session : public SessionBase, public std::enable_shared_from_this<Session<Protocol>> {
 public:
  Session(typename Protocol::socket socket, std::shared_ptr<HttpServer::Impl> server)
      : stream_(std::move(socket)), server_(std::move(server)) {}
  ~Session() override { server_->closed(this); }

  void start() {
    server_->opened(this);
    read_header();
  }

  void drain() override {
    if (!writing_) close();
  }

 private:
  using Stream = beast::basic_stream<Protocol>;

  void read_header() {
    if (server_->draining) return close();
    parser_.emplace();
    // The limit is checked against Content-Length while the header is read, before
    // the target is known: the largest here, the request's own in on_header.
    parser_->body_limit(std::max(server_->limits.max_body_bytes, server_->limits.max_state_bytes));
    parser_->header_limit(kHeaderLimit);
    stream_.expires_after(server_->limits.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = this->shared_from_this()](error_code ec, std::size_t) {
                              self->on_header(ec);
                            });
  }

  void on_header(error_code ec) {
    if (ec) return on_read_error(ec);
    // A delegate's report or hand-back may carry a whole lock table; any other body is
    // small.
    if (!parser_->get().target().starts_with("/v1/delegation/")) {
      if (auto n = parser_->content_length(); n && *n > server_->limits.max_body_bytes)
        return refuse(413, "body larger than " + std::to_string(server_->limits.max_body_bytes) + " bytes");
      parser_->body_limit(server_->limits.max_body_bytes);
    }
    stream_.expires_after(server_->limits.request_timeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](error_code ec, std::size_t) {
                       self->on_read(ec);
                     });
  }

  void on_read_error(error_code ec) {
    if (ec == http::error::body_limit)
      return refuse(413, "body larger than " + std::to_string(server_->limits.max_body_bytes) +
                             " bytes");
    if (ec == http::error::header_limit) return refuse(431, "request header too large");
    if (ec.category() == make_error_code(http::error::end_of_stream).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message)
      return refuse(400, "malformed HTTP request: " + ec.message());
    close();  // end of stream, time-out, reset
  }

  void refuse(int status, const std::string& message) {
    if (server_->service) server_->service->count_bad_request();
    log(LogLevel::Info, "broker", "bad request: ", message);
    keep_alive_ = false;
    linger_ = true;
    send(error_answer(status, message));
  }

  void on_read(error_code ec) {
    if (ec) return on_read_error(ec);
    auto& req = parser_->get();
    keep_alive_ = req.keep_alive();
    version_ = req.version();
    if (!server_->service) return close();
    waiting_ = true;
    ticket_ = server_->service->handle(
        std::string(req.method_string()), std::string(req.target()), req.body(),
        [self = this->shared_from_this()](HttpAnswer a) { self->on_answer(std::move(a)); });
    if (waiting_ && ticket_) {
      // A wait may be long: no time limit, but notice when the client goes away.
      stream_.expires_never();
      watch();
    }
  }

  void watch() {
    watching_ = true;
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = this->shared_from_this()](error_code ec, std::size_t n) {
                              self->on_watch(ec, n);
                            });
  }

  void on_watch(error_code ec, std::size_t n) {
    watching_ = false;
    if (!ec && buffer_.size() + n < server_->limits.max_body_bytes + 16 * 1024) {
      buffer_.commit(n);  // pipelined bytes: kept for the next request
      if (waiting_) return watch();
      if (!writing_ && !closed_) return read_header();
      return;  // on_write goes on with the next request
    }
    if (ec == asio::error::operation_aborted && !waiting_ && !closed_) {
      // Cancelled by on_write once the answer went out: read the next request, which
      // may already be in the buffer, under the idle time limit again.
      if (!writing_) read_header();
      return;
    }
    if (waiting_ && server_->service) {
      waiting_ = false;
      server_->service->client_gone(ticket_);
    }
    close();
  }

  void on_answer(HttpAnswer a) {
    if (closed_) return;
    waiting_ = false;
    ticket_ = 0;
    send(std::move(a));
  }

  void send(HttpAnswer a) {
    res_ = {};
    res_.version(version_);
    res_.result(static_cast<http::status>(a.status));
    res_.set(http::field::server, "gate");
    res_.set(http::field::content_type, a.content_type);
    res_.body() = std::move(a.body);
    res_.keep_alive(keep_alive_ && !server_->draining);
    res_.prepare_payload();
    writing_ = true;
    stream_.expires_after(server_->limits.request_timeout);
    http::async_write(stream_, res_, [self = this->shared_from_this()](error_code ec, std::size_t) {
      self->on_write(ec);
    });
  }

  void on_write(error_code ec) {
    writing_ = false;
    if (!ec && linger_ && !server_->draining) return linger();
    if (ec || !res_.keep_alive() || server_->draining) return close();
    if (watching_) {
      // The disconnect watch has no time limit and may hold no data yet: end it, and
      // on_watch reads the next request with the usual limits.
      error_code ignored;
      stream_.socket().cancel(ignored);
      return;
    }
    read_header();
  }

  // After refusing a request whose body may still be on its way (413 and other
  // refusals): stop sending, then read and drop what the client still sends, for a
  // bounded time and amount. Closing with unread data would make the kernel answer
  // with a reset, and a client that writes its whole body before reading (Python's
  // http.client) would see EPIPE or ECONNRESET instead of the answer.
  static constexpr std::size_t kLingerBytes = 64 * 1024 * 1024;
  void linger() {
    error_code ec;
    stream_.socket().shutdown(Protocol::socket::shutdown_send, ec);
    stream_.expires_after(std::chrono::seconds(2));
    sink_ = std::make_unique<std::array<char, 16 * 1024>>();
    discard();
  }
  void discard() {
    stream_.async_read_some(asio::buffer(*sink_),
                            [self = this->shared_from_this()](error_code ec, std::size_t n) {
                              self->lingered_ += n;
                              if (ec || self->lingered_ > kLingerBytes) return self->close();
                              self->discard();
                            });
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    error_code ec;
    stream_.socket().shutdown(Protocol::socket::shutdown_send, ec);
    stream_.close();
  }

  Stream stream_;
  std::shared_ptr<HttpServer::Impl> server_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
  std::uint64_t ticket_ = 0;
  unsigned version_ = 11;
  bool keep_alive_ = true;
  bool waiting_ = false;
  bool watching_ = false;
  bool writing_ = false;
  bool closed_ = false;
  bool linger_ = false;                               // refused: drain before closing
  std::unique_ptr<std::array<char, 16 * 1024>> sink_;  // only while lingering
  std::size_t lingered_ = 0;
};

}  // namespace

template <class Acceptor>
void HttpServer::Impl::accept(Acceptor& acceptor, std::shared_ptr<Impl> self) {
  using Protocol = typename Acceptor::protocol_type;
  acceptor.async_accept([this, &acceptor, self](error_code ec, typename Protocol::socket socket) {
    if (draining || !acceptor.is_open()) return;
    if (ec) {
      // Out of file descriptors and the like: try again shortly instead of spinning.
      log(LogLevel::Warn, "broker", "accept failed: ", ec.message());
      retry_timer.expires_after(std::chrono::milliseconds(100));
      retry_timer.async_wait([this, &acceptor, self](error_code e) {
        if (!e) accept(acceptor, self);
      });
      return;
    }
    if (sessions.size() >= limits.max_connections) {
      auto s = std::make_shared<typename Protocol::socket>(std::move(socket));
      asio::async_write(*s, asio::buffer(kTooBusy), [s](error_code, std::size_t) {
        error_code ignored;
        s->shutdown(Protocol::socket::shutdown_both, ignored);
        s->close(ignored);
      });
    } else {
      std::make_shared<Session<Protocol>>(std::move(socket), self)->start();
    }
    accept(acceptor, self);
  });
}

HttpServer::HttpServer(asio::io_context& ioc, RequestHandler& service, ServerLimits limits)
    : impl_(std::make_shared<Impl>(ioc, service, limits)) {}

HttpServer::~HttpServer() {
  impl_->service = nullptr;
  error_code ec;
  if (impl_->tcp) impl_->tcp->close(ec);
  if (impl_->local) {
    impl_->local->close(ec);
    ::unlink(impl_->local_path.c_str());
  }
}

Status HttpServer::listen_tcp(const std::string& host, std::uint16_t port) {
  error_code ec;
  auto address = asio::ip::make_address(host, ec);
  if (ec) return Status::failure("'" + host + "' is not an IP address (use e.g. 127.0.0.1 or ::1)");
  asio::ip::tcp::endpoint ep(address, port);
  auto& acc = impl_->tcp.emplace(impl_->ioc);
  if (acc.open(ep.protocol(), ec), ec) goto fail;
  acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (acc.bind(ep, ec), ec) goto fail;
  if (acc.listen(asio::socket_base::max_listen_connections, ec), ec) goto fail;
  impl_->accept(acc, impl_);
  return {};
fail:
  impl_->tcp.reset();
  return Status::failure("cannot listen on " + host + ":" + std::to_string(port) + ": " +
                         ec.message() +
                         (ec == asio::error::address_in_use
                              ? " (is another broker running? choose another --port)"
                              : ""));
}

Status HttpServer::listen_unix(const std::string& path, unsigned mode, const std::string& group) {
  error_code ec;
  {
    // A socket file nobody answers on is left over from a crash: replace it.
    asio::local::stream_protocol::socket probe(impl_->ioc);
    probe.connect(asio::local::stream_protocol::endpoint(path), ec);
    if (!ec) {
      return Status::failure("another process already listens on " + path);
    }
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        return Status::failure(path + " exists and is not a socket; refusing to replace it");
      }
      ::unlink(path.c_str());
    }
  }
  auto& acc = impl_->local.emplace(impl_->ioc);
  asio::local::stream_protocol::endpoint ep(path);
  const mode_t old_umask = ::umask(0177);  // no window in which others may connect
  acc.open(ep.protocol(), ec);
  if (!ec) acc.bind(ep, ec);
  ::umask(old_umask);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    impl_->local.reset();
    return Status::failure("cannot listen on Unix socket " + path + ": " + ec.message());
  }
  impl_->local_path = path;
  if (!group.empty()) {
    struct group* g = ::getgrnam(group.c_str());
    if (!g || ::chown(path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
      return Status::failure("cannot give " + path + " to group '" + group + "'");
    }
  }
  if (::chmod(path.c_str(), mode) != 0) {
    return Status::failure("cannot set the mode of " + path);
  }
  impl_->accept(acc, impl_);
  return {};
}

std::uint16_t HttpServer::tcp_port() const {
  if (!impl_->tcp) return 0;
  error_code ec;
  auto ep = impl_->tcp->local_endpoint(ec);
  return ec ? 0 : ep.port();
}

void HttpServer::drain(std::chrono::milliseconds grace, std::function<void()> done) {
  impl_->draining = true;
  impl_->on_drained = std::move(done);
  error_code ec;
  if (impl_->tcp) impl_->tcp->close(ec);
  if (impl_->local) impl_->local->close(ec);
  impl_->retry_timer.cancel();
  for (auto* s : std::vector<SessionBase*>(impl_->sessions.begin(), impl_->sessions.end()))
    s->drain();
  if (impl_->sessions.empty()) return impl_->finish_drain();
  impl_->drain_timer.expires_after(grace);
  impl_->drain_timer.async_wait([impl = impl_](error_code e) {
    if (!e) impl->finish_drain();
  });
}

}  // namespace gate
