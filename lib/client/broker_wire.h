#pragma once
// The broker's HTTP API v1 as bytes: the requests a client writes and the answers it
// reads, whatever does the I/O (the blocking BrokerClient, the mount's BrokerLoop).
// Pure: no sockets, no threads.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/lock_mode.h"

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

namespace wire {

struct Request {
  std::string method, target, body;
  // No I/O time limit for the answer: a waiting acquire is answered when granted.
  bool wait_forever = false;
  // To the broker itself, never to a BrokerLoop's local route (a delegation's own
  // calls: asking, reporting, handing back).
  bool to_broker = false;
};

// An acquire whose timeout is long next to the client's I/O time limit waits forever.
Request acquire(const AcquireRequest& req, std::chrono::milliseconds io_timeout);
// `changed`: the holder changed the key's content (the broker then sets the key's
// version to this lock's fence). `stale`: what the mount did with a stale
// replacement under this lock ("merged", "conflict", "refused"; counted in /metrics).
Request release(const std::string& lock_id, const std::string& owner, bool changed = false,
                const std::string& stale = "");
Request heartbeat(const std::string& lock_id, const std::string& owner,
                  std::optional<std::int64_t> lease_ms = std::nullopt);
// GET /v1/locks/status[?path=]
Request status(const std::string& key = "");
Request health();

// The request as HTTP/1.1 bytes, keep-alive, for `to`.
std::string http_text(const Request& r, const BrokerEndpoint& to);

CallResult to_result(const HttpReply& r);
// The locks held on exactly `key`, from a status answer; nullopt when unusable.
std::optional<std::vector<LockInfo>> holders_from(const HttpReply& r, const std::string& key);

// Reads one HTTP response from bytes as they arrive. Bytes past its end stay in
// leftover() (a broker never sends any unasked, but the reader does not assume so).
class AnswerReader {
 public:
  AnswerReader();
  ~AnswerReader();
  AnswerReader(AnswerReader&&) noexcept;
  AnswerReader& operator=(AnswerReader&&) noexcept;

  enum class State { NeedMore, Done, Failed };
  // Takes bytes; Done once a whole answer is in (see reply(), keep_alive()).
  State feed(const char* data, std::size_t size);
  // The connection ended: an answer that ends with it (no length) is complete.
  State end_of_stream();
  const HttpReply& reply() const { return reply_; }
  bool keep_alive() const { return keep_alive_; }
  // Why the answer could not be read (Failed).
  const std::string& error() const { return error_; }
  bool got_bytes() const { return got_bytes_; }
  std::string take_leftover();

 private:
  State parse();
  State finished();
  struct Parser;
  std::unique_ptr<Parser> parser_;
  std::string inbuf_;
  HttpReply reply_;
  std::string error_;
  bool keep_alive_ = false;
  bool got_bytes_ = false;
};

}  // namespace wire
}  // namespace gate
