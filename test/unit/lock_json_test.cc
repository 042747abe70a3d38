// The API v1 JSON codec and request validation.
#include <catch2/catch.hpp>

#include "broker/lock_json.h"

using namespace gate;
namespace json = boost::json;

namespace {
std::string acquire_error(const std::string& body) {
  auto o = parse_body_object(body);
  if (!o.ok()) return o.message();
  return parse_acquire(*o).message();
}
}  // namespace

TEST_CASE("a lock object carries every field of the contract", "[json]") {
  Lock l;
  l.lock_id = "abc";
  l.key = "src/main.c";
  l.mode = LockMode::Write;
  l.owner = "o";
  l.acquired_at = 1'795'709'265'123'456;
  l.lease_expires_at = l.acquired_at + 30'000'000;
  l.max_hold_ms = 3'600'000;
  l.hold_count = 2;
  l.fence = 17;
  auto o = lock_to_json(l, 9);
  CHECK(o.at("lock_id") == "abc");
  CHECK(o.at("version") == 9);
  CHECK(o.at("path") == "src/main.c");
  CHECK(o.at("mode") == "write");
  CHECK(o.at("owner") == "o");
  CHECK(o.at("acquired_at") == "2026-11-26T16:07:45.123456+00:00");
  CHECK(o.at("lease_expires_at") == "2026-11-26T16:08:15.123456+00:00");
  CHECK(o.at("max_hold_ms") == 3'600'000);
  CHECK(o.at("hold_count") == 2);
  CHECK(o.at("fence") == 17);
  CHECK(o.at("agent").is_null());  // the client did not say
  CHECK(o.at("pid").is_null());
  CHECK(o.at("command").is_null());
  l.max_hold_ms.reset();
  CHECK(lock_to_json(l, 0).at("max_hold_ms").is_null());
  l.who = {"codex", 4242, "codex"};
  o = lock_to_json(l, 0);
  CHECK(o.at("agent") == "codex");
  CHECK(o.at("pid") == 4242);
  CHECK(o.at("command") == "codex");
}

TEST_CASE("ISO-8601 times round-trip", "[json]") {
  const Micros t = 1'795'709'265'123'456;
  CHECK(parse_iso8601(format_iso8601(t)) == t);
  CHECK(parse_iso8601("2026-11-26T16:07:45Z") == 1'795'709'265'000'000);
  CHECK_FALSE(parse_iso8601("yesterday"));
}

TEST_CASE("a valid acquire body is read with its optional fields", "[json]") {
  auto o = parse_body_object(
      R"({"path":"a","mode":"read","owner":"o","timeout_ms":null,"lease_ms":500,"session":"m:1","request_id":"r"})");
  REQUIRE(o.ok());
  auto p = parse_acquire(*o);
  REQUIRE(p.ok());
  CHECK(p->mode == LockMode::Read);
  CHECK_FALSE(p->timeout_ms);
  CHECK(p->lease_ms == 500);
  CHECK(p->session == "m:1");
  CHECK(p->request_id == "r");
  CHECK(p->who.agent.empty());
  o = parse_body_object(
      R"({"path":"a","mode":"read","owner":"o","agent":"claude-1","pid":77,"command":"node"})");
  REQUIRE(o.ok());
  p = parse_acquire(*o);
  REQUIRE(p.ok());
  CHECK(p->who.agent == "claude-1");
  CHECK(p->who.pid == 77);
  CHECK(p->who.command == "node");
}

TEST_CASE("bad acquire bodies name what is wrong", "[json]") {
  CHECK(acquire_error("not json").find("not valid JSON") != std::string::npos);
  CHECK(acquire_error("[1,2]") == "body must be a JSON object");
  CHECK(acquire_error(R"({"mode":"read","owner":"o"})") == "missing field 'path'");
  CHECK(acquire_error(R"({"path":1,"mode":"read","owner":"o"})") == "field 'path' must be a string");
  CHECK(acquire_error(R"({"path":"","mode":"read","owner":"o"})") == "field 'path' must not be empty");
  CHECK(acquire_error(R"({"path":"a","mode":"exclusive","owner":"o"})").find("'mode'") != std::string::npos);
  CHECK(acquire_error(R"({"path":"a","mode":"read"})") == "missing field 'owner'");
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","timeout_ms":"5"})").find("timeout_ms") != std::string::npos);
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","timeout_ms":-1})").find("timeout_ms") != std::string::npos);
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","pid":-3})").find("'pid'") != std::string::npos);
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","pid":"7"})").find("'pid'") != std::string::npos);
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","agent":7})") == "field 'agent' must be a string");
  CHECK(acquire_error(R"({"path":"a","mode":"read","owner":"o","agent":")" + std::string(200, 'a') + R"("})")
            .find("'agent' is longer than 128") != std::string::npos);
  std::string long_key(5000, 'k');
  CHECK(acquire_error(R"({"path":")" + long_key + R"(","mode":"read","owner":"o"})").find("longer than 4096") != std::string::npos);
}
