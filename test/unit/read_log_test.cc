// ReadLog: the reads the stale replacement check goes by (locking.md).
#include <catch2/catch.hpp>

#include "mount/read_log.h"

using gate::mount::ReadLog;

TEST_CASE("read log: stale only when the file changed after the oldest read since the agent's own change",
          "[unit][stale]") {
  ReadLog log;
  // Never read: never stale (a blind write is not a lost update this mount can see).
  CHECK_FALSE(log.stale("a", "f", 9));

  log.read("a", "f", 3);
  CHECK_FALSE(log.stale("a", "f", 3));
  CHECK(log.stale("a", "f", 4));
  // Another agent's reads, and other keys, are their own.
  CHECK_FALSE(log.stale("b", "f", 4));
  CHECK_FALSE(log.stale("a", "g", 4));

  // A re-read does not clear the older read: content built from version 3 and
  // written after a look at version 5 still misses what changed in between.
  log.read("a", "f", 5);
  CHECK(log.stale("a", "f", 5));
  CHECK(log.reads("a", "f") == std::vector<std::uint64_t>{3, 5});
  log.read("a", "f", 5);
  CHECK(log.reads("a", "f") == std::vector<std::uint64_t>{3, 5});

  // The agent's own change starts its reads afresh.
  log.forget("a", "f");
  CHECK(log.reads("a", "f").empty());
  CHECK_FALSE(log.stale("a", "f", 7));
}

TEST_CASE("read log: after a refusal the agent stays stale until it reads again, and that read is its base",
          "[unit][stale]") {
  ReadLog log;
  log.read("a", "f", 3);
  REQUIRE(log.stale("a", "f", 4));
  log.refused("a", "f");
  // A fallback save without a read (a refused rename, then an O_TRUNC write).
  CHECK(log.stale("a", "f", 4));
  log.read("a", "f", 4);
  CHECK(log.reads("a", "f") == std::vector<std::uint64_t>{4});
  CHECK_FALSE(log.stale("a", "f", 4));
  // A refusal of an agent that has no reads changes nothing.
  log.refused("z", "f");
  CHECK_FALSE(log.stale("z", "f", 4));
}

TEST_CASE("read log: bounded per key (the oldest read kept) and in pairs (the least recently used go)",
          "[unit][stale]") {
  ReadLog log(/*max_entries=*/100, /*max_versions=*/4);
  for (std::uint64_t v = 10; v < 30; ++v) log.read("a", "f", v);
  const auto r = log.reads("a", "f");
  REQUIRE(r.size() == 4);
  CHECK(r.front() == 10);  // it decides staleness
  CHECK(r.back() == 29);
  CHECK(log.stale("a", "f", 30));

  log.read("keep", "k", 1);
  for (int i = 0; i < 200; ++i) {
    log.read("agent" + std::to_string(i), "f", 1);
    if (i % 20 == 0) log.read("keep", "k", 1);  // touched now and then: stays
  }
  CHECK(log.size() <= 101);
  CHECK(log.reads("keep", "k") == std::vector<std::uint64_t>{1});
  CHECK(log.reads("agent0", "f").empty());  // touched longest ago: forgotten
  CHECK(log.reads("agent199", "f") == std::vector<std::uint64_t>{1});
}
