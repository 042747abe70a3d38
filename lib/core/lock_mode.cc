#include "core/lock_mode.h"

namespace gate {

const char* to_string(LockMode m) { return m == LockMode::Read ? "read" : "write"; }

std::optional<LockMode> parse_lock_mode(std::string_view s) {
  if (s == "read") return LockMode::Read;
  if (s == "write") return LockMode::Write;
  return std::nullopt;
}

}  // namespace gate
