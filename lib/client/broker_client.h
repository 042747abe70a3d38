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

#include "core/config.h"
#include "core/lock_mode.h"
#include "core/token.h"

namespace gate {

// On the wire the locked name is "path"; in the code it is the key, as everywhere.
struct LockInfo {
  std::string lock_id;
  std::string key;
  LockMode mode = LockMode::Write;
  std::string owner;
  std::string acquired_at;       // ISO-8601 UTC
  std::string lease_expires_at;  // ISO-8601 UTC
  std::optional<std::int64_t> max_hold_ms;
  std::int64_t hold_count = 0;
  std::uint64_t fence = 0;
  std::uint64_t version = 0;  // the key's content version when this was sent
  std::string agent;     // who it is for, as its client said ("" unknown)
  std::int64_t pid = 0;  // 0: unknown
  std::string command;
};

struct AcquireRequest {
  std::string key;
  LockMode mode = LockMode::Write;
  std::string owner;
  std::optional<std::int64_t> timeout_ms;  // nullopt: wait until granted
  std::optional<std::int64_t> lease_ms;
  std::optional<std::int64_t> max_hold_ms;
  std::string session;
  std::string request_id;
  // Who the lock is for, shown by `gate locks` (optional).
  std::string agent;
  std::int64_t pid = 0;
  std::string command;
};

enum class CallStatus {
  Ok,           // granted / released / renewed
  Timeout,      // 408: acquire not granted in time
  Deadlock,     // 409: acquire would deadlock
  Forbidden,    // 403: owner mismatch
  NotFound,     // 404: no such lock (released, expired, capped)
  BadRequest,   // 400/413: the broker refused the input
  Unavailable,  // no connection, broker shutting down (503), or aborted
};

const char* to_string(CallStatus s);

struct CallResult {
  CallStatus status = CallStatus::Unavailable;
  LockInfo lock;      // for granted acquires and heartbeats
  std::string error;  // a sentence for people when status is not Ok
};

struct HttpReply {
  int status = 0;  // 0: no answer (connection failed)
  std::string body;
  std::string error;
};

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
  struct Impl;
  BrokerEndpoint endpoint_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gate
