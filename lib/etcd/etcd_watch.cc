#include "etcd/etcd_watch.h"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <condition_variable>
#include <mutex>

#include "core/base64.h"

namespace gate::etcd {

namespace json = boost::json;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = net::ip::tcp;

namespace {

constexpr auto kConnectTimeout = std::chrono::seconds(3);
// Pings on a quiet stream; a member that answers none in this long is left.
constexpr auto kIdleTimeout = std::chrono::seconds(10);

// One line of the stream: an update, the end of the watch, or a failure.
struct Line {
  WatchUpdate update;
  bool created = false, canceled = false;
  std::string error;
};

Line parse_line(const std::string& text) {
  Line line;
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec || !v.is_object()) {
    line.error = "a watch answer that is not JSON: " + text.substr(0, 80);
    return line;
  }
  const json::object& o = v.as_object();
  if (const json::value* e = o.if_contains("error")) {
    line.error = "etcd ended the watch: " + json::serialize(*e).substr(0, 200);
    return line;
  }
  const json::value* r = o.if_contains("result");
  if (!r || !r->is_object()) {
    line.error = "a watch answer without a result: " + text.substr(0, 80);
    return line;
  }
  const json::object& res = r->as_object();
  line.update.revision = header_revision(res);
  if (const json::value* c = res.if_contains("created"); c && c->is_bool()) line.created = c->as_bool();
  if (const json::value* c = res.if_contains("canceled"); c && c->is_bool()) line.canceled = c->as_bool();
  line.update.compact_revision = json_int(res, "compact_revision");
  line.update.compacted = line.canceled && line.update.compact_revision > 0;
  if (line.canceled && !line.update.compacted) {
    const json::value* why = res.if_contains("cancel_reason");
    line.error = "etcd cancelled the watch" + (why && why->is_string() ? ": " + std::string(why->as_string()) : "");
  }
  if (const json::value* evs = res.if_contains("events"); evs && evs->is_array()) {
    for (const json::value& ev : evs->as_array()) {
      if (!ev.is_object()) continue;
      const json::object& e = ev.as_object();
      WatchEvent out;
      if (const json::value* t = e.if_contains("type"); t && t->is_string()) out.deleted = t->as_string() == "DELETE";
      if (const json::value* kv = e.if_contains("kv")) {
        Result<KeyValue> k = decode_kv(*kv);
        if (!k.ok()) {
          line.error = "a watch event that etcd did not write: " + k.message();
          return line;
        }
        out.kv = std::move(*k);
      }
      line.update.events.push_back(std::move(out));
    }
  }
  return line;
}

// What one attempt on one member needs: all of it outlives the attempt.
struct Attempt {
  const Endpoint& ep;
  const std::string& key;
  const std::string& range_end;
  std::atomic<std::int64_t>& next;
  const EtcdWatch::OnUpdate& on_update;
  std::string& problem;
  bool& finished;
};

net::awaitable<void> watch_once(net::io_context& ioc, Attempt& a) {
  beast::error_code ec;
  tcp::resolver resolver(ioc);
  auto found = co_await resolver.async_resolve(a.ep.host, a.ep.port, net::redirect_error(net::use_awaitable, ec));
  if (ec) {
    a.problem = "cannot resolve: " + ec.message();
    co_return;
  }
  websocket::stream<beast::tcp_stream> ws(ioc);
  beast::get_lowest_layer(ws).expires_after(kConnectTimeout);
  co_await beast::get_lowest_layer(ws).async_connect(found, net::redirect_error(net::use_awaitable, ec));
  if (!ec)
    co_await ws.async_handshake(a.ep.str(), "/v3/watch", net::redirect_error(net::use_awaitable, ec));
  if (ec) {
    a.problem = "cannot open the watch stream: " + ec.message();
    co_return;
  }
  beast::get_lowest_layer(ws).expires_never();
  websocket::stream_base::timeout t{kConnectTimeout, kIdleTimeout, true};
  ws.set_option(t);
  ws.text(true);
  json::object create{{"key", base64_encode(a.key)},
                      {"start_revision", std::to_string(a.next.load())},
                      {"progress_notify", true}};
  if (!a.range_end.empty()) create["range_end"] = base64_encode(a.range_end);
  const std::string request = json::serialize(json::object{{"create_request", create}});
  co_await ws.async_write(net::buffer(request), net::redirect_error(net::use_awaitable, ec));
  if (ec) {
    a.problem = "cannot start the watch: " + ec.message();
    co_return;
  }
  beast::flat_buffer buffer;
  while (true) {
    buffer.clear();
    co_await ws.async_read(buffer, net::redirect_error(net::use_awaitable, ec));
    if (ec) {
      a.problem = "the watch stream broke: " + ec.message();
      co_return;
    }
    Line line = parse_line(beast::buffers_to_string(buffer.data()));
    if (!line.error.empty()) {
      a.problem = line.error;
      co_return;
    }
    if (line.update.compacted) {
      a.finished = true;
      a.on_update(line.update);
      co_return;
    }
    if (line.created) continue;
    // Events are delivered once: a new watch starts after the last one.
    if (!line.update.events.empty()) a.next = line.update.events.back().kv.mod_revision + 1;
    a.on_update(line.update);
  }
}

}  // namespace

struct EtcdWatch::Impl {
  std::mutex mu;
  std::condition_variable cv;
  net::io_context* ioc = nullptr;  // the running attempt's, for stop()
};

EtcdWatch::EtcdWatch(std::vector<Endpoint> endpoints, std::string key, std::string range_end,
                     std::int64_t start_revision, OnUpdate on_update,
                     std::function<void(const std::string&)> on_problem)
    : endpoints_(std::move(endpoints)),
      key_(std::move(key)),
      range_end_(std::move(range_end)),
      on_update_(std::move(on_update)),
      on_problem_(std::move(on_problem)),
      next_(start_revision),
      impl_(std::make_unique<Impl>()) {
  thread_ = std::thread([this] { run(); });
}

EtcdWatch::~EtcdWatch() { stop(); }

void EtcdWatch::stop() {
  {
    std::lock_guard lock(impl_->mu);
    stopping_ = true;
    if (impl_->ioc) impl_->ioc->stop();
  }
  impl_->cv.notify_all();
  if (thread_.joinable()) thread_.join();
}

void EtcdWatch::run() {
  std::size_t at = 0;
  bool finished = false;  // compacted away: the owner starts over
  while (!stopping_ && !finished && !endpoints_.empty()) {
    const Endpoint ep = endpoints_[at++ % endpoints_.size()];
    std::string problem;
    Attempt a{ep, key_, range_end_, next_, on_update_, problem, finished};
    net::io_context ioc;  // (after `a`: the attempt's frame goes with it, first)
    {
      std::lock_guard lock(impl_->mu);
      if (stopping_) break;
      impl_->ioc = &ioc;
    }
    net::co_spawn(ioc, watch_once(ioc, a), net::detached);
    ioc.run();
    {
      std::lock_guard lock(impl_->mu);
      impl_->ioc = nullptr;
    }
    if (stopping_ || finished) break;
    if (on_problem_ && !problem.empty()) on_problem_("etcd at " + ep.str() + ": " + problem);
    // A moment before the next member, cut short by stop().
    std::unique_lock lock(impl_->mu);
    impl_->cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return stopping_.load(); });
  }
  done_ = true;
}

}  // namespace gate::etcd
