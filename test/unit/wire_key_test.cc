// The broker's name for a lock key (client/wire_key.h): exact up to the limit,
// a head and a SHA-256 above it.
#include <catch2/catch.hpp>

#include <set>

#include "client/wire_key.h"
#include "core/config.h"

using gate::wire_key;

TEST_CASE("wire_key: a key that fits goes as it is", "[unit][wire_key]") {
  CHECK(wire_key("a/b.txt") == "a/b.txt");
  const std::string longest(gate::defaults::kMaxKeyBytes, 'x');
  CHECK(wire_key(longest) == longest);
}

TEST_CASE("wire_key: a longer key is its head, cut after a slash, and the SHA-256 of all of it",
          "[unit][wire_key]") {
  const std::string name(255, 'n');
  std::string key;
  for (int i = 0; i < 20; ++i) key += (i ? "/" : "") + name;  // 5,119 bytes
  const std::string w = wire_key(key);
  CHECK(w.size() <= gate::defaults::kMaxKeyBytes);
  CHECK(w.size() <= gate::kWireKeyHead + 100);
  // The head ends at a slash: 4 whole names.
  const std::string head = key.substr(0, 4 * 256 - 1);
  REQUIRE(w.substr(0, head.size()) == head);
  CHECK(w.substr(head.size(), 12) == "/\xE2\x80\xA6#sha256:");
  CHECK(w.size() == head.size() + 12 + 64);
  // The same on every call (and host): SHA-256 of the whole key. `printf 'a%.0s'
  // $(seq 5000) | sha256sum` gives the digest below.
  CHECK(wire_key(std::string(5000, 'a')).substr(gate::kWireKeyHead + 12) ==
        "c526c6222044dab5674de9c4ac7f4566ebb5e4d8bf9d8ea34c9cc8a7cc3c869c");
  // Keys that differ only past the head, or only in their last byte, stay apart.
  std::set<std::string> seen;
  for (char last : {'a', 'b', 'c'}) seen.insert(wire_key(key + "/" + last));
  seen.insert(wire_key(key));
  seen.insert(wire_key(key + "/"));
  CHECK(seen.size() == 5);
}

TEST_CASE("wire_key: a key with no slash in its head is cut at the head's length", "[unit][wire_key]") {
  const std::string key(6000, 'z');
  const std::string w = wire_key(key);
  CHECK(w.substr(0, gate::kWireKeyHead) == std::string(gate::kWireKeyHead, 'z'));
  CHECK(w.substr(gate::kWireKeyHead, 12) == "/\xE2\x80\xA6#sha256:");
}
