// The pieces of gate's etcd client that need no etcd: base64 as the gateway writes
// it, the --store syntax, key ranges, requests and the decoding of answers.
#include <catch2/catch.hpp>

#include "core/base64.h"
#include "etcd/etcd_client.h"

using namespace gate;
using namespace gate::etcd;
namespace json = boost::json;

TEST_CASE("base64 round-trips every byte and refuses what is not base64", "[etcd]") {
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("/gate/v1/q") == "L2dhdGUvdjEvcQ==");
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  for (std::size_t n = 0; n <= all.size(); n += 37) CHECK(base64_decode(base64_encode(all.substr(0, n))) == all.substr(0, n));
  CHECK_FALSE(base64_decode("Zg=").has_value());   // length
  CHECK_FALSE(base64_decode("Z*==").has_value());  // alphabet
  CHECK_FALSE(base64_decode("Z=g=").has_value());  // padding inside
  CHECK_FALSE(base64_decode("Zg==Zm8=").has_value());
}

TEST_CASE("an etcd store is named as etcd://HOST:PORT with more members after commas", "[etcd]") {
  auto one = parse_store("etcd://127.0.0.1:23790");
  REQUIRE(one.ok());
  REQUIRE(one->size() == 1);
  CHECK((*one)[0].host == "127.0.0.1");
  CHECK((*one)[0].port == "23790");
  auto three = parse_store("etcd://a:1,b:2,[::1]:3");
  REQUIRE(three.ok());
  REQUIRE(three->size() == 3);
  CHECK((*three)[2].host == "::1");
  for (const char* bad : {"http://a:1", "etcd://", "etcd://a", "etcd://a:", "etcd://:1", "etcd://a:1,", "etcd://a:x"}) {
    INFO(bad);
    auto r = parse_store(bad);
    CHECK_FALSE(r.ok());
    CHECK_FALSE(r.message().empty());
  }
}

TEST_CASE("a prefix's range ends at the next key that does not start with it", "[etcd]") {
  CHECK(prefix_end("/q/") == "/q0");
  CHECK(prefix_end("a\xff") == "b");
  CHECK(prefix_end(std::string("\xff\xff", 2)) == std::string(1, '\0'));
}

TEST_CASE("requests are written as the gateway wants and answers read as it writes them", "[etcd]") {
  json::object c = compare("k", "CREATE", "EQUAL", 0);
  CHECK(c.at("key") == "aw==");
  CHECK(c.at("create_revision") == "0");
  CHECK(put_request("k", "v", 42).at("lease") == "42");
  CHECK_FALSE(put_request("k", "v").contains("lease"));
  // int64 as strings, defaults left out.
  json::object answer = json::parse(R"({"header":{"revision":"9"},"kvs":[{"key":"aw==","create_revision":"5",
      "mod_revision":"8","version":"2","value":"dg=="},{"key":"bA==","create_revision":"6","mod_revision":"6",
      "version":"1"}],"count":"2"})").as_object();
  Result<RangeResult> r = decode_range(answer);
  REQUIRE(r.ok());
  CHECK(r->revision == 9);
  CHECK(r->count == 2);
  REQUIRE(r->kvs.size() == 2);
  CHECK(r->kvs[0].key == "k");
  CHECK(r->kvs[0].value == "v");
  CHECK(r->kvs[0].create_revision == 5);
  CHECK(r->kvs[1].value.empty());
  CHECK(r->kvs[1].lease == 0);
  CHECK(decode_range(json::object{})->kvs.empty());
  CHECK(json_int(json::object{{"n", "x"}}, "n") == 0);
}
