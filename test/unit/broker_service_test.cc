// BrokerService without sockets or a database: requests in, answers out, on an
// io_context the test drives, with a clock the test moves.
#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <optional>
#include <string>

#include "broker/broker_service.h"
#include "core/log.h"

using namespace gate;
namespace json = boost::json;

namespace {

struct Service {
  Service() { set_log_level(LogLevel::Error); }  // the service logs every grant
  Micros now = 1'700'000'000'000'000;
  int ids = 0;
  boost::asio::io_context ioc;
  LockTable table{LockTableOptions{}, [this] { return "L" + std::to_string(++ids); }};
  BrokerService service{ioc, table, nullptr, [this] { return now; }};

  // Sends a request; its answer, once the service has given one.
  struct Call {
    std::optional<HttpAnswer> answer;
    std::uint64_t ticket = 0;
  };
  std::shared_ptr<Call> send(const std::string& method, const std::string& target,
                             const std::string& body = "") {
    auto call = std::make_shared<Call>();
    call->ticket = service.handle(method, target, body, [call](HttpAnswer a) { call->answer = a; });
    ioc.poll();
    ioc.restart();
    return call;
  }
  std::shared_ptr<Call> acquire(const std::string& key, const std::string& mode,
                                const std::string& owner, const std::string& extra = "") {
    return send("POST", "/v1/locks/acquire",
                R"({"path":")" + key + R"(","mode":")" + mode + R"(","owner":")" + owner + "\"" +
                    extra + "}");
  }
  static json::object body(const Call& c) { return json::parse(c.answer->body).as_object(); }
};

}  // namespace

TEST_CASE("service: a queued acquire is answered when the holder releases", "[unit][service]") {
  Service s;
  auto a = s.acquire("f", "write", "A");
  REQUIRE(a->answer);
  REQUIRE(a->answer->status == 200);
  const std::string lock_id = std::string(Service::body(*a).at("lock").at("lock_id").as_string());

  auto b = s.acquire("f", "read", "B");
  CHECK_FALSE(b->answer);  // waits, no thread blocked
  CHECK(b->ticket != 0);

  auto r = s.send("POST", "/v1/locks/release", R"({"lock_id":")" + lock_id + R"(","owner":"A"})");
  REQUIRE(r->answer);
  CHECK(r->answer->status == 200);
  REQUIRE(b->answer);
  CHECK(b->answer->status == 200);
  CHECK(Service::body(*b).at("lock").at("mode").as_string() == "read");
}

TEST_CASE("service: release and heartbeat refuse another owner (403) and unknown locks (404)",
          "[unit][service]") {
  Service s;
  auto a = s.acquire("f", "write", "A");
  const std::string id = std::string(Service::body(*a).at("lock").at("lock_id").as_string());
  for (const char* route : {"/v1/locks/release", "/v1/locks/heartbeat"}) {
    INFO(route);
    auto wrong = s.send("POST", route, R"({"lock_id":")" + id + R"(","owner":"B"})");
    CHECK(wrong->answer->status == 403);
    auto gone = s.send("POST", route, R"({"lock_id":"nope","owner":"A"})");
    CHECK(gone->answer->status == 404);
    CHECK(gone->answer->body.find("no lock nope") != std::string::npos);
  }
}

TEST_CASE("service: a lease that ran out on the clock frees the key", "[unit][service]") {
  Service s;
  REQUIRE(s.acquire("f", "write", "A", R"(,"lease_ms":1000)")->answer->status == 200);
  CHECK(s.acquire("f", "write", "B", R"(,"timeout_ms":0)")->answer->status == 408);
  s.now += 1'001'000;  // 1.001 s later, with no heartbeat
  auto b = s.acquire("f", "write", "B", R"(,"timeout_ms":0)");
  REQUIRE(b->answer);
  CHECK(b->answer->status == 200);
  CHECK(Service::body(*b).at("lock").at("owner").as_string() == "B");
}

