// trivial_server: the ceiling of HTTP on this machine, for broker_bench.
//
// A Boost.Beast HTTP/1.1 server shaped like the broker (one thread, one
// io_context, one listener, one session per connection, keep-alive) that answers
// every request with `200 {}` and does nothing else. Whatever rate it reaches
// against broker_bench's clients is what HTTP itself costs; the broker's rate is
// judged as a share of it.
//
//   trivial_server [--port N] [--unix-socket PATH]
//
// Prints "listening on 127.0.0.1:PORT" (or "listening on unix:PATH") on stdout
// once it accepts connections; exits 0 on SIGINT/SIGTERM.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <type_traits>
#include <string>
#include <string_view>
#include <unistd.h>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using unix_socket = asio::local::stream_protocol;

namespace {

constexpr auto kIdleTimeout = std::chrono::seconds(60);
constexpr std::size_t kBodyLimit = 64 * 1024;

// The whole request handler: a plain function from request to response.
http::response<http::string_body> answer(const http::request<http::string_body>& req) {
  http::response<http::string_body> res{http::status::ok, req.version()};
  res.set(http::field::server, "gate-trivial");
  res.set(http::field::content_type, "application/json");
  res.keep_alive(req.keep_alive());
  res.body() = "{}";
  res.prepare_payload();
  return res;
}

// One connection: read a request, write the answer, repeat until the peer closes
// or asks to close. Stream is beast::tcp_stream (with an idle timeout) or a plain
// Unix stream socket.
template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  explicit Session(Stream stream) : stream_(std::move(stream)) {}

  void start() { read(); }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(kBodyLimit);
    if constexpr (requires { stream_.expires_after(kIdleTimeout); }) {
      stream_.expires_after(kIdleTimeout);
    }
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
                       self->on_read(ec);
                     });
  }

  void on_read(beast::error_code ec) {
    if (ec) return close();  // end_of_stream, timeout, bad request: just drop
    res_ = answer(parser_->get());
    http::async_write(stream_, res_,
                      [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
                        self->on_write(ec);
                      });
  }

  void on_write(beast::error_code ec) {
    if (ec) return close();
    if (!res_.keep_alive()) return close();
    read();
  }

  void close() {
    beast::error_code ignored;
    socket().shutdown(asio::socket_base::shutdown_send, ignored);
  }

  auto& socket() {
    if constexpr (requires { stream_.socket(); }) {
      return stream_.socket();
    } else {
      return stream_;
    }
  }

  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
};

// Accepts forever, one Session per connection.
template <class Acceptor, class Stream>
void accept_loop(Acceptor& acceptor) {
  acceptor.async_accept([&acceptor](beast::error_code ec, typename Acceptor::protocol_type::socket s) {
    if (ec == asio::error::operation_aborted) return;
    if (!ec) {
      if constexpr (std::is_same_v<typename Acceptor::protocol_type, tcp>) {
        s.set_option(tcp::no_delay(true));
      }
      std::make_shared<Session<Stream>>(Stream(std::move(s)))->start();
    }
    // Accept errors (EMFILE and the like) are not fatal for a benchmark server.
    accept_loop<Acceptor, Stream>(acceptor);
  });
}

int usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--port N] [--unix-socket PATH]\n", argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0;
  std::string unix_path;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a == "--port" && i + 1 < argc) {
      std::string_view v = argv[++i];
      auto [p, e] = std::from_chars(v.data(), v.data() + v.size(), port);
      if (e != std::errc{} || p != v.data() + v.size() || port < 0 || port > 65535) {
        std::fprintf(stderr, "trivial_server: --port wants 0..65535, got '%s'\n", argv[i]);
        return 2;
      }
    } else if (a == "--unix-socket" && i + 1 < argc) {
      unix_path = argv[++i];
    } else if (a == "--help" || a == "-h") {
      usage(argv[0]);
      return 0;
    } else {
      return usage(argv[0]);
    }
  }

  try {
    asio::io_context ioc{1};
    asio::signal_set signals(ioc, SIGINT, SIGTERM);
    signals.async_wait([&ioc](beast::error_code, int) { ioc.stop(); });

    std::optional<tcp::acceptor> tcp_acceptor;
    std::optional<unix_socket::acceptor> unix_acceptor;
    if (unix_path.empty()) {
      tcp_acceptor.emplace(ioc);
      tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port));
      tcp_acceptor->open(ep.protocol());
      tcp_acceptor->set_option(asio::socket_base::reuse_address(true));
      tcp_acceptor->bind(ep);
      tcp_acceptor->listen(asio::socket_base::max_listen_connections);
      accept_loop<tcp::acceptor, beast::tcp_stream>(*tcp_acceptor);
      std::printf("listening on 127.0.0.1:%u\n", tcp_acceptor->local_endpoint().port());
    } else {
      ::unlink(unix_path.c_str());
      unix_acceptor.emplace(ioc, unix_socket::endpoint(unix_path));
      accept_loop<unix_socket::acceptor, unix_socket::socket>(*unix_acceptor);
      std::printf("listening on unix:%s\n", unix_path.c_str());
    }
    std::fflush(stdout);
    ioc.run();
    if (!unix_path.empty()) ::unlink(unix_path.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "trivial_server: could not listen (%s); try another --port\n", e.what());
    return 1;
  }
}
