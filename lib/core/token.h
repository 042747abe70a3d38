#pragma once
// Unguessable tokens: lock ids and owner tokens.
#include <string>

namespace gate {
// 128 random bits from the kernel (getrandom), as 32 lowercase hex digits.
std::string random_token();
}  // namespace gate
