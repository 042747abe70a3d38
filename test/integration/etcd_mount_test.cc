// Two views of one directory, each mounted through its own broker, the two brokers
// sharing one lock space on a real 3-member etcd cluster (issue 11): real processes
// opening files through either view queue in one FIFO per file.
#include "support/etcd_cluster.h"
#include "support/mount_fixture.h"

using namespace gate;
using namespace gate::test;

namespace {

std::unique_ptr<BrokerProcess> etcd_broker(const EtcdCluster& cluster) {
  BrokerProcess::Options o;
  o.extra_args = {"--store", cluster.spec()};
  return std::make_unique<BrokerProcess>(o);
}

}  // namespace

TEST_CASE("two mounts on two brokers of one etcd cluster keep one FIFO per file", "[mount][etcd][fifo]") {
  REQUIRE(etcd_installed());
  EtcdCluster cluster;
  auto b1 = etcd_broker(cluster);
  auto b2 = etcd_broker(cluster);
  Mount a(b1->endpoint());
  Mount b(b2->endpoint(), {}, a.root());
  write_file(a.in_root("f"), "data");

  auto w1 = holder(a.at("f"), O_WRONLY | O_APPEND);
  REQUIRE(w1->line() == "open");
  // Either broker shows the holder: one space.
  REQUIRE(eventually([&] { return key_state(b2->endpoint(), "f").holders == std::vector<std::string>{"write"}; }));
  auto r1 = holder(b.at("f"), O_RDONLY);  // through the other view and broker: waits
  REQUIRE(eventually([&] { return key_state(b1->endpoint(), "f").queued == 1; }));
  auto w2 = holder(a.at("f"), O_WRONLY | O_APPEND);
  REQUIRE(eventually([&] { return key_state(b2->endpoint(), "f").queued == 2; }));
  auto r2 = holder(b.at("f"), O_RDONLY);  // behind the queued writer, not beside r1
  REQUIRE(eventually([&] { return key_state(b1->endpoint(), "f").queued == 3; }));
  CHECK_FALSE(r1->line(200ms));
  const std::uint64_t first_fence = key_state_fence(b1->endpoint(), "f");

  w1->tell("write");
  w1->tell("close");
  REQUIRE(w1->line() == "closed");
  REQUIRE(r1->line() == "open");  // b's reader was next in line
  CHECK_FALSE(w2->line(200ms));
  CHECK(slurp(b.in_root("f")) == "datax");  // a's write is in the shared directory
  r1->tell("close");
  REQUIRE(r1->line() == "closed");
  REQUIRE(w2->line() == "open");  // then a's writer; b's later reader still waits
  CHECK_FALSE(r2->line(200ms));
  CHECK(eventually([&] { return key_state_fence(b2->endpoint(), "f") > first_fence; }));  // fences grow across brokers
  w2->tell("write");
  w2->tell("close");
  REQUIRE(w2->line() == "closed");
  REQUIRE(r2->line() == "open");
  r2->tell("close");
  REQUIRE(r2->line() == "closed");
  CHECK(slurp(a.in_root("f")) == "dataxx");
  REQUIRE(eventually([&] { return total_locks(b1->endpoint()) == 0 && total_locks(b2->endpoint()) == 0; }));
  // Neither mount was lent the space: there is more than one broker to recall from.
  CHECK(a.log().find("lent this mount its lock space") == std::string::npos);
}
