#pragma once
// The broker's JSON codec for API v1: lock objects, queue entries and the
// validation of request bodies (with errors that name the field at fault).
#include <boost/json.hpp>

#include <optional>
#include <string>

#include "broker/handler.h"
#include "core/status.h"
#include "lock/lock_table.h"

namespace gate {

// `version`: the key's current content version (LockTable::version_of).
boost::json::object lock_to_json(const Lock& l, std::uint64_t version,
                                 boost::json::storage_ptr storage = {});
boost::json::object queued_to_json(const QueuedRequest& r);

// {"status": word} (and "error" when given) with `status`: an acquire's time-out,
// deadlock or refusal, a release's success.
HttpAnswer status_answer(int status, const char* word, const std::string& error = "");
// {"status": "granted", "lock": {...}}.
HttpAnswer granted_answer(const Lock& l, std::uint64_t version);

// Reads a request body as a JSON object; a failure is the text of a 400 answer.
// `storage` lets a caller parse into a buffer on its stack (no heap allocation).
Result<boost::json::object> parse_body_object(const std::string& body,
                                              boost::json::storage_ptr storage = {});

// Typed field access into *out. Each fails when the field is present with the
// wrong type (or missing when required); an absent optional field leaves *out.
Status get_string(const boost::json::object& o, const char* field, bool required, std::string* out);
Status get_millis(const boost::json::object& o, const char* field, std::optional<std::int64_t>* out);
Status get_bool(const boost::json::object& o, const char* field, bool* out);

// POST /v1/locks/release and /v1/locks/heartbeat bodies; a failure names what is wrong.
struct ReleaseParams {
  std::string lock_id, owner;
  bool changed = false;
  std::string stale;  // what a mount did with a stale replacement: "", merged, conflict, refused
};
Result<ReleaseParams> parse_release(const std::string& body);
struct HeartbeatParams {
  std::string lock_id, owner;
  std::optional<std::int64_t> lease_ms;
};
Result<HeartbeatParams> parse_heartbeat(const std::string& body);

// POST /v1/locks/acquire body -> params; a failure names what is wrong.
Result<AcquireParams> parse_acquire(const boost::json::object& o);
// The checks parse_acquire makes of the fields it read (and a lease of 0: the default),
// for params that come typed (an in-process delegate's tries).
Status check_acquire(AcquireParams& p);

// A table's whole state, as a delegate reports it and hands it back (times in
// microseconds, every field of the engine's): {"locks": [...], "queue": [...],
// "versions": {key: n}, "next_fence": n}. The engine checks what it means.
boost::json::object state_to_json(const TableState& s);
Result<TableState> state_from_json(const boost::json::object& o);

}  // namespace gate
