#pragma once
// Unguessable tokens: lock ids and owner tokens.
#include <cstddef>
#include <string>

namespace gate {
// 128 random bits from the kernel (getrandom), as 32 lowercase hex digits.
std::string random_token();
// `n` bytes as 2n lowercase hex digits.
std::string hex_of(const unsigned char* bytes, std::size_t n);
}  // namespace gate
