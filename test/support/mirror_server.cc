// A loopback HTTP server for the image download tests: serves the files below a
// directory (GET, with "Range: bytes=N-"; POST alike), one connection at a time, and can break one
// download half way, as a real mirror's connection may.
//   gate_test_mirror ROOT PORT_FILE LOG_FILE [DROP_PATH DROP_AFTER_BYTES]
// Writes its port to PORT_FILE once it listens, and one line per request to LOG_FILE
// ("GET /path from=N"). The first GET of DROP_PATH gets its headers and
// DROP_AFTER_BYTES of the body, then the connection closes. Runs until killed.
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void serve(tcp::socket& socket, const fs::path& root, std::ofstream& log, const std::string& drop_path,
           std::uint64_t drop_after, bool& dropped) {
  beast::flat_buffer buffer;
  http::request<http::string_body> req;
  beast::error_code ec;
  http::read(socket, buffer, req, ec);
  if (ec) return;
  const std::string target(req.target());
  std::uint64_t from = 0;
  const std::string range(req[http::field::range]);
  if (range.rfind("bytes=", 0) == 0) from = std::stoull(range.substr(6));
  log << to_string(req.method()) << " " << target << " from=" << from << std::endl;

  http::response<http::string_body> res;
  res.version(11);
  res.keep_alive(false);
  const fs::path file = root / target.substr(1);
  // (POST answers like GET: the etcd client tests use it as a server that is not etcd.)
  const bool method_ok = req.method() == http::verb::get || req.method() == http::verb::post;
  if (!method_ok || target.find("..") != std::string::npos || !fs::is_regular_file(file)) {
    res.result(http::status::not_found);
    res.body() = "not here\n";
  } else if (from == 0 && target != drop_path) {
    // A whole file (a test's cloud image is hundreds of MiB): streamed from disk.
    http::response<http::file_body> whole;
    whole.version(11);
    whole.keep_alive(false);
    whole.result(http::status::ok);
    whole.body().open(file.c_str(), beast::file_mode::scan, ec);
    if (ec) return;
    whole.prepare_payload();
    http::write(socket, whole, ec);
    socket.shutdown(tcp::socket::shutdown_send, ec);
    return;
  } else {
    const std::string body = read_all(file);
    if (from > 0 && from >= body.size()) {
      res.result(http::status::range_not_satisfiable);
      res.set(http::field::content_range, "bytes */" + std::to_string(body.size()));
    } else if (from > 0) {
      res.result(http::status::partial_content);
      res.set(http::field::content_range, "bytes " + std::to_string(from) + "-" + std::to_string(body.size() - 1) +
                                              "/" + std::to_string(body.size()));
      res.body() = body.substr(from);
    } else {
      res.result(http::status::ok);
      res.body() = body;
    }
  }
  res.prepare_payload();
  if (target == drop_path && !dropped && res.result() == http::status::ok && res.body().size() > drop_after) {
    // The headers (with the whole length) and part of the body, then the end.
    dropped = true;
    http::response_serializer<http::string_body> sr(res);
    http::write_header(socket, sr, ec);
    if (!ec) net::write(socket, net::buffer(res.body().data(), drop_after), ec);
    socket.close(ec);
    return;
  }
  http::write(socket, res, ec);
  socket.shutdown(tcp::socket::shutdown_send, ec);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 6) {
    std::cerr << "usage: gate_test_mirror ROOT PORT_FILE LOG_FILE [DROP_PATH DROP_AFTER_BYTES]\n";
    return 2;
  }
  const fs::path root = argv[1];
  const std::string drop_path = argc == 6 ? argv[4] : "";
  const std::uint64_t drop_after = argc == 6 ? std::stoull(argv[5]) : 0;
  std::ofstream log(argv[3], std::ios::app);
  net::io_context ioc;
  tcp::acceptor acceptor(ioc, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  {
    std::ofstream port(std::string(argv[2]) + ".tmp");
    port << acceptor.local_endpoint().port() << "\n";
  }
  fs::rename(std::string(argv[2]) + ".tmp", argv[2]);
  bool dropped = false;
  for (;;) {
    tcp::socket socket(ioc);
    beast::error_code ec;
    acceptor.accept(socket, ec);
    if (!ec) serve(socket, root, log, drop_path, drop_after, dropped);
  }
}
