#pragma once
// The two kinds of lock, one vocabulary for the engine, the broker and the mount
// (on the wire they are the strings "read" and "write").
#include <optional>
#include <string_view>

namespace gate {

enum class LockMode { Read, Write };

const char* to_string(LockMode m);
std::optional<LockMode> parse_lock_mode(std::string_view s);

}  // namespace gate
