// The mount's one retry policy: a queued wait that loses its broker.
#include <catch2/catch.hpp>

#include "mount/reconnect.h"

using gate::mount::Reconnect;
using namespace std::chrono_literals;

namespace {
const Reconnect::Clock::time_point t0{std::chrono::seconds(1000)};
}

TEST_CASE("reconnect: asks again every pause while the window lasts, then gives up",
          "[unit][reconnect]") {
  Reconnect r(10s, std::nullopt);
  auto at = r.lost(t0);
  REQUIRE(at);
  CHECK(*at == t0 + Reconnect::kPause);
  CHECK(r.outage_began(t0));
  CHECK(r.lost(t0 + 5s) == t0 + 5s + Reconnect::kPause);
  CHECK_FALSE(r.outage_began(t0 + 5s));
  CHECK(r.lost(t0 + 10s));            // at the edge of the window: still
  CHECK_FALSE(r.lost(t0 + 10001ms));  // past it: give up
}

TEST_CASE("reconnect: an answer from the broker starts a new window", "[unit][reconnect]") {
  Reconnect r(1s, std::nullopt);
  REQUIRE(r.lost(t0));
  r.reached();
  CHECK(r.lost(t0 + 5s));  // a new outage, not the old one's sixth second
  CHECK(r.outage_began(t0 + 5s));
  CHECK(r.lost(t0 + 5500ms));
  CHECK_FALSE(r.lost(t0 + 6500ms));
}

TEST_CASE("reconnect: the job's deadline caps the pause and ends the retries",
          "[unit][reconnect]") {
  Reconnect r(10s, t0 + 50ms);
  CHECK(r.lost(t0) == t0 + 50ms);  // the pause never runs past the deadline
  CHECK_FALSE(r.lost(t0 + 50ms));  // and at the deadline it is over
  // Even a deadline already past gets the one retry of the first loss.
  Reconnect late(10s, t0 - 1s);
  CHECK(late.lost(t0) == t0 - 1s);
  CHECK_FALSE(late.lost(t0));
}
