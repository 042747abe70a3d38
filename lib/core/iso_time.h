#pragma once
// Wall-clock time as microseconds since the Unix epoch, and its ISO-8601 UTC form
// as the API writes it: 2026-11-26T16:07:45.123456+00:00.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace gate {

using Micros = std::int64_t;

Micros wall_clock_micros();
std::string format_iso8601(Micros t);
// Accepts what format_iso8601 writes (also with a trailing 'Z').
std::optional<Micros> parse_iso8601(std::string_view text);

}  // namespace gate
