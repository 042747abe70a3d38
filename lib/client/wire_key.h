#pragma once
// The name a lock key goes by at the broker. The broker takes paths of at most
// defaults::kMaxKeyBytes (4,096) bytes; a file system takes longer ones (a path is
// limited per call, not in depth: a tree can go on below any working directory).
// A key that fits is sent as it is. A longer one is sent as its head, cut after a
// '/', then "/…#sha256:" and the SHA-256 of the whole key in hex: 1,100 bytes at
// most, the same on every host, and two keys share one only if SHA-256 collides.
// Throws std::runtime_error only when OpenSSL offers no SHA-256 (a broken install).
#include <string>
#include <string_view>

namespace gate {

inline constexpr std::size_t kWireKeyHead = 1024;  // the readable part of a long key

std::string wire_key(std::string_view key);

}  // namespace gate