TEST_CASE("service: a client that goes away leaves the queue at once", "[unit][service]") {
  Service s;
  auto a = s.acquire("f", "write", "A");
  auto b = s.acquire("f", "write", "B");
  REQUIRE(b->ticket != 0);
  s.service.client_gone(b->ticket);
  s.ioc.poll();
  auto st = s.send("GET", "/v1/locks/status?path=f");
  CHECK(Service::body(*st).at("queue").as_array().empty());
  CHECK(Service::body(*st).at("locks").as_array().size() == 1);
}

TEST_CASE("service: bad input answers 400 naming what is wrong, unknown routes 404",
          "[unit][service]") {
  Service s;
  auto not_json = s.send("POST", "/v1/locks/acquire", "{nope");
  CHECK(not_json->answer->status == 400);
  auto bad_mode = s.acquire("f", "exclusive", "A");
  CHECK(bad_mode->answer->status == 400);
  CHECK(bad_mode->answer->body.find("mode") != std::string::npos);
  auto no_owner = s.send("POST", "/v1/locks/acquire", R"({"path":"f","mode":"read"})");
  CHECK(no_owner->answer->status == 400);
  CHECK(no_owner->answer->body.find("owner") != std::string::npos);
  CHECK(s.send("GET", "/v1/nothing")->answer->status == 404);
  CHECK(s.table.locks().empty());
}

TEST_CASE("service: a waiter whose client goes away in the turn its grant is made gets no lock",
          "[unit][service]") {
  Service s;
  auto a = s.acquire("f", "write", "A");
  const std::string id = std::string(Service::body(*a).at("lock").at("lock_id").as_string());
  auto b = s.acquire("f", "write", "B");
  REQUIRE(b->ticket != 0);
  // A's release grants B; B's connection drops before the answer goes out.
  auto release = std::make_shared<Service::Call>();
  s.service.handle("POST", "/v1/locks/release", R"({"lock_id":")" + id + R"(","owner":"A"})",
                   [release](HttpAnswer ans) { release->answer = ans; });
  s.service.client_gone(b->ticket);
  s.ioc.poll();
  s.ioc.restart();
  REQUIRE(release->answer);
  CHECK(release->answer->status == 200);
  CHECK_FALSE(b->answer);            // nobody to tell
  CHECK(s.table.locks("f").empty());  // and nobody holds it for B
  auto c = s.acquire("f", "write", "C", R"(,"timeout_ms":0)");
  REQUIRE(c->answer);
  CHECK(c->answer->status == 200);
}

TEST_CASE("service: typed tries and releases follow the HTTP routes' rules", "[unit][service]") {
  Service s;
  AcquireParams p;
  p.key = "f";
  p.mode = LockMode::Write;
  p.owner = "A";
  p.timeout_ms = 0;
  std::optional<AcquireResult> a = s.service.try_acquire(p);
  REQUIRE(a);
  REQUIRE(a->kind == AcquireResult::Kind::Granted);
  // A waiting acquire queues over HTTP; a second writer's try is refused at once.
  auto waiting = s.acquire("f", "read", "B");
  CHECK_FALSE(waiting->answer);
  p.owner = "C";
  std::optional<AcquireResult> c = s.service.try_acquire(p);
  REQUIRE(c);
  CHECK(c->kind == AcquireResult::Kind::Timeout);
  // Only tries go typed: a wait needs an answer later.
  p.timeout_ms.reset();
  CHECK_FALSE(s.service.try_acquire(p));
  CHECK(s.service.release_now(a->lock.lock_id, "C", false, "") == OpStatus::Forbidden);
  CHECK(s.service.release_now(a->lock.lock_id, "A", true, "merged") == OpStatus::Ok);
  // The release granted the waiter, whose answer comes as the io_context runs.
  s.ioc.poll();
  REQUIRE(waiting->answer);
  CHECK(waiting->answer->status == 200);
  CHECK(s.service.release_now(a->lock.lock_id, "A", false, "") == OpStatus::NotFound);
  CHECK(s.table.version_of("f") == a->lock.fence);  // `changed` set the version
  CHECK(s.service.metrics().stale_merged == 1);
  CHECK(s.service.metrics().timeouts == 1);
}
