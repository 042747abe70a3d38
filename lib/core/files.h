#pragma once
// Reading a whole small file (procfs entries, a kept version, a file in a view).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace gate {

// The content of `path`, at most `limit` bytes; nullopt when it cannot be opened or
// read (gone, not ours, a directory).
std::optional<std::string> read_file(const std::string& path, std::size_t limit = SIZE_MAX);

}  // namespace gate
