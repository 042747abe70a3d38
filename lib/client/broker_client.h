#pragma once
// BrokerClient: a blocking client of the broker's HTTP API v1 over one persistent
// keep-alive connection (TCP or Unix socket), reconnecting by itself when the
// connection drops. Its only retry: a call that finds its kept-alive connection
// closed (before any answer) is sent once more on a fresh one. Everything else is
// the caller's policy (the mount's is in mount/reconnect.h). One client serves one thread at a time; abort() may be called
// from any thread and makes the call in progress return Unavailable at once (the
// broker then drops a queued acquire, since its connection closed).
//
// Errors are values: no call throws for broker trouble.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/broker_wire.h"
#include "core/config.h"
#include "core/token.h"

namespace gate {

class BrokerClient {
 public:
  explicit BrokerClient(BrokerEndpoint endpoint,
                        std::chrono::milliseconds io_timeout = std::chrono::seconds(10));
  ~BrokerClient();
  BrokerClient(const BrokerClient&) = delete;
  BrokerClient& operator=(const BrokerClient&) = delete;

  // Waits as the request says (timeout_ms); a wait with no timeout ends only with
  // a grant, a broker answer, a dropped connection or abort().
  CallResult acquire(const AcquireRequest& req);
  // `changed`: the holder changed the key's content (the broker then sets the key's
  // version to this lock's fence). `stale`: what the mount did with a stale
  // replacement under this lock ("merged", "conflict", "refused"; counted in /metrics).
  CallResult release(const std::string& lock_id, const std::string& owner, bool changed = false,
                     const std::string& stale = "");
  CallResult heartbeat(const std::string& lock_id, const std::string& owner,
                       std::optional<std::int64_t> lease_ms = std::nullopt);
  // GET /v1/locks/status[?path=]; the JSON body on success.
  HttpReply status(const std::string& path = "");
  // The locks held on `key` (exactly that key); nullopt when the broker did not
  // give a usable answer.
  std::optional<std::vector<LockInfo>> holders(const std::string& key);
  bool healthy();

  // One raw request on the persistent connection. wait_forever: no I/O time limit
  // for the answer (used for acquires without a timeout).
  HttpReply request(const std::string& method, const std::string& target,
                    const std::string& body, bool wait_forever = false);

  // Thread-safe: ends the call in progress, and every later call until reset(), with
  // Unavailable ("aborted"); the connection is closed, so the broker drops a queued
  // acquire of this client at once.
  void abort();
  // Makes an aborted client usable again (it reconnects on the next call).
  void reset();

  const BrokerEndpoint& endpoint() const { return endpoint_; }

 private:
  HttpReply exchange(const wire::Request& r);
  CallResult call(const wire::Request& r);

  struct Impl;
  BrokerEndpoint endpoint_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gate
