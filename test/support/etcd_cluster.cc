#include "support/etcd_cluster.h"

#include <csignal>

#include <unistd.h>

#include <stdexcept>

#include <boost/json.hpp>

#include "core/process.h"
#include "vm/vm_host.h"

namespace gate::test {

namespace json = boost::json;
using namespace std::chrono_literals;

bool etcd_installed() { return ::access("/usr/bin/etcd", X_OK) == 0; }

EtcdCluster::EtcdCluster(int members) {
  members_.resize(static_cast<std::size_t>(members));
  for (int i = 0; i < members; ++i) {
    Member& m = members_[static_cast<std::size_t>(i)];
    m.name = "m" + std::to_string(i + 1);
    // (free now; the kernel hands out ephemeral ports in turn, so no other test takes
    // them in the moment before etcd binds them)
    do m.client = vm::free_tcp_port(); while (m.client == 2379 || m.client == 2380);
    do m.peer = vm::free_tcp_port(); while (m.peer == m.client || m.peer == 2379 || m.peer == 2380);
    initial_cluster_ += (i ? "," : "") + m.name + "=http://127.0.0.1:" + std::to_string(m.peer);
  }
  for (int i = 0; i < members; ++i) start(i);
  if (!wait_healthy(30s)) throw std::runtime_error("the etcd cluster did not get a leader; see " + log(0));
}

EtcdCluster::~EtcdCluster() {
  for (auto& m : members_) m.process.kill_and_wait();
}

std::string EtcdCluster::spec() const {
  std::string s = "etcd://";
  for (std::size_t i = 0; i < members_.size(); ++i)
    s += (i ? "," : "") + std::string("127.0.0.1:") + std::to_string(members_[i].client);
  return s;
}

std::vector<etcd::Endpoint> EtcdCluster::endpoints() const {
  std::vector<etcd::Endpoint> out;
  for (int i = 0; i < size(); ++i) out.push_back(endpoint(i));
  return out;
}

etcd::Endpoint EtcdCluster::endpoint(int i) const {
  return {"127.0.0.1", std::to_string(members_.at(static_cast<std::size_t>(i)).client)};
}

std::string EtcdCluster::log(int i) const { return dir_.path() + "/m" + std::to_string(i + 1) + ".log"; }

void EtcdCluster::start(int i) {
  Member& m = members_.at(static_cast<std::size_t>(i));
  const std::string client = "http://127.0.0.1:" + std::to_string(m.client);
  const std::string peer = "http://127.0.0.1:" + std::to_string(m.peer);
  m.process = Child::spawn({"/usr/bin/etcd", "--name", m.name, "--data-dir", dir_.path() + "/" + m.name,
                            "--listen-client-urls", client, "--advertise-client-urls", client,
                            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                            "--initial-cluster", initial_cluster_, "--initial-cluster-token",
                            "gate-test-" + std::to_string(::getpid()), "--initial-cluster-state", "new",
                            "--logger", "zap"},
                           log(i));
}

void EtcdCluster::kill(int i) { members_.at(static_cast<std::size_t>(i)).process.kill_and_wait(); }

void EtcdCluster::pause(int i) { members_.at(static_cast<std::size_t>(i)).process.signal(SIGSTOP); }

void EtcdCluster::resume(int i) { members_.at(static_cast<std::size_t>(i)).process.signal(SIGCONT); }

bool EtcdCluster::running(int i) const { return members_.at(static_cast<std::size_t>(i)).process.running(); }

bool EtcdCluster::healthy(int i) const {
  if (!running(i)) return false;
  RunResult r = run_command({"curl", "-s", "--max-time", "2",
                             "http://127.0.0.1:" + std::to_string(members_[static_cast<std::size_t>(i)].client) +
                                 "/health"},
                            5s);
  return r.status == 0 && r.output.find("\"health\":\"true\"") != std::string::npos;
}

int EtcdCluster::leader() const {
  for (int i = 0; i < size(); ++i) {
    if (!running(i)) continue;
    etcd::EtcdClient c({endpoint(i)}, 2s);
    Result<json::object> s = c.call("maintenance/status", {}, etcd::Retry::Idempotent);
    if (!s.ok()) continue;
    // Member ids are unsigned 64-bit numbers, written as strings: compared as text.
    auto text = [](const json::value* v) { return v ? json::serialize(*v) : std::string(); };
    const json::value* h = s->if_contains("header");
    const std::string leader = text(s->if_contains("leader"));
    if (!leader.empty() && h && h->is_object() && text(h->as_object().if_contains("member_id")) == leader)
      return i;
  }
  return -1;
}

bool EtcdCluster::wait_healthy(std::chrono::milliseconds limit) const {
  return eventually(
      [&] {
        for (int i = 0; i < size(); ++i)
          if (healthy(i)) return true;
        return false;
      },
      limit);
}

}  // namespace gate::test
