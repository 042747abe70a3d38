#include "etcd/etcd_client.h"

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <thread>

#include "core/base64.h"
#include "gate/version.h"

namespace gate::etcd {

namespace json = boost::json;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;

Result<std::vector<Endpoint>> parse_store(const std::string& spec) {
  constexpr std::string_view scheme = "etcd://";
  if (spec.rfind(scheme, 0) != 0)
    return Status::failure("'" + spec + "' is not an etcd store: write etcd://HOST:PORT[,HOST:PORT...]");
  std::vector<Endpoint> out;
  std::string rest = spec.substr(scheme.size());
  std::size_t start = 0;
  while (start <= rest.size()) {
    const std::size_t comma = rest.find(',', start);
    const std::string one = rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const std::size_t colon = one.rfind(':');
    if (one.empty() || colon == std::string::npos || colon == 0 || colon + 1 == one.size() ||
        one.find_first_not_of("0123456789", colon + 1) != std::string::npos)
      return Status::failure("'" + one + "' in " + spec + " is not HOST:PORT");
    std::string host = one.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    out.push_back({host, one.substr(colon + 1)});
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

std::string prefix_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    if (static_cast<unsigned char>(end.back()) < 0xff) {
      end.back() = static_cast<char>(static_cast<unsigned char>(end.back()) + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

json::object range_request(std::string_view key, std::string_view range_end) {
  json::object r{{"key", base64_encode(key)}};
  if (!range_end.empty()) r["range_end"] = base64_encode(range_end);
  return r;
}

json::object put_request(std::string_view key, std::string_view value, std::int64_t lease) {
  json::object r{{"key", base64_encode(key)}, {"value", base64_encode(value)}};
  if (lease != 0) r["lease"] = std::to_string(lease);
  return r;
}

json::object delete_request(std::string_view key, std::string_view range_end) {
  json::object r{{"key", base64_encode(key)}};
  if (!range_end.empty()) r["range_end"] = base64_encode(range_end);
  return r;
}

json::object compare(std::string_view key, std::string_view target, std::string_view result, std::int64_t number) {
  static const std::pair<std::string_view, std::string_view> kFields[] = {
      {"CREATE", "create_revision"}, {"MOD", "mod_revision"}, {"VERSION", "version"}, {"LEASE", "lease"}};
  json::object c{{"key", base64_encode(key)}, {"target", target}, {"result", result}};
  for (const auto& [t, field] : kFields)
    if (t == target) c[field] = std::to_string(number);
  return c;
}

json::object compare_range(std::string_view key, std::string_view range_end, std::string_view target,
                           std::string_view result, std::int64_t number) {
  json::object c = compare(key, target, result, number);
  c["range_end"] = base64_encode(range_end);
  return c;
}

json::object txn_put(std::string_view key, std::string_view value, std::int64_t lease) {
  return {{"request_put", put_request(key, value, lease)}};
}
json::object txn_delete(std::string_view key, std::string_view range_end) {
  return {{"request_delete_range", delete_request(key, range_end)}};
}
json::object txn_range(std::string_view key, std::string_view range_end) {
  return {{"request_range", range_request(key, range_end)}};
}

json::object compare_value(std::string_view key, std::string_view result, std::string_view value) {
  return {{"key", base64_encode(key)}, {"target", "VALUE"}, {"result", result}, {"value", base64_encode(value)}};
}

std::int64_t json_int(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  if (!v) return 0;  // the gateway leaves defaults out
  if (v->is_int64()) return v->as_int64();
  if (v->is_uint64()) return static_cast<std::int64_t>(v->as_uint64());
  if (v->is_string()) {
    try {
      return std::stoll(std::string(v->as_string()));
    } catch (const std::exception&) {
      return 0;
    }
  }
  return 0;
}

namespace {

Result<std::string> decoded(const json::object& o, std::string_view field) {
  const json::value* v = o.if_contains(field);
  if (!v) return std::string();
  if (!v->is_string()) return Status::failure(std::string(field) + " is not a string");
  auto bytes = base64_decode(v->as_string());
  if (!bytes) return Status::failure(std::string(field) + " is not base64");
  return *bytes;
}

}  // namespace

std::int64_t header_revision(const json::object& answer) {
  const json::value* h = answer.if_contains("header");
  return h && h->is_object() ? json_int(h->as_object(), "revision") : 0;
}

Result<KeyValue> decode_kv(const json::value& kv) {
  if (!kv.is_object()) return Status::failure("a key-value that is not an object");
  const json::object& o = kv.as_object();
  KeyValue out;
  Result<std::string> key = decoded(o, "key");
  if (!key.ok()) return key.status();
  Result<std::string> value = decoded(o, "value");
  if (!value.ok()) return value.status();
  out.key = std::move(*key);
  out.value = std::move(*value);
  out.create_revision = json_int(o, "create_revision");
  out.mod_revision = json_int(o, "mod_revision");
  out.version = json_int(o, "version");
  out.lease = json_int(o, "lease");
  return out;
}

Result<RangeResult> decode_range(const json::object& response) {
  RangeResult r;
  r.revision = header_revision(response);
  r.count = json_int(response, "count");
  if (const json::value* m = response.if_contains("more"); m && m->is_bool()) r.more = m->as_bool();
  if (const json::value* kvs = response.if_contains("kvs")) {
    if (!kvs->is_array()) return Status::failure("kvs is not an array");
    for (const json::value& kv : kvs->as_array()) {
      Result<KeyValue> one = decode_kv(kv);
      if (!one.ok()) return one.status();
      r.kvs.push_back(std::move(*one));
    }
  }
  return r;
}

// Blocking calls made of asynchronous operations run to completion on a private
// io_context, so that each one has a deadline (beast::tcp_stream's expiry).
struct EtcdClient::Impl {
  net::io_context ioc;
  std::optional<beast::tcp_stream> stream;
  beast::flat_buffer buffer = [] {
    beast::flat_buffer b;
    b.reserve(16 * 1024);  // (most answers in one read; Beast reads 512 bytes into an empty one)
    return b;
  }();
  std::size_t at = 0;  // the member in use
  std::chrono::milliseconds timeout;

  enum class Outcome { Answered, NotSent, Lost };
  struct Attempt {
    Outcome outcome = Outcome::NotSent;
    int status = 0;
    std::string body, error;
  };

  void drop() {
    if (stream) {
      beast::error_code ec;
      stream->socket().close(ec);
    }
    stream.reset();
    buffer.clear();
  }

  template <typename Start>
  beast::error_code run(Start&& start) {
    beast::error_code result = net::error::would_block;
    start([&](beast::error_code ec, auto&&...) { result = ec; });
    ioc.restart();
    ioc.run();
    return result;
  }

  beast::error_code connect(const Endpoint& ep, Clock::time_point deadline) {
    beast::error_code ec;
    tcp::resolver resolver(ioc);
    auto found = resolver.resolve(ep.host, ep.port, ec);
    if (ec) return ec;
    stream.emplace(ioc);
    stream->expires_at(deadline);
    ec = run([&](auto handler) { stream->async_connect(found, std::move(handler)); });
    if (!ec) stream->socket().set_option(tcp::no_delay(true), ec);
    if (ec) drop();
    return ec;
  }

  Attempt exchange(const Endpoint& ep, const std::string& target, const std::string& body,
                   Clock::time_point deadline) {
    Attempt a;
    const bool reused = stream.has_value();
    if (!stream) {
      if (beast::error_code ec = connect(ep, deadline); ec) {
        a.error = "cannot connect: " + ec.message();
        return a;
      }
    }
    http::request<http::string_body> req{http::verb::post, target, 11};
    req.set(http::field::host, ep.str());
    req.set(http::field::user_agent, std::string("gate/") + gate::kVersion);
    req.set(http::field::content_type, "application/json");
    req.keep_alive(true);
    req.body() = body;
    req.prepare_payload();
    stream->expires_at(deadline);
    if (beast::error_code ec = run([&](auto h) { http::async_write(*stream, req, std::move(h)); }); ec) {
      drop();
      // A kept-alive connection the member closed: nothing reached it.
      if (reused && Clock::now() < deadline) return exchange(ep, target, body, deadline);
      a.error = "cannot send: " + ec.message();
      return a;
    }
    http::response_parser<http::string_body> parser;
    parser.body_limit(64u << 20);
    beast::error_code ec = run([&](auto h) { http::async_read(*stream, buffer, parser, std::move(h)); });
    if (ec) {
      drop();
      a.outcome = Outcome::Lost;
      a.error = ec == beast::error::timeout ? "no answer in time" : "the answer broke off: " + ec.message();
      return a;
    }
    auto& res = parser.get();
    a.outcome = Outcome::Answered;
    a.status = res.result_int();
    a.body = std::move(res.body());
    if (!res.keep_alive()) drop();
    return a;
  }
};

EtcdClient::EtcdClient(std::vector<Endpoint> endpoints, std::chrono::milliseconds timeout)
    : endpoints_(std::move(endpoints)), impl_(std::make_unique<Impl>()) {
  impl_->timeout = timeout;
}

EtcdClient::~EtcdClient() { impl_->drop(); }

const Endpoint& EtcdClient::current() const { return endpoints_.at(impl_->at % endpoints_.size()); }

namespace {

// What etcd said in an error answer ({"error","message","code"}), else the body's start.
std::string error_text(const std::string& body) {
  boost::system::error_code ec;
  json::value v = json::parse(body, ec);
  if (!ec && v.is_object())
    for (const char* field : {"message", "error"})
      if (const json::value* m = v.as_object().if_contains(field); m && m->is_string())
        return std::string(m->as_string());
  return body.substr(0, 120);
}

}  // namespace

Result<json::object> EtcdClient::call(std::string_view route, const json::object& body, Retry retry) {
  if (endpoints_.empty()) return Status::failure("no etcd member to ask");
  const std::string target = "/v3/" + std::string(route);
  const std::string text = json::serialize(body);
  const auto deadline = Clock::now() + impl_->timeout;
  std::string last;
  while (true) {
    for (std::size_t tried = 0; tried < endpoints_.size(); ++tried) {
      const Endpoint& ep = endpoints_[impl_->at % endpoints_.size()];
      Impl::Attempt a = impl_->exchange(ep, target, text, deadline);
      if (a.outcome == Impl::Outcome::Answered && a.status == 200) {
        boost::system::error_code ec;
        json::value v = json::parse(a.body, ec);
        if (ec || !v.is_object())
          return Status::failure("etcd at " + ep.str() + " answered " + target +
                                 " with something that is not its JSON: " + a.body.substr(0, 80));
        return std::move(v.as_object());
      }
      if (a.outcome == Impl::Outcome::Answered && a.status != 503)
        return Status::failure("etcd at " + ep.str() + " refused " + target + ": " + error_text(a.body) +
                               " (HTTP " + std::to_string(a.status) + ")");
      if (a.outcome == Impl::Outcome::Lost && retry == Retry::Once)
        return Status::failure("etcd at " + ep.str() + " gave no answer to " + target + " (" + a.error +
                               "); it may or may not have been applied");
      last = "etcd at " + ep.str() + ": " +
             (a.outcome == Impl::Outcome::Answered ? error_text(a.body) + " (HTTP 503)" : a.error);
      impl_->drop();
      ++impl_->at;
      if (Clock::now() >= deadline) break;
    }
    if (Clock::now() >= deadline)
      return Status::failure("no etcd member answered " + target + " within " +
                             std::to_string(impl_->timeout.count()) + " ms (last: " + last + ")");
    // Every member failed this round (an election, a restart): a moment before the next.
    std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(100), deadline - Clock::now()));
  }
}

std::vector<Endpoint> leader_first(std::vector<Endpoint> endpoints, std::chrono::milliseconds timeout) {
  for (std::size_t i = 0; i < endpoints.size(); ++i) {
    EtcdClient one({endpoints[i]}, timeout);
    Result<json::object> s = one.call("maintenance/status", json::object{}, Retry::Idempotent);
    if (!s.ok()) continue;
    // (member ids are uint64, as strings: compared as such)
    const json::value* leader = s->if_contains("leader");
    const json::value* header = s->if_contains("header");
    const json::value* me = header && header->is_object() ? header->as_object().if_contains("member_id") : nullptr;
    if (!leader || !me || !leader->is_string() || !me->is_string() || *leader != *me) continue;
    std::rotate(endpoints.begin(), endpoints.begin() + static_cast<std::ptrdiff_t>(i),
                endpoints.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    break;
  }
  return endpoints;
}

Result<RangeResult> EtcdClient::range(const json::object& request) {
  Result<json::object> r = call("kv/range", request, Retry::Idempotent);
  if (!r.ok()) return r.status();
  return decode_range(*r);
}

Result<std::int64_t> EtcdClient::put(std::string_view key, std::string_view value, std::int64_t lease) {
  Result<json::object> r = call("kv/put", put_request(key, value, lease), Retry::Idempotent);
  if (!r.ok()) return r.status();
  return header_revision(*r);
}

json::object txn_request(const json::array& compares, const json::array& success, const json::array& failure) {
  return {{"compare", compares}, {"success", success}, {"failure", failure}};
}

TxnResult decode_txn(const json::object& answer, std::int64_t revision) {
  TxnResult t;
  if (const json::value* s = answer.if_contains("succeeded"); s && s->is_bool()) t.succeeded = s->as_bool();
  t.revision = revision;
  if (const json::value* rs = answer.if_contains("responses"); rs && rs->is_array()) t.responses = rs->as_array();
  return t;
}

Result<TxnResult> EtcdClient::txn(const json::array& compares, const json::array& success,
                                  const json::array& failure, Retry retry) {
  Result<json::object> r = call("kv/txn", txn_request(compares, success, failure), retry);
  if (!r.ok()) return r.status();
  return decode_txn(*r, header_revision(*r));
}

Result<std::int64_t> EtcdClient::delete_range(std::string_view key, std::string_view range_end) {
  Result<json::object> r = call("kv/deleterange", delete_request(key, range_end), Retry::Idempotent);
  if (!r.ok()) return r.status();
  return json_int(*r, "deleted");
}

Result<std::int64_t> EtcdClient::lease_grant(std::int64_t ttl_s) {
  Result<json::object> r = call("lease/grant", {{"TTL", std::to_string(ttl_s)}}, Retry::Once);
  if (!r.ok()) return r.status();
  const std::int64_t id = json_int(*r, "ID");
  if (id == 0) return Status::failure("etcd granted no lease: " + error_text(json::serialize(*r)));
  return id;
}

Result<std::int64_t> EtcdClient::lease_keepalive(std::int64_t id) {
  Result<json::object> r = call("lease/keepalive", {{"ID", std::to_string(id)}}, Retry::Idempotent);
  if (!r.ok()) return r.status();
  const json::value* result = r->if_contains("result");
  // A lease etcd no longer has comes back without a TTL.
  return result && result->is_object() ? json_int(result->as_object(), "TTL") : 0;
}

Result<std::int64_t> EtcdClient::lease_ttl(std::int64_t id) {
  Result<json::object> r = call("lease/timetolive", {{"ID", std::to_string(id)}}, Retry::Idempotent);
  if (!r.ok()) return r.status();
  return json_int(*r, "TTL");
}

Status EtcdClient::lease_revoke(std::int64_t id) {
  Result<json::object> r = call("lease/revoke", {{"ID", std::to_string(id)}}, Retry::Idempotent);
  if (!r.ok() && r.message().find("requested lease not found") == std::string::npos) return r.status();
  return {};
}

Status EtcdClient::compact(std::int64_t revision) {
  Result<json::object> r =
      call("kv/compaction", {{"revision", std::to_string(revision)}, {"physical", true}}, Retry::Idempotent);
  if (!r.ok() && r.message().find("already been compacted") == std::string::npos) return r.status();
  return {};
}

}  // namespace gate::etcd
