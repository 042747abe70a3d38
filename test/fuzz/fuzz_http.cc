// The broker's HTTP request path: bytes as a client sends them (one request or
// several pipelined), Beast's parser with the broker's limits, and the real
// BrokerService behind it (a LockTable and a LockStore in memory). Every request
// parsed gets exactly one answer, with a status the API knows.
#include <boost/asio/io_context.hpp>
#include <boost/beast/http.hpp>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "broker/broker_service.h"
#include "broker/http_server.h"
#include "store/lock_store.h"

namespace http = boost::beast::http;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gate;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  boost::asio::io_context ioc;
  LockTableOptions options;
  options.default_lease_ms = 1000;
  int ids = 0;
  LockTable table(options, [&ids] { return "L" + std::to_string(++ids); });
  // One store for all inputs (opening one costs more than the rest of a run); each
  // input's changes are saved to it as the broker saves them.
  static std::unique_ptr<LockStore> store = [] {
    auto s = LockStore::open(":memory:", LockStore::Sync::Normal);
    if (!s.ok()) std::abort();
    return std::move(s).value();
  }();
  Micros now = 1'800'000'000'000'000;
  BrokerService service(ioc, table, store.get(), [&now] { return now; });
  const ServerLimits limits;
  // Per request: answers so far; a request whose client went away while it waited
  // gets none after that.
  std::vector<int> answers;
  std::vector<bool> gone;
  std::vector<std::pair<std::uint64_t, std::size_t>> waiting;  // ticket, request
  while (!in.empty()) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(limits.max_body_bytes);
    parser.header_limit(kHeaderLimit);
    parser.eager(true);
    boost::beast::error_code ec;
    while (!parser.is_done() && !in.empty()) {
      const std::size_t used = parser.put(boost::asio::buffer(in.data(), in.size()), ec);
      in.remove_prefix(used);
      if (ec == http::error::need_more) ec = {};
      if (ec || used == 0) break;
    }
    if (!parser.is_done() && !ec) parser.put_eof(ec);  // the client closed
    if (ec || !parser.is_done()) break;  // the server answers 400/413/431 and closes
    const auto& req = parser.get();
    const std::size_t index = answers.size();
    answers.push_back(0);
    gone.push_back(false);
    const std::uint64_t ticket = service.handle(
        std::string(req.method_string()), std::string(req.target()), req.body(),
        [&answers, &gone, index](HttpAnswer a) {
          if (a.status < 200 || a.status > 599 || gone[index] || ++answers[index] > 1) std::abort();
        });
    if (ticket) waiting.emplace_back(ticket, index);
    ioc.poll();
    ioc.restart();
    now += 300'000;  // 0.3 s between requests: leases and time-outs run out
  }
  // Half the waiting clients go away, the others see the broker shut down.
  for (std::size_t i = 0; i < waiting.size(); i += 2) {
    if (answers[waiting[i].second]) continue;
    gone[waiting[i].second] = true;
    service.client_gone(waiting[i].first);
  }
  ioc.poll();
  ioc.restart();
  service.shutdown();
  ioc.poll();
  for (std::size_t i = 0; i < answers.size(); ++i)
    if (answers[i] != (gone[i] ? 0 : 1)) std::abort();
  return 0;
}
