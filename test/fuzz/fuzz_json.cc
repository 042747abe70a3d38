// The broker's validation of request bodies (broker/lock_json.h): any bytes as the
// body of an acquire, a release or a heartbeat give a typed request or an error
// that names the field, never a crash; an accepted acquire always has a key, an
// owner and sane numbers.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "broker/lock_json.h"
#include "core/config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gate;
  const std::string body(reinterpret_cast<const char*>(data), size);
  auto o = parse_body_object(body);
  if (!o.ok()) {
    if (o.message().empty()) std::abort();
    return 0;
  }
  if (auto p = parse_acquire(*o); p.ok()) {
    if (p->key.empty() || p->key.size() > defaults::kMaxKeyBytes || p->owner.empty()) std::abort();
    for (const auto& ms : {p->timeout_ms, p->lease_ms, p->max_hold_ms})
      if (ms && *ms < 0) std::abort();
  } else if (p.message().empty()) {
    std::abort();
  }
  // The fields of release and heartbeat.
  std::string lock_id, owner;
  bool changed = false;
  std::optional<std::int64_t> lease;
  for (Status s : {get_string(*o, "lock_id", true, &lock_id), get_string(*o, "owner", true, &owner),
                   get_bool(*o, "changed", &changed), get_millis(*o, "lease_ms", &lease)})
    if (!s.ok() && s.message().empty()) std::abort();
  if (lease && *lease < 0) std::abort();
  return 0;
}
