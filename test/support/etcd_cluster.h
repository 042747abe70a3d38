#pragma once
// A real etcd cluster on loopback for tests: its own members (Debian's /usr/bin/etcd)
// on free ports, with their own data directories in a temporary directory, never
// 2379 (the Debian package's own service may hold it). Members are stopped by pid
// when the cluster goes out of scope, even when a test fails.
#include <cstdint>
#include <string>
#include <vector>

#include "etcd/etcd_client.h"
#include "support/test_support.h"

namespace gate::test {

class EtcdCluster {
 public:
  // Starts `members` members and waits until the cluster has a leader.
  explicit EtcdCluster(int members = 3);
  ~EtcdCluster();
  EtcdCluster(const EtcdCluster&) = delete;
  EtcdCluster& operator=(const EtcdCluster&) = delete;

  // "etcd://127.0.0.1:C1,127.0.0.1:C2,..." (gate broker --store).
  std::string spec() const;
  std::vector<etcd::Endpoint> endpoints() const;
  etcd::Endpoint endpoint(int i) const;
  int size() const { return static_cast<int>(members_.size()); }

  void kill(int i);   // SIGKILL, reaped
  void pause(int i);   // SIGSTOP: it answers nothing, and its connections stay open
  void resume(int i);  // SIGCONT
  void start(int i);  // (again) with its data directory and ports
  bool running(int i) const;
  // The member's /health says true (it sees a leader).
  bool healthy(int i) const;
  // The index of the member that leads, -1 when no live member knows one.
  int leader() const;
  // Waits until a live member is healthy; false after `limit`.
  bool wait_healthy(std::chrono::milliseconds limit = std::chrono::seconds(20)) const;
  std::string log(int i) const;

 private:
  struct Member {
    std::string name;
    std::uint16_t client = 0, peer = 0;
    Child process;
  };
  TempDir dir_{"gate-etcd"};
  std::vector<Member> members_;
  std::string initial_cluster_;
};

// etcd is installed here (tests that need it fail with a message when it is not).
bool etcd_installed();

}  // namespace gate::test
