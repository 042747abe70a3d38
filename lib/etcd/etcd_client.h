#pragma once
// EtcdClient: a blocking client of etcd 3.4's JSON gateway (POST /v3/<route>), over one
// kept-alive HTTP/1.1 connection to one member of a cluster at a time.
//
// Every call has a deadline (the client's timeout). A member that cannot be reached,
// answers 503 (no leader, or it is shutting down) or times out is left for the next
// one; the call goes round the members until its deadline. A call that may have been
// applied (its request was sent, no answer came) is sent again only when the caller
// says the request is idempotent (reads, and transactions guarded by a compare that
// fails the second time); otherwise it fails and the caller decides.
//
// Errors are values: an unreachable cluster, an HTTP error and an answer that is not
// the JSON etcd writes all come back as a failure that names the member and what it
// said. Keys and values are bytes; the client base64-encodes them on the wire.
//
// One client serves one thread at a time.
#include <boost/json.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace gate::etcd {

struct Endpoint {
  std::string host, port;
  std::string str() const { return host + ":" + port; }
};

// "etcd://HOST:PORT[,HOST:PORT...]" (the --store value); a failure says what is wrong.
Result<std::vector<Endpoint>> parse_store(const std::string& spec);

// One key as etcd keeps it.
struct KeyValue {
  std::string key, value;
  std::int64_t create_revision = 0, mod_revision = 0, version = 0, lease = 0;
};

struct RangeResult {
  std::int64_t revision = 0;  // of the store when read
  std::vector<KeyValue> kvs;
  std::int64_t count = 0;  // keys in the range, before limit and revision filters
  bool more = false;
};

struct TxnResult {
  bool succeeded = false;  // the compares held: the success branch ran
  std::int64_t revision = 0;
  boost::json::array responses;  // of the branch that ran, as etcd wrote them
};

// The end of the range of keys starting with `prefix` (etcd's range_end).
std::string prefix_end(std::string_view prefix);

// Pieces of requests, as the gateway wants them (keys base64, int64 as strings).
boost::json::object range_request(std::string_view key, std::string_view range_end = {});
boost::json::object put_request(std::string_view key, std::string_view value, std::int64_t lease = 0);
boost::json::object delete_request(std::string_view key, std::string_view range_end = {});
// A compare of one key's `target` (CREATE, MOD, VERSION, LEASE) with `result` (EQUAL,
// GREATER, LESS, NOT_EQUAL) against `number`; or of its VALUE.
boost::json::object compare(std::string_view key, std::string_view target, std::string_view result,
                            std::int64_t number);
// The same compare of every key in [key, range_end) (true for an empty range, except
// for VALUE).
boost::json::object compare_range(std::string_view key, std::string_view range_end, std::string_view target,
                                  std::string_view result, std::int64_t number);
boost::json::object compare_value(std::string_view key, std::string_view result, std::string_view value);

// Reading what etcd answers (int64 fields come as strings, defaults are left out).
std::int64_t json_int(const boost::json::object& o, std::string_view field);
// The store's revision an answer was written at (its header's); 0 when none.
std::int64_t header_revision(const boost::json::object& answer);
Result<KeyValue> decode_kv(const boost::json::value& kv);
Result<RangeResult> decode_range(const boost::json::object& response);
// Requests of a transaction's branch.
boost::json::object txn_put(std::string_view key, std::string_view value, std::int64_t lease = 0);
boost::json::object txn_delete(std::string_view key, std::string_view range_end = {});
boost::json::object txn_range(std::string_view key, std::string_view range_end = {});
// A transaction's body (kv/txn), also what a nested one holds ({"request_txn": ...}).
boost::json::object txn_request(const boost::json::array& compares, const boost::json::array& success,
                                const boost::json::array& failure);
// A transaction's answer (the top one's, or a nested one's "response_txn") at `revision`.
TxnResult decode_txn(const boost::json::object& answer, std::int64_t revision);

enum class Retry { Idempotent, Once };

// `endpoints` with the member that leads the cluster now first (as far as the members
// say within `timeout` each; the order is kept otherwise). A write sent to a follower
// is forwarded to the leader: one hop, and gateway work, more.
std::vector<Endpoint> leader_first(std::vector<Endpoint> endpoints, std::chrono::milliseconds timeout);

class EtcdClient {
 public:
  explicit EtcdClient(std::vector<Endpoint> endpoints,
                      std::chrono::milliseconds timeout = std::chrono::seconds(5));
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // One gateway call: POST /v3/<route> with `body`; the answer's JSON object.
  Result<boost::json::object> call(std::string_view route, const boost::json::object& body, Retry retry);

  Result<RangeResult> range(const boost::json::object& request);
  // The store's revision after the put.
  Result<std::int64_t> put(std::string_view key, std::string_view value, std::int64_t lease = 0);
  // Not retried once sent unless `retry` says it is idempotent (a compare makes a
  // second application fail: create_revision == 0, mod_revision == N).
  Result<TxnResult> txn(const boost::json::array& compares, const boost::json::array& success,
                        const boost::json::array& failure, Retry retry);
  Result<std::int64_t> delete_range(std::string_view key, std::string_view range_end = {});

  // A lease of `ttl_s` seconds (etcd's minimum is 2 s); its id.
  Result<std::int64_t> lease_grant(std::int64_t ttl_s);
  // One keep-alive; the lease's remaining TTL in seconds, 0 when the lease is gone.
  Result<std::int64_t> lease_keepalive(std::int64_t id);
  // The remaining TTL, or -1 when etcd does not know the lease.
  Result<std::int64_t> lease_ttl(std::int64_t id);
  Status lease_revoke(std::int64_t id);

  // Drops history before `revision` (physical: waits until it is done).
  Status compact(std::int64_t revision);
  // The member that answers this client now (for messages and tests).
  const Endpoint& current() const;
  const std::vector<Endpoint>& endpoints() const { return endpoints_; }

 private:
  struct Impl;
  std::vector<Endpoint> endpoints_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gate::etcd
