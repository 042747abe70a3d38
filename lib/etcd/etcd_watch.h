#pragma once
// EtcdWatch: one watch of a key range, over a WebSocket stream to the gateway's
// /v3/watch (full duplex: etcd's plain HTTP stream cannot be told anything after its
// request), on a thread the watch owns and joins.
//
// Updates come to the callback on that thread, in revision order, from
// `start_revision` on. A member that goes away (killed, partitioned, restarted) is
// left for the next one, and the watch is made again from the revision after the last
// one delivered: no event is lost or repeated. A watch whose start has been compacted
// away cannot go on: its last update says so (compacted, with etcd's compact
// revision), and the owner reads the range again and starts a new watch.
//
// Limits: a member cut off from the cluster's leader keeps a watch open without
// events (the gateway's WebSocket cannot ask etcd to refuse it); owners that need to
// know use progress (updates with no events carry the member's revision).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "etcd/etcd_client.h"

namespace gate::etcd {

struct WatchEvent {
  bool deleted = false;
  // A deletion has only key and mod_revision. (No previous values: etcd would read
  // each one back for every watcher.)
  KeyValue kv;
};

struct WatchUpdate {
  std::int64_t revision = 0;  // the member's revision when it wrote this update
  std::vector<WatchEvent> events;
  bool compacted = false;  // the watch ended: history before compact_revision is gone
  std::int64_t compact_revision = 0;
};

class EtcdWatch {
 public:
  using OnUpdate = std::function<void(const WatchUpdate&)>;
  // `on_problem` hears of members left behind (for logs); may be empty.
  EtcdWatch(std::vector<Endpoint> endpoints, std::string key, std::string range_end,
            std::int64_t start_revision, OnUpdate on_update,
            std::function<void(const std::string&)> on_problem = {});
  ~EtcdWatch();
  EtcdWatch(const EtcdWatch&) = delete;
  EtcdWatch& operator=(const EtcdWatch&) = delete;

  // Ends the watch and joins its thread; no update comes after it returns.
  void stop();
  // The revision after the last one delivered (where a new watch would start).
  std::int64_t next_revision() const { return next_.load(); }
  bool running() const { return !done_.load(); }

 private:
  void run();

  struct Impl;
  std::vector<Endpoint> endpoints_;
  std::string key_, range_end_;
  OnUpdate on_update_;
  std::function<void(const std::string&)> on_problem_;
  std::atomic<std::int64_t> next_;
  std::atomic<bool> stopping_{false}, done_{false};
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace gate::etcd
